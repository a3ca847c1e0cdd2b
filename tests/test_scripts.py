"""The command-line contract every script shares: given a missing/empty/truncated/corrupt file, a
wrong column, a list of the wrong length, an id outside the vocabulary, NaN/inf values or a config
key that does not exist, it stops with exit code 2 and one line 'error: ...' naming the problem,
and leaves every earlier output byte for byte (and mtime for mtime) as it was.

One real subprocess per script, on the shared `pipeline` (conftest); the bulk of the cases run
in-process through common.UserError, in each stage's own test file.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from helpers import (RUN, SRC, assert_one_line_error, inf_prediction, outputs, replace_column, restored, run_script,
                     snapshot, truncate, typo_config)


def float_id_submission(p) -> Path:
    """The pipeline's submission with IDs written as floats (3.0): the zip a careless edit makes."""
    frame = pd.read_csv(p.submission, dtype=str)
    path = p.root / "float_ids.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("prediction.csv", frame.assign(ID=frame["ID"] + ".0").to_csv(index=False))
    return path


# script: (file to damage or None, damage, command-line arguments, expected fragments)
SCRIPT_CASES = {
    "make_synthetic": (None, None, lambda p: ["--preset", "tiny", "--out", p.root / "data.yaml"],
                       ["data.yaml", "--out", "cannot create the folder"]),
    "preprocess": ("raw/test.parquet", truncate, lambda p: ["--config", p.data_yaml],
                   ["test.parquet", "not a readable parquet file"]),
    "train": ("work/processed/train_fold.npy", truncate, lambda p: ["--config", p.model_yaml, "--device", "cpu"],
              ["train_fold.npy", "not a readable .npy file"]),
    "blend": (f"work/runs/{RUN}/valid.parquet", inf_prediction, lambda p: ["--config", p.blend_yaml],
              ["valid.parquet", "column 'pred'", "outside [0, 1]", "inf"]),
    "validate_submission": (None, None, lambda p: [float_id_submission(p), "--config", p.blend_yaml],
                            ["float_ids.zip", "column 'ID'", "0.0 at line 2 is not an integer ID"]),
    "score": ("raw/oracle/test_labels.parquet", truncate,
              lambda p: [p.submission, "--config", p.blend_yaml],
              ["test_labels.parquet", "not a readable parquet file"]),
    "summary": ("work/blend/test.parquet",
                lambda path: replace_column(path, "pred", pa.array(np.zeros(600)), new_name="prob"),
                lambda p: ["--config", p.blend_yaml], ["blend/test.parquet", "column 'pred'", "missing"]),
    "bench": (None, None, lambda p: ["--config", typo_config(p), "--steps", "1", "--warmup", "0"],
              ["unknown key train.learning_rate"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPT_CASES))
def test_every_script_stops_with_one_line_and_touches_nothing(pipeline, script):
    p = pipeline
    target, damage, args, fragments = SCRIPT_CASES[script]
    with restored(p.raw, *outputs(p)):
        if target:
            damage(p.root / target)
        arguments = args(p)
        before = snapshot(p.raw, p.root / "data.yaml", *outputs(p))
        result = run_script(script, *arguments, cwd=p.root)
        assert_one_line_error(result, *fragments)
        assert snapshot(p.raw, p.root / "data.yaml", *outputs(p)) == before, "earlier outputs changed"
        assert sorted(q.name for q in p.work.iterdir()) == ["blend", "processed", "runs"], \
            "no temporary folder left in the work dir"


def test_a_ctrl_c_while_a_script_imports_its_stage_is_one_line(tmp_path, monkeypatch, capsys):
    """src/<stage>.py imports mmctr.common and its stage under interrupts.interrupt_ends_in_one_line:
    a Ctrl-C while numpy or torch loads (seconds) ends like one while the stage runs, 'interrupted'
    and exit 130, not a traceback. Any other error of an import is left as it was (a traceback, not
    a one-line message meant for the stage's outputs)."""
    import ast
    import importlib
    from mmctr import common
    (tmp_path / "interrupted_on_import.py").write_text("raise KeyboardInterrupt\n")
    (tmp_path / "unreadable_on_import.py").write_text("raise PermissionError(13, 'Permission denied', '/x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises((SystemExit, KeyboardInterrupt)) as ended:  # a KeyboardInterrupt would stop pytest
        with common.interrupt_ends_in_one_line():
            importlib.import_module("interrupted_on_import")
    assert ended.type is SystemExit and ended.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(PermissionError), common.interrupt_ends_in_one_line():
        importlib.import_module("unreadable_on_import")

    for script in sorted((Path(__file__).parent.parent / "src").glob("*.py")):
        tree = ast.parse(script.read_text())
        nodes = list(ast.walk(tree))
        guarded = [node for node in nodes if isinstance(node, ast.With)
                   and ast.unparse(node.items[0].context_expr) == "interrupt_ends_in_one_line()"]
        outside = [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
        inside = [node.module for node in guarded[0].body if isinstance(node, ast.ImportFrom)] if guarded else []
        # outside the guard only mmctr.interrupts; mmctr.common (numpy, yaml) and the stage inside it
        assert outside == ["mmctr.interrupts"] and inside == ["mmctr.common", f"mmctr.{script.stem}"], script
    # ...and mmctr.interrupts itself loads nothing but the standard library
    loaded = subprocess.run([sys.executable, "-c", "import sys, mmctr.interrupts; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert not {"numpy", "yaml", "torch", "mmctr.common"} & set(eval(loaded.stdout)), loaded.stdout
