"""Smoke test of the whole pipeline: `bash run.sh` on the tiny preset ends in a valid, scored zip."""
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import common
import experiments
from validate_submission import validate_submission

REPO = Path(__file__).resolve().parent.parent


def run_sh(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["bash", "run.sh", "--preset", "tiny", "--data-root", str(tmp_path / "data"),
           "--submissions", str(tmp_path / "sub"), "--train-set", "train.max_epochs=2", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_sh_end_to_end_on_tiny(tmp_path):
    first = run_sh(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    zip_path = tmp_path / "sub" / "submission.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["prediction.csv"]
    raw = tmp_path / "data" / "tiny"
    test_ids = pd.read_parquet(raw / "test.parquet", columns=["ID"])["ID"].to_numpy()
    validate_submission(zip_path, test_ids, "Task2")  # raises on any defect

    with zipfile.ZipFile(zip_path) as zf, zf.open("prediction.csv") as f:
        submission = pd.read_csv(f)
    labels = common.read_test_labels(raw)
    assert common.roc_auc(labels, submission["Task2"].to_numpy()) > 0.5

    summary = first.stdout[first.stdout.index("=== summary"):]
    for name in ("qin_small", "dcnv2_tf_small", "din_tf_small", "blend (", "oracle"):
        assert name in summary, summary

    # the pictures next to every report, and one experiment-log row per run and for the blend
    work = tmp_path / "data" / "work" / "tiny"
    for picture in ("runs/qin_small/curves.png", "runs/din_tf_small/calibration.png", "blend/candidates.png"):
        assert (work / picture).read_bytes()[:4] == b"\x89PNG", picture
    log = work / experiments.LOG_NAME
    assert [row["kind"] for row in experiments.read_log(log)] == ["train"] * 3 + ["blend"]

    # a rerun reuses every finished stage: no fold is trained again, and the submission is the same
    second = run_sh(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    for model in ("qin_small", "dcnv2_tf_small", "din_tf_small"):
        assert f"runs/{model}: folds [0, 1, 2] already done, skipped" in second.stdout, second.stdout
    assert "fold 0 epoch" not in second.stdout
    with zipfile.ZipFile(zip_path) as zf, zf.open("prediction.csv") as f:
        np.testing.assert_array_equal(pd.read_csv(f)["Task2"], submission["Task2"])
    assert len(experiments.read_log(log)) == 4  # nothing new: no new row

    # --refit adds one model per config on every train row and submits the blend of their test
    # predictions; the folds stay as they were
    refit = run_sh(tmp_path, "--refit", "--name", "refit")
    assert refit.returncode == 0, refit.stdout[-3000:] + refit.stderr[-3000:]
    assert "fold 0 epoch" not in refit.stdout and refit.stdout.count("refit epoch   1") == 3
    runs = tmp_path / "data" / "work" / "tiny" / "runs"
    assert all((runs / model / "refit" / "done.json").is_file() for model in ("qin_small", "din_tf_small"))
    with zipfile.ZipFile(tmp_path / "sub" / "refit.zip") as zf, zf.open("prediction.csv") as f:
        refit_submission = pd.read_csv(f)
    assert common.roc_auc(labels, refit_submission["Task2"].to_numpy()) > 0.5
    assert not np.array_equal(refit_submission["Task2"], submission["Task2"])
    assert [row["kind"] for row in experiments.read_log(log)][4:] == ["refit"] * 3 + ["blend"]
