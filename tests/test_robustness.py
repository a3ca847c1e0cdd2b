"""Robustness of the whole pipeline: bad input, interrupted runs, stale or half-written outputs,
leaks across folds, and malformed submissions.

1. Every script, given a missing/empty/truncated/corrupt file, a wrong column, a list of the wrong
   length, an id outside the vocabulary, NaN/inf values or a config key that does not exist, stops
   with exit code 2 and one line 'error: ...' naming the problem, and leaves every earlier output
   byte for byte (and mtime for mtime) as it was. One real subprocess per script; the bulk of the
   cases in-process through common.UserError.
2. A training subprocess killed with SIGKILL in the middle of a fold, run again, ends with the same
   predictions, bit for bit, as an uninterrupted run.
3. Writes are atomic, leftover temporaries are never read, and a stage that finds outputs from
   other data or another config recomputes (or refuses) instead of reusing them.
4. No leak across folds: a fold model never predicts the rows it trained on, and the blend fits on
   out-of-fold predictions only; a planted leaking run is given away by its holdout AUC.
5. The submission validator rejects what test_submission.py does not yet cover.

Everything runs on the tiny synthetic data on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mmctr import blend
from mmctr import common
from mmctr import make_synthetic
from mmctr.models import fit
from mmctr import model_config
from mmctr import preprocess
from mmctr import processed_data
from mmctr import runs
from mmctr import score
from mmctr import summary
from mmctr import train
from mmctr import submission
from mmctr.common import UserError
from helpers import replace_column, run_script, truncate, write_run

SRC = common.REPO_ROOT / "src"
N_ITEMS = make_synthetic.PRESETS["tiny"].n_items
RUN = "tiny_run"
# small enough for a few seconds per fold on 2 CPU cores
TINY_TRAIN = {"max_epochs": 2, "batch_size": 512, "eval_batch_size": 2048, "log_every": 2}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_user_error(call, *fragments: str) -> str:
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``roots``: what 'untouched' means."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                     and not p.name.startswith(runs.LOCK_FILE))  # bookkeeping
        for path in paths:
            files[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


@contextlib.contextmanager
def restored(*roots: Path):
    """Let a test damage files under ``roots``; afterwards every file is back, bytes and mtime
    (so fingerprints built from size and mtime match again) and new files are gone."""
    before = snapshot(*roots)
    try:
        yield
    finally:
        for root in roots:
            if root.is_dir():
                for path in sorted(root.rglob("*"), reverse=True):
                    if path.is_file() and str(path) not in before:
                        path.unlink()
                    elif path.is_dir() and not any(k.startswith(f"{path}/") for k in before):
                        shutil.rmtree(path, ignore_errors=True)
        for name, (data, mtime) in before.items():
            path = Path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)
            os.utime(path, ns=(mtime, mtime))


def edit_value(path: Path, column: str, row: int, value) -> None:
    values = pq.read_table(path, columns=[column])[column].to_numpy().copy()
    if isinstance(value, float):
        values = values.astype(np.float64)
    values[row] = value
    replace_column(path, column, pa.array(values))


def write_config(path: Path, base: str, sections: dict) -> Path:
    path.write_text(yaml.safe_dump({"base": str(common.CONFIG_DIR / base), **sections}))
    return path


# Training here uses one CPU thread, in this process and in the subprocesses: the models are tiny,
# and two threads on a machine whose 2 cores are busy with other jobs spin in OpenMP barriers and
# run 10-20x slower. Reference and resumed runs share the setting, so their bits still compare.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# one finished pipeline: processed data, a 2-fold run, a blend and its submission
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tiny_raw, tmp_path_factory):
    """A private copy of the tiny data taken through preprocess, train (2 folds, recording the rows
    every fold model trains on), blend and the submission. Tests may damage it inside restored()."""
    root = tmp_path_factory.mktemp("pipeline")
    raw, work, subs = root / "raw", root / "work", root / "submissions"
    shutil.copytree(tiny_raw, raw)
    data = {"raw_dir": str(raw), "work_dir": str(work), "n_folds": 2}
    data_yaml = write_config(root / "data.yaml", "data.yaml", {"data": data})
    model_yaml = write_config(root / "model.yaml", "dcnv2_tf_small.yaml",
                              {"data": data, "run": {"name": RUN}, "train": TINY_TRAIN})
    blend_yaml = write_config(root / "blend.yaml", "blend.yaml", {"data": data, "blend": {
        "runs": [RUN], "methods": ["logit_mean"], "submission": {"dir": str(subs)}}})

    trained_rows: dict[int, set[int]] = {}
    real_fit = train.fit

    def recording_fit(model, data, train_rows, *args, **kwargs):
        trained_rows[len(trained_rows)] = set(train_rows.cpu().numpy().tolist())  # folds run in order
        return real_fit(model, data, train_rows, *args, **kwargs)

    preprocess.run_preprocess(common.load_config(data_yaml))
    model_cfg = common.load_config(model_yaml)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "fit", recording_fit)
        run_dir = train.run_training(model_cfg, device="cpu")
    metrics = blend.run_blend(common.load_config(blend_yaml))
    return SimpleNamespace(
        root=root, raw=raw, work=work, subs=subs, processed=work / "processed", run_dir=run_dir,
        blend_dir=work / "blend", submission=Path(metrics["submission"]["zip"]),
        data_yaml=data_yaml, model_yaml=model_yaml, blend_yaml=blend_yaml, model_cfg=model_cfg,
        blend_cfg=common.load_config(blend_yaml), trained_rows=trained_rows)


def outputs(p) -> list[Path]:
    """Every earlier output of the pipeline (not the raw data)."""
    return [p.processed, p.run_dir, p.blend_dir, p.subs]


# ---------------------------------------------------------------------------------------------
# 1a. one real subprocess per script: exit 2, one 'error:' line, earlier outputs untouched
# ---------------------------------------------------------------------------------------------

def float_id_submission(p) -> Path:
    """The pipeline's submission with IDs written as floats (3.0): the zip a careless edit makes."""
    frame = pd.read_csv(p.submission, dtype=str)
    path = p.root / "float_ids.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("prediction.csv", frame.assign(ID=frame["ID"] + ".0").to_csv(index=False))
    return path


def inf_prediction(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame.loc[7, "pred"] = np.inf
    frame.to_parquet(path)


def typo_config(p) -> Path:
    return write_config(p.root / "typo.yaml", "dcnv2_tf_small.yaml", {
        "data": {"raw_dir": str(p.raw), "work_dir": str(p.work), "n_folds": 2},
        "run": {"name": RUN}, "train": {"learning_rate": 1e-3}})


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
    "summary": (f"work/runs/{RUN}/test.parquet",
                lambda path: replace_column(path, "pred", pa.array(np.zeros(600)), new_name="prob"),
                lambda p: ["--config", p.blend_yaml], ["test.parquet", "column 'pred'", "missing"]),
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


# ---------------------------------------------------------------------------------------------
# 1b. the bulk in-process: each stage function raises one UserError line naming the problem
# ---------------------------------------------------------------------------------------------

def shorter_npy(path: Path) -> None:
    np.save(path, np.load(path)[:-1])


PROCESSED_DAMAGE = {
    "truncated array": ("train_fold.npy", truncate, ["train_fold.npy", "not a readable .npy file"]),
    "garbage array": ("test_ID.npy", lambda path: path.write_bytes(b"\x93NUMPY garbage"),
                      ["test_ID.npy", "not a readable .npy file", "--force"]),
    "missing array": ("valid_label.npy", lambda path: path.unlink(), ["valid_label.npy", "missing"]),
    "array of the wrong length": ("valid_item_seq.npy", shorter_npy,
                                  ["valid_item_seq.npy", "shape (599, 64)", "600 rows"]),
    "manifest not a mapping": ("manifest.json", lambda path: path.write_text("[1, 2]"),
                               ["manifest.json", "not a manifest"]),
}


@pytest.mark.parametrize("case", list(PROCESSED_DAMAGE))
def test_a_damaged_processed_folder_is_one_line_for_every_reader(pipeline, case):
    """train, blend, bench and validate all read the processed folder through load_processed (or
    test_ID.npy); each names the damaged file and changes nothing."""
    p = pipeline
    name, damage, fragments = PROCESSED_DAMAGE[case]
    with restored(p.raw, *outputs(p)):
        damage(p.processed / name)
        before = snapshot(*outputs(p))
        assert_user_error(lambda: processed_data.load_processed(p.processed), *fragments)
        assert_user_error(lambda: blend.run_blend(p.blend_cfg), *fragments)
        if name != "manifest.json":  # a damaged manifest is rebuilt: tested below
            assert_user_error(lambda: train.run_training(p.model_cfg, device="cpu"), *fragments)
        if name == "test_ID.npy":  # validate reads it when the raw test file is not there
            without_raw = common.load_config(p.blend_yaml, ["data.raw_dir=/nonexistent/raw"])
            assert_user_error(lambda: submission.expected_test_ids(without_raw), *fragments)
        assert snapshot(*outputs(p)) == before


def without_aggregates(p) -> None:
    for name in runs.AGGREGATE_FILES:  # as after an interrupted run: the folds are read again
        (p.run_dir / name).unlink()


def corrupt_fold_file(p) -> None:
    without_aggregates(p)
    truncate(p.run_dir / "fold1" / "test.parquet")


def fold_file_without_pred(p) -> None:
    without_aggregates(p)
    replace_column(p.run_dir / "fold0" / "oof.parquet", "pred", None)


TRAIN_CASES = {
    # case: (damage to the pipeline, the config to train with, expected fragments)
    "corrupt fold output": (corrupt_fold_file, lambda p: p.model_cfg,
                            ["fold1/test.parquet", "not a readable parquet file", "delete", "fold1"]),
    "fold output without its column": (fold_file_without_pred, lambda p: p.model_cfg,
                                       ["fold0/oof.parquet", "column 'pred': missing"]),
    "unknown key in a config file": (None, lambda p: common.load_config(typo_config(p)),
                                     ["unknown key train.learning_rate"]),
    "unknown key on the command line": (None, ["train.learnig_rate=1e-3"], ["unknown config key 'learnig_rate'"]),
    "NaN learning rate": (None, ["train.lr=.nan"], ["train.lr must be positive, got nan"]),
    "negative embedding L2": (None, ["train.emb_l2=-1"], ["train.emb_l2 must be at least 0, got -1"]),
    "lr decay above 1": (None, ["train.lr_decay=1.5"], ["train.lr_decay must be at most 1, got 1.5"]),
    "negative min_delta": (None, ["train.min_delta=-1"], ["train.min_delta must be at least 0, got -1"]),
    "lr floor above the lr": (None, ["train.lr_min=5"], ["train.lr_min (5) must not exceed train.lr (0.001)"]),
    "text where a number belongs": (None, ["train.batch_size=big"], ["train.batch_size must be an integer"]),
    "a list where a number belongs": (None, ["train.max_epochs=[1,2]"], ["train.max_epochs must be an integer"]),
    "run name with a path": (None, ["run.name=../elsewhere"], ["run.name must be a plain folder name"]),
    "other folds than the processed data": (None, ["data.n_folds=5000"],
                                            ["built with data.n_folds=2", "says 5000", "src/preprocess.py"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_user_errors_change_nothing(pipeline, case):
    p = pipeline
    damage, config, fragments = TRAIN_CASES[case]
    with restored(p.raw, *outputs(p)):
        if damage:
            damage(p)
        def run():  # --set overrides are checked while loading, the rest while training
            cfg = config(p) if callable(config) else common.load_config(p.model_yaml, config)
            train.run_training(cfg, device="cpu")
        before = snapshot(*outputs(p))
        assert_user_error(run, *fragments)
        assert snapshot(*outputs(p)) == before
        assert sorted(q.name for q in p.work.iterdir()) == ["blend", "processed", "runs"]


def rename_pred(path: Path) -> None:
    replace_column(path, "pred", pq.read_table(path)["pred"].combine_chunks(), new_name="prediction")


BLEND_CASES = {
    "truncated run file": (f"runs/{RUN}/test.parquet", truncate, [],
                           ["test.parquet", "not a readable parquet file"]),
    "wrong column": (f"runs/{RUN}/oof.parquet", rename_pred, [], ["oof.parquet", "column 'pred': missing"]),
    "infinite prediction": (f"runs/{RUN}/oof.parquet", inf_prediction, [],
                            ["oof.parquet", "column 'pred'", "outside [0, 1] (first: inf"]),
    "corrupt fingerprint": (f"runs/{RUN}/fingerprint.json", lambda path: path.write_text('{"data_fin'), [],
                            ["fingerprint.json", "not a readable JSON file"]),
    "fingerprint not a mapping": (f"runs/{RUN}/fingerprint.json", lambda path: path.write_text("[]"), [],
                                  ["fingerprint.json", "trained on other data"]),
    "empty oof": (f"runs/{RUN}/oof.parquet",
                  lambda path: pq.write_table(pq.read_table(path).slice(0, 0), path), [],
                  ["oof.parquet", "0 rows", "4,000"]),
    "unknown key": (None, None, ["blend.method=[logit_mean]"], ["unknown config key 'method'"]),
    "unknown run": (None, None, ["blend.runs=[tiny_run,nope]"], ["run 'nope' not found"]),
    "no processed data": ("processed", shutil.rmtree, [], ["no processed data yet", "src/preprocess.py"]),
}


@pytest.mark.parametrize("case", list(BLEND_CASES))
def test_blend_user_errors_keep_the_earlier_submission(pipeline, case):
    p = pipeline
    target, damage, overrides, fragments = BLEND_CASES[case]
    with restored(p.raw, *outputs(p)):
        if target:
            damage(p.work / target)
        before = snapshot(p.run_dir, p.blend_dir, p.subs)
        assert_user_error(lambda: blend.run_blend(common.load_config(p.blend_yaml, overrides)), *fragments)
        assert snapshot(p.run_dir, p.blend_dir, p.subs) == before


def test_a_blend_section_typo_in_a_config_file_is_an_error(tmp_path):
    cfg = common.load_config(write_config(tmp_path / "b.yaml", "blend.yaml", {"blend": {"method": ["x"]}}))
    assert_user_error(lambda: blend.checked_settings(cfg), "unknown key blend.method")


LABEL_DAMAGE = {
    "truncated": (truncate, ["test_labels.parquet", "not a readable parquet file"]),
    "empty file": (lambda path: path.write_bytes(b""), ["test_labels.parquet", "not a readable parquet file"]),
    "missing column": (lambda path: replace_column(path, "label", None),
                       ["test_labels.parquet", "column 'label': missing"]),
    "NaN label": (lambda path: edit_value(path, "label", 3, np.nan),
                  ["test_labels.parquet", "column 'label'", "ID 3 has label nan"]),
    "label outside 0/1": (lambda path: edit_value(path, "label", 4, 2),
                          ["test_labels.parquet", "column 'label'", "ID 4 has label 2"]),
    "ID outside the test set": (lambda path: edit_value(path, "ID", 0, 10**6),
                                ["test_labels.parquet", "column 'ID'", "IDs must be 0..599"]),
}


@pytest.mark.parametrize("case", list(LABEL_DAMAGE))
def test_score_and_summary_name_a_damaged_oracle(pipeline, case):
    p = pipeline
    damage, fragments = LABEL_DAMAGE[case]
    with restored(p.raw, *outputs(p)):
        damage(p.raw / "oracle" / "test_labels.parquet")
        before = snapshot(*outputs(p))
        assert_user_error(lambda: score.score_submission(p.submission, p.blend_cfg, "Task2"), *fragments)
        assert_user_error(lambda: summary.summary_rows(p.blend_cfg), *fragments)
        assert snapshot(*outputs(p)) == before


def nan_prediction(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame.loc[2, "pred"] = np.nan
    frame.to_parquet(path)


SUMMARY_CASES = {
    "corrupt metrics": ("blend/metrics.json", lambda path: path.write_text("{"),
                        ["metrics.json", "not a readable JSON file"]),
    "metrics of something else": ("blend/metrics.json", lambda path: path.write_text("{}"),
                                  ["metrics.json", "key 'runs' missing"]),
    "missing run predictions": (f"runs/{RUN}/test.parquet", lambda path: path.unlink(),
                                ["test.parquet", "changed after the blend", "src/train.py"]),
    "NaN prediction": ("blend/test.parquet", nan_prediction, ["blend/test.parquet", "NaN or infinite"]),
    "predictions for other rows": (f"runs/{RUN}/test.parquet",
                                   lambda path: pq.write_table(pq.read_table(path).slice(0, 10), path),
                                   ["test.parquet", "column 'ID'", "10 rows"]),
}


@pytest.mark.parametrize("case", list(SUMMARY_CASES))
def test_summary_user_errors(pipeline, case):
    p = pipeline
    target, damage, fragments = SUMMARY_CASES[case]
    with restored(p.raw, *outputs(p)):
        damage(p.work / target)
        assert_user_error(lambda: summary.summary_rows(p.blend_cfg), *fragments)


def test_summary_refuses_raw_data_newer_than_its_runs(pipeline):
    """Regenerated raw files (new labels) would be scored against the old runs' predictions."""
    p = pipeline
    with restored(p.raw, *outputs(p)):
        edit_value(p.raw / "test.parquet", "item_id", 0, 7)
        assert_user_error(lambda: summary.summary_rows(p.blend_cfg), "changed since", "retrain")


def test_validate_reads_the_raw_test_ids_only_when_they_are_sound(pipeline, tmp_path):
    p = pipeline
    cfg = common.load_config(p.blend_yaml, [f"data.work_dir={tmp_path / 'nothing'}"])  # no processed
    np.testing.assert_array_equal(submission.expected_test_ids(cfg), np.arange(600))
    with restored(p.raw):  # the raw file changed after preprocessing: its IDs count, not the stale ones
        table = pq.read_table(p.raw / "test.parquet")
        pq.write_table(table.set_column(table.schema.get_field_index("ID"), "ID",
                                        pa.array(np.arange(600) + 1000, pa.int64())), p.raw / "test.parquet")
        np.testing.assert_array_equal(submission.expected_test_ids(p.blend_cfg), np.arange(600) + 1000)
        without_raw = common.load_config(p.blend_yaml, ["data.raw_dir=/nonexistent/raw"])
        np.testing.assert_array_equal(submission.expected_test_ids(without_raw), np.arange(600))
    with restored(p.raw):
        replace_column(p.raw / "test.parquet", "ID", None)
        assert_user_error(lambda: submission.expected_test_ids(cfg), "test.parquet", "'ID'")
    with restored(p.raw):
        ids = pq.read_table(p.raw / "test.parquet")["ID"].to_pylist()
        replace_column(p.raw / "test.parquet", "ID", pa.array([None] + ids[1:], pa.int64()))
        assert_user_error(lambda: submission.expected_test_ids(cfg), "test.parquet", "1 nulls")


@pytest.mark.parametrize("args, fragments", [
    (("huge", "out", 0), ["--preset 'huge'", "unknown preset"]),
    (("tiny", "out", -1), ["--seed -1", "must be >= 0"]),
    (("tiny", "a_file/below", 0), ["a_file/below", "cannot create the folder"]),
])
def test_make_synthetic_user_errors_write_nothing(tmp_path, args, fragments):
    (tmp_path / "a_file").write_text("keep")
    preset, out, seed = args
    assert_user_error(lambda: make_synthetic.generate(preset, tmp_path / out, seed), *fragments)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "keep"


@pytest.mark.parametrize("config", ["data.yaml", "qin_small.yaml", "blend.yaml"])
def test_an_unknown_key_is_named_for_every_default_config(config):
    assert_user_error(lambda: common.load_config(common.CONFIG_DIR / config, ["data.nfolds=3"]),
                      "--set data.nfolds", "unknown config key 'nfolds'", "n_folds")


# ---------------------------------------------------------------------------------------------
# 2. SIGKILL in the middle of a fold, then the same command again
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_mid_fold_resumes_to_identical_predictions(tiny_raw, tmp_path):
    data = {"raw_dir": str(tiny_raw), "work_dir": str(tmp_path / "work"), "n_folds": 3}
    # the kill comes after fold 1's first epoch (about 40 steps), and no early stopping leaves it
    # two more epochs to run: a window of a second or more, and longer on a loaded machine
    config = write_config(tmp_path / "qin.yaml", "qin_small.yaml", {"data": data, "train": {
        "max_epochs": 3, "patience": 3, "batch_size": 64, "eval_batch_size": 2048}})
    preprocess.run_preprocess(common.load_config(config))  # the processed data exists for all three
    runs_root = tmp_path / "work" / "runs"

    def command(name: str) -> list[str]:
        return [sys.executable, str(SRC / "train.py"), "--config", str(config), "--set", f"run.name={name}",
                "--device", "cpu"]

    reference = subprocess.run(command("reference"), capture_output=True, text=True, timeout=600,
                               env=ONE_THREAD)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = runs_root / "resumed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command("resumed"), stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD)
        try:
            deadline = time.time() + 600
            # fold 1 has finished an epoch (its folder holds history.json) but is not done
            while not (run_dir / "fold1" / "history.json").exists() and process.poll() is None:
                assert time.time() < deadline, "fold 1 never started"
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (run_dir / "fold0" / "done.json").is_file()
    assert not (run_dir / "fold1" / "done.json").exists(), "killed too late: fold 1 had finished"
    assert not (run_dir / "fold2").exists() and not (run_dir / "oof.parquet").exists()
    fold0 = snapshot(run_dir / "fold0")

    resumed = subprocess.run(command("resumed"), capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "folds [0] already done, skipped" in resumed.stdout
    assert snapshot(run_dir / "fold0") == fold0, "the finished fold was kept as it was"
    predictions = ["oof.parquet", "valid.parquet", "test.parquet"] + [
        f"fold{k}/{name}" for k in range(3) for name in ("oof.parquet", "valid.parquet", "test.parquet")]
    for name in predictions:
        assert (run_dir / name).read_bytes() == (runs_root / "reference" / name).read_bytes(), name
    assert not [q for q in run_dir.rglob("*") if q.name.endswith(".tmp")], "no temporaries left"


# ---------------------------------------------------------------------------------------------
# 3. atomic writes, leftovers never read, stale outputs recomputed
# ---------------------------------------------------------------------------------------------

def parquet_writer_dies_half_way(self, path, *args, **kwargs):
    Path(path).write_bytes(b"PAR1" + b"\0" * 500)
    raise OSError("disk full (simulated)")


def text_writer_dies_half_way(self, text, *args, **kwargs):
    self.write_bytes(text[: len(text) // 2].encode())
    raise OSError("disk full (simulated)")


def torch_save_then_killed(path: Path) -> None:
    with common.atomic_path(path) as tmp:
        torch.save({"w": torch.zeros(1000)}, tmp)
        raise OSError("killed after the write, before the rename (simulated)")


WRITERS = {
    # writer: (the write, what dies half way through it)
    "write_parquet": (lambda path: common.write_parquet(path, pd.DataFrame({"a": np.arange(1000)})),
                      (pd.DataFrame, "to_parquet", parquet_writer_dies_half_way)),
    "write_json": (lambda path: common.write_json(path, {"a": list(range(1000))}),
                   (Path, "write_text", text_writer_dies_half_way)),
    "write_yaml": (lambda path: common.write_yaml(path, {"a": list(range(1000))}),
                   (Path, "write_text", text_writer_dies_half_way)),
    "write_text": (lambda path: common.write_text(path, "x" * 1000),
                   (Path, "write_text", text_writer_dies_half_way)),
    "atomic_path": (torch_save_then_killed, None),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_mid_write_leaves_the_old_file_or_none_and_no_temporary(tmp_path, monkeypatch, writer,
                                                                         existing):
    write, dies = WRITERS[writer]
    target = tmp_path / "out" / "file.bin"
    if existing:
        target.parent.mkdir()
        target.write_bytes(b"the previous, complete file")
    if dies:
        monkeypatch.setattr(*dies)
    with pytest.raises(OSError, match="simulated"):
        write(target)
    monkeypatch.undo()
    if existing:
        assert target.read_bytes() == b"the previous, complete file"
    else:
        assert not target.exists()
    assert [q.name for q in target.parent.iterdir()] == (["file.bin"] if existing else [])


def test_leftover_temporaries_of_killed_writers_are_never_read(pipeline):
    """A SIGKILL skips the cleanup of atomic_path and of preprocess's staging folder: plant such
    leftovers (garbage under the temporary names) everywhere; no stage reads them."""
    p = pipeline
    with restored(p.raw, *outputs(p)):
        garbage = b"half-written garbage"
        staging = p.work / ".processed-tmp-killed"
        staging.mkdir()
        (staging / "manifest.json").write_bytes(garbage)
        for folder, name in [(p.processed, "train_fold.npy"), (p.processed, "manifest.json"),
                             (p.run_dir, "oof.parquet"), (p.run_dir, "fingerprint.json"),
                             (p.run_dir / "fold0", "done.json"), (p.run_dir / "fold1", "test.parquet"),
                             (p.blend_dir, "metrics.json"), (p.subs, "submission.zip")]:
            (folder / f".{name}.killed.tmp").write_bytes(garbage)
        submission = pd.read_csv(p.submission)
        manifest_before = (p.processed / "manifest.json").read_bytes()

        assert preprocess.run_preprocess(common.load_config(p.data_yaml)) == p.processed
        assert (p.processed / "manifest.json").read_bytes() == manifest_before, "reused, not rebuilt"
        arrays, _ = processed_data.load_processed(p.processed)
        assert not any(name.startswith(".") for name in arrays)
        folds = snapshot(p.run_dir / "fold0", p.run_dir / "fold1")
        train.run_training(p.model_cfg, device="cpu")  # every fold done: nothing retrained
        assert snapshot(p.run_dir / "fold0", p.run_dir / "fold1") == folds
        blend.run_blend(p.blend_cfg)
        pd.testing.assert_frame_equal(pd.read_csv(p.submission), submission)


def test_a_damaged_manifest_rebuilds_the_processed_folder(pipeline, capsys):
    p = pipeline
    with restored(p.raw, *outputs(p)):
        (p.processed / "manifest.json").write_text('{"fingerprint": ')
        before = {name: (p.processed / name).read_bytes() for name in ("train_fold.npy", "test_ID.npy")}
        preprocess.run_preprocess(common.load_config(p.data_yaml))
        assert "rebuilding" in capsys.readouterr().out
        assert common.read_json(p.processed / "manifest.json")["fingerprint"] == processed_data.fingerprint(
            common.load_config(p.data_yaml))
        assert {name: (p.processed / name).read_bytes() for name in before} == before


def test_damaged_run_metadata_means_redo_never_reuse(pipeline, tmp_path):
    """A fold whose done.json does not read back is not done; a run whose fingerprint does not read
    back vouches for none of its outputs (they are discarded, as for another config)."""
    p = pipeline
    copy = tmp_path / "run"
    shutil.copytree(p.run_dir, copy)
    (copy / "fold1" / "done.json").write_text('{"fold": 1, "fold_auc"')
    assert runs.fold_done(copy, 0) and not runs.fold_done(copy, 1)
    stamp = common.read_json(copy / "fingerprint.json")
    (copy / "fingerprint.json").write_text("{")
    runs.prepare(copy, stamp, common.load_config(copy / "config.yaml"))
    assert runs.fold_dirs(copy) == [] and not (copy / "oof.parquet").exists()
    assert common.read_json(copy / "fingerprint.json") == stamp


def test_changed_data_or_config_is_recomputed_and_blend_refuses_stale_runs(copy_raw, tmp_path):
    """preprocess after the raw data changed, train after the data or the config changed, and blend
    after a run was retrained: nothing stale is ever reused."""
    raw = copy_raw()
    data = {"raw_dir": str(raw), "work_dir": str(tmp_path / "work"), "n_folds": 2}
    model_yaml = write_config(tmp_path / "model.yaml", "dcnv2_tf_small.yaml", {
        "data": data, "run": {"name": "r"}, "train": {**TINY_TRAIN, "max_epochs": 1}})
    blend_yaml = write_config(tmp_path / "blend.yaml", "blend.yaml", {"data": data, "blend": {
        "runs": ["r"], "methods": ["logit_mean"], "submission": {"dir": str(tmp_path / "subs")}}})
    data_cfg = common.load_config(model_yaml)
    preprocess.run_preprocess(data_cfg)
    run_dir = train.run_training(common.load_config(model_yaml), device="cpu")
    blend.run_blend(common.load_config(blend_yaml))
    submission = snapshot(tmp_path / "subs")
    old = common.read_json(run_dir / "fingerprint.json")
    done_stamp = (run_dir / "fold0" / "done.json").stat().st_mtime_ns

    # the raw data changes: blend refuses the processed folder and the run made from the old data
    level = pq.read_table(raw / "valid.parquet")["likes_level"][0].as_py()
    edit_value(raw / "valid.parquet", "likes_level", 0, (level + 1) % 11)
    assert_user_error(lambda: blend.run_blend(common.load_config(blend_yaml)),
                      "raw files", "changed since it was built")
    assert snapshot(tmp_path / "subs") == submission
    # so does train, naming the command that rebuilds; after it, train retrains every fold
    assert_user_error(lambda: train.run_training(common.load_config(model_yaml), device="cpu"),
                      "changed since it was built", "rerun src/preprocess.py")
    preprocess.run_preprocess(data_cfg)
    train.run_training(common.load_config(model_yaml), device="cpu")
    new = common.read_json(run_dir / "fingerprint.json")
    manifest = common.read_json(tmp_path / "work" / "processed" / "manifest.json")
    assert new["data_fingerprint"] == manifest["fingerprint"] != old["data_fingerprint"]
    assert new["config_hash"] == old["config_hash"]
    assert (run_dir / "fold0" / "done.json").stat().st_mtime_ns != done_stamp, "fold 0 retrained"
    assert np.asarray(processed_data.load_processed(tmp_path / "work" / "processed")[0]["valid_likes_level"])[0] \
        == pq.read_table(raw / "valid.parquet")["likes_level"][0].as_py()
    blend.run_blend(common.load_config(blend_yaml))
    submission = snapshot(tmp_path / "subs")

    # the config changes and only fold 0 is retrained so far: the old fold 1 is gone, and blend
    # refuses the unfinished run instead of mixing old and new folds
    train.run_training(common.load_config(model_yaml, ["train.lr=5e-4"]), folds=[0], device="cpu")
    assert not (run_dir / "fold1").exists()
    assert_user_error(lambda: blend.run_blend(common.load_config(blend_yaml)), "fold 1 is not done")
    assert snapshot(tmp_path / "subs") == submission


# ---------------------------------------------------------------------------------------------
# 4. no leak across folds
# ---------------------------------------------------------------------------------------------

def test_a_fold_model_never_predicts_rows_it_trained_on(pipeline):
    p = pipeline
    arrays, manifest = processed_data.load_processed(p.processed)
    fold_of_row = np.asarray(arrays["train_fold"])
    n_rows = len(fold_of_row)
    cfg = train.checked_config(p.model_cfg, "cpu")
    data = train.load_to_device(arrays, torch.device("cpu"))
    tables = train.item_tables(arrays, manifest, torch.device("cpu"))
    aggregate = pd.read_parquet(p.run_dir / "oof.parquet")
    np.testing.assert_array_equal(aggregate["row_id"], np.arange(n_rows))
    np.testing.assert_array_equal(aggregate["fold"], fold_of_row)

    assert sorted(p.trained_rows) == [0, 1]
    for k in (0, 1):
        held_out = np.flatnonzero(fold_of_row == k)
        trained_on = np.array(sorted(p.trained_rows[k]))
        # the fold model trained on exactly the other folds' rows, never on its own
        np.testing.assert_array_equal(trained_on, np.flatnonzero(fold_of_row != k))
        oof = pd.read_parquet(p.run_dir / f"fold{k}" / "oof.parquet")
        np.testing.assert_array_equal(oof["row_id"], held_out)
        assert not np.isin(oof["row_id"], trained_on).any()
        # the stored OOF predictions are exactly the saved fold model's predictions on its rows
        model = model_config.build_model(cfg["model"], tables)
        model.load_state_dict(torch.load(p.run_dir / f"fold{k}" / "best.pt"))
        again = fit.predict(model, data["train"], torch.from_numpy(held_out), cfg["train"]["eval_batch_size"])
        np.testing.assert_array_equal(again, oof["pred"].to_numpy())
        np.testing.assert_array_equal(aggregate["pred"].to_numpy()[held_out], oof["pred"].to_numpy())


@pytest.fixture
def planted_leak(pipeline, tmp_path):
    """A work folder with an honest run (noisy true probabilities) and a LEAKING one: its 'OOF'
    predictions are the labels plus noise (it saw its own rows), its holdout predictions noise."""
    p = pipeline
    work = tmp_path / "work"
    work.mkdir()
    (work / "processed").symlink_to(p.processed, target_is_directory=True)
    arrays, manifest = processed_data.load_processed(p.processed)
    rng = np.random.default_rng(0)
    sizes = {"oof": manifest["n_rows"]["train"], "valid": manifest["n_rows"]["valid"],
             "test": manifest["n_rows"]["test"]}
    honest = {}
    for split, raw_split in (("oof", "train"), ("valid", "valid"), ("test", "test")):
        prob = common.read_oracle_prob(p.raw, raw_split)
        honest[split] = 1 / (1 + np.exp(-(np.log(prob / (1 - prob)) + rng.normal(0, 1.0, len(prob)))))
    leaky = {"oof": np.clip(np.asarray(arrays["train_label"]) * 0.6 + rng.uniform(0, 0.4, sizes["oof"]), 0, 1),
             "valid": rng.random(sizes["valid"]), "test": rng.random(sizes["test"])}
    write_run(work / "runs" / "honest", honest, arrays, manifest)
    write_run(work / "runs" / "leaky", leaky, arrays, manifest)
    cfg = common.load_config(p.blend_yaml, ["blend.runs=[honest,leaky]", "blend.methods=[logit_mean,logistic]",
                                            f"data.work_dir={work}",
                                            f"blend.submission.dir={tmp_path / 'subs'}"])
    return cfg, work


def test_a_planted_leak_is_given_away_by_the_holdout(planted_leak):
    cfg, work = planted_leak
    metrics = blend.run_blend(cfg)
    leaky, honest = metrics["runs"]["leaky"], metrics["runs"]["honest"]
    assert leaky["oof_auc"] > 0.99, "the leak looks perfect out of fold"
    assert abs(leaky["valid_auc"] - 0.5) < 0.1, "and is chance on the holdout"
    # select: auto trusts the OOF AUC, so it falls for the leak; the report must say so
    assert metrics["chosen_valid_auc"] < honest["valid_auc"]
    warnings = metrics["gap_warnings"]
    assert any(w.startswith("leaky:") for w in warnings)
    assert not any(w.startswith("honest:") for w in warnings)
    report = (work / "blend" / "report.md").read_text()
    assert "## Warning: OOF AUC above the holdout AUC" in report
    assert f"leaky: OOF AUC {leaky['oof_auc']:.6f} but holdout AUC {leaky['valid_auc']:.6f}" in report
    assert "honest: OOF AUC" not in report


def test_the_blend_is_fitted_on_out_of_fold_predictions_only(planted_leak):
    """Replacing every run's holdout predictions changes the holdout scores and nothing else: no
    method fits on, or selects by, the holdout."""
    cfg, work = planted_leak
    first = blend.run_blend(cfg)
    first_files = {name: pd.read_parquet(work / "blend" / name) for name in ("oof.parquet", "test.parquet")}
    rng = np.random.default_rng(1)
    for run in ("honest", "leaky"):
        path = work / "runs" / run / "valid.parquet"
        frame = pd.read_parquet(path)
        common.write_parquet(path, frame.assign(pred=rng.random(len(frame)).astype(np.float32)))
    second = blend.run_blend(cfg)
    assert second["chosen"] == first["chosen"]
    for name in ("logit_mean", "logistic"):
        assert second["methods"][name]["oof_auc"] == first["methods"][name]["oof_auc"]
    assert second["methods"]["logistic"]["coefficients"] == first["methods"]["logistic"]["coefficients"]
    for name, frame in first_files.items():
        pd.testing.assert_frame_equal(pd.read_parquet(work / "blend" / name), frame)
    assert second["chosen_valid_auc"] != first["chosen_valid_auc"]


# ---------------------------------------------------------------------------------------------
# 5. malformed submissions that tests/test_submission.py does not cover
# ---------------------------------------------------------------------------------------------

IDS = np.arange(20)
ROWS = "".join(f"{i},{i / 19:.4f}\n" for i in IDS)


def zip_of(members: dict[str, bytes | None]) -> bytes:
    """A zip in memory; a member whose content is None is a directory entry."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if content is None:
                archive.writestr(zipfile.ZipInfo(name), b"")
            else:
                archive.writestr(name, content)
    return buffer.getvalue()


def corrupt_deflate(data: bytes) -> bytes:
    """Garbage in the compressed stream, the directory intact: fails while inflating."""
    data = bytearray(data)
    start = 30 + len("prediction.csv") + 4
    data[start:start + 20] = bytes(range(20))
    return bytes(data)


GOOD = ("ID,Task2\n" + ROWS).encode()
BAD_SUBMISSIONS = {
    # name: (file name, bytes, expected fragment)
    "UTF-8 BOM": ("s.csv", b"\xef\xbb\xbf" + GOOD, "byte-order mark"),
    "UTF-16": ("s.csv", GOOD.decode().encode("utf-16"), "byte-order mark"),
    "space before the header": ("s.csv", b" " + GOOD, "missing column 'ID'"),
    "space after the comma": ("s.csv", GOOD.replace(b"ID,Task2", b"ID, Task2"), "missing column 'Task2'"),
    "lower-case column": ("s.csv", GOOD.replace(b"Task2", b"task2"), "missing column 'Task2'"),
    "semicolons": ("s.csv", GOOD.replace(b",", b";"), "missing column 'ID'"),
    "tabs": ("s.csv", GOOD.replace(b",", b"\t"), "missing column 'ID'"),
    "trailing comma": ("s.csv", GOOD.replace(b"\n", b",\n"), "unexpected column(s) Unnamed: 2"),
    "index column": ("s.csv", pd.DataFrame({"ID": IDS, "Task2": IDS / 19}).to_csv().encode(),
                     "unexpected column(s) Unnamed: 0"),
    "no header": ("s.csv", ROWS.encode(), "missing column 'ID'"),
    "whitespace only": ("s.csv", b"  \n\n", "empty file"),
    "ragged row": ("s.csv", GOOD + b"3,0.5,0.1\n", "cannot read as CSV"),
    "IDs as floats": ("s.csv", ("ID,Task2\n" + "".join(f"{i}.0,0.5\n" for i in IDS)).encode(),
                      "column 'ID': 0.0 at line 2 is not an integer ID (20 such values)"),
    "IDs in exponent form": ("s.csv", ("ID,Task2\n" + "".join(f"{i}e0,0.5\n" for i in IDS)).encode(),
                             "0e0 at line 2 is not an integer ID"),
    "IDs as words": ("s.csv", ("ID,Task2\n" + "".join(f"id{i},0.5\n" for i in IDS)).encode(),
                     "column 'ID': non-numeric value 'id0'"),
    "ID beyond int64": ("s.csv", GOOD.replace(b"\n3,", b"\n99999999999999999999,"),
                        "99999999999999999999 at line 5 is not an integer ID"),
    "predictions as booleans": ("s.csv", ("ID,Task2\n" + "".join(f"{i},True\n" for i in IDS)).encode(),
                                "non-numeric value 'True'"),
    "decimal commas": ("s.csv", ("ID,Task2\n" + "".join(f'{i},"0,5"\n' for i in IDS)).encode(),
                       "non-numeric value '0,5'"),
    "csv named .zip": ("s.zip", GOOD, "not a readable zip file"),
    "empty .zip": ("s.zip", b"", "not a readable zip file"),
    "truncated zip": ("s.zip", zip_of({"prediction.csv": GOOD})[:-30], "not a readable zip file"),
    "corrupt compressed data": ("s.zip", corrupt_deflate(zip_of({"prediction.csv": GOOD * 40})),
                                "cannot read the zip"),
    "zip with a directory entry": ("s.zip", zip_of({"sub/": None, "prediction.csv": GOOD}),
                                   "it holds 2: 'sub/', 'prediction.csv'"),
    "zip holding only a folder": ("s.zip", zip_of({"prediction.csv/": None}), "it holds 1: 'prediction.csv/'"),
    "zip member under ./": ("s.zip", zip_of({"./prediction.csv": GOOD}), "it holds 1: './prediction.csv'"),
    "zip inside the zip": ("s.zip", zip_of({"prediction.csv": zip_of({"prediction.csv": GOOD})}),
                           "cannot read as CSV"),
    "BOM inside the zip": ("s.zip", zip_of({"prediction.csv": b"\xef\xbb\xbf" + GOOD}), "byte-order mark"),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_malformed_submissions_are_rejected(tmp_path, case):
    name, data, expected = BAD_SUBMISSIONS[case]
    path = tmp_path / name
    path.write_bytes(data)
    message = assert_user_error(lambda: submission.validate_submission(path, IDS, "Task2"), expected)
    assert message.startswith(str(path))


@pytest.mark.parametrize("text", [
    GOOD,                                      # plain
    GOOD.replace(b"\n", b"\r\n"),              # Windows line ends
    GOOD.rstrip(b"\n"),                        # no newline at the end
    b'"ID","Task2"\n' + ROWS.encode(),         # quoted header: the same CSV
    GOOD.replace(b"\n0,0.0000\n", b"\n0,0\n"),  # a plain 0 is a probability too
])
def test_well_formed_variants_are_accepted(tmp_path, text):
    path = tmp_path / "prediction.csv"
    path.write_bytes(text)
    submission.validate_submission(path, IDS, "Task2")
    archive = tmp_path / "submission.zip"
    archive.write_bytes(zip_of({"prediction.csv": text}))
    submission.validate_submission(archive, IDS, "Task2")


# ---------------------------------------------------------------------------------------------
# 6. finished work is never mixed or lost: concurrent runs, full or read-only disks, leftovers
# ---------------------------------------------------------------------------------------------

HOLDER = """
import time
from mmctr import runs
from pathlib import Path
with runs.hold(Path({run!r}), {fingerprint!r}):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_folder_is_held_by_one_fingerprint_and_a_dead_holder_frees_it(tmp_path):
    run = tmp_path / "runs" / "qin"
    mine, other = {"config_hash": "a", "data_fingerprint": "d"}, {"config_hash": "b", "data_fingerprint": "d"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(run=str(run), fingerprint=mine)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_user_error(lambda: runs.hold(run, other).__enter__(), str(run), "in use by process",
                          str(holder.pid), "another config", "run.name")
        with runs.hold(run, mine):  # the same config shares the folder: claims split its folds
            assert common.read_json(run / "run.lock.json")["pids"] == [holder.pid, os.getpid()]
        holder.send_signal(signal.SIGKILL)  # a kill skips every cleanup: the kernel drops its flock
        holder.wait()
        with runs.hold(run, other):
            assert common.read_json(run / "run.lock.json") == {"fingerprint": other, "pids": [os.getpid()]}
    finally:
        holder.kill()
        holder.wait()


WAITING_TRAIN = """
import sys, time
from pathlib import Path
from mmctr import common, train
real = train.train_in_run_folder

def after_go(*args, **kwargs):  # holds the run folder, then waits for the test's go
    Path({held!r}).touch()
    while not Path({go!r}).exists():
        time.sleep(0.02)
    return real(*args, **kwargs)

train.train_in_run_folder = after_go
sys.argv = ["train.py", *{args!r}]
common.run_main(train.main)
"""


@pytest.mark.slow
def test_a_second_run_with_other_settings_is_refused_while_the_first_trains(tiny_raw, tmp_path):
    """Two train.py processes on one run folder, 2 and 1 epochs: the second stops with one line and
    the folder holds the first's folds only (before the lock they interleaved)."""
    data = {"raw_dir": str(tiny_raw), "work_dir": str(tmp_path / "work"), "n_folds": 2}
    config = write_config(tmp_path / "m.yaml", "dcnv2_tf_small.yaml",
                          {"data": data, "run": {"name": RUN}, "train": {**TINY_TRAIN, "patience": 5}})
    preprocess.run_preprocess(common.load_config(config))
    held, go = tmp_path / "held", tmp_path / "go"
    args = ["--config", str(config), "--device", "cpu", "--set", "train.max_epochs=2"]
    first = subprocess.Popen([sys.executable, "-c", WAITING_TRAIN.format(held=str(held), go=str(go),
                                                                         args=args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        deadline = time.time() + 300
        while not held.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.02)
        second = run_script("train", "--config", config, "--device", "cpu", "--set", "train.max_epochs=1",
                            cwd=tmp_path)
        assert_one_line_error(second, "in use by process", str(first.pid), "another config")
        go.touch()
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        first.kill()
        first.wait()
    run_dir = tmp_path / "work" / "runs" / RUN
    assert [runs.fold_metrics(run_dir, k)["epochs"] for k in range(2)] == [2, 2]
    assert common.parse_yaml((run_dir / "config.yaml").read_text())["train"]["max_epochs"] == 2
    assert not list(run_dir.parent.glob(f"{RUN}.old-*")), "nothing was moved aside"


def test_leftover_temporaries_of_dead_writers_are_swept_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_file = tmp_path / f".metrics.json.{dead}.x1y2.tmp"
    live_file = tmp_path / f".metrics.json.{os.getpid()}.a1b2.tmp"  # a writer still at work
    stale_folder = tmp_path / f".blend-tmp-{dead}-z9"
    for path in (stale_file, live_file):
        path.write_text("half")
    (stale_folder / "sub").mkdir(parents=True)
    common.write_json(tmp_path / "metrics.json", {"a": 1})
    assert not stale_file.exists() and live_file.exists()
    with common.staged_folder(tmp_path / "blend") as staged:
        (staged / "report.md").write_text("new")
    assert not stale_folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_file.name, "metrics.json", "blend"])


def test_a_failed_submission_write_keeps_the_previous_pair(tmp_path, monkeypatch):
    from mmctr import submission
    ids = np.arange(20)
    csv_path, zip_path = submission.write_submission(ids, np.full(20, 0.25), tmp_path, "run")
    before = snapshot(csv_path, zip_path)

    def zip_refused(path, *args, **kwargs):
        if Path(path).name.endswith(".tmp") and ".zip." in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(submission, "validate_submission", zip_refused)
    with pytest.raises(OSError):
        submission.write_submission(ids, np.full(20, 0.75), tmp_path, "run")
    assert snapshot(csv_path, zip_path) == before, "neither file of the pair changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.zip"]


def test_a_blend_that_fails_at_its_submission_leaves_the_previous_blend_whole(pipeline, monkeypatch):
    p = pipeline
    with restored(*outputs(p)):
        before = snapshot(p.blend_dir, p.subs)

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(p.subs / "x.csv"))
        monkeypatch.setattr(blend, "write_submission", disk_full)
        with pytest.raises(OSError):
            blend.run_blend(p.blend_cfg)
        assert snapshot(p.blend_dir, p.subs) == before
        assert not list(p.work.glob(".blend-*")), "no staging folder left"


def test_outputs_in_a_file_or_an_unwritable_place_are_one_line_before_any_work(pipeline, tmp_path):
    p = pipeline
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cfg = copy.deepcopy(p.blend_cfg)
    cfg["blend"]["submission"]["dir"] = str(a_file)
    assert_user_error(lambda: blend.run_blend(cfg), str(a_file), "blend.submission.dir", "must be a folder")
    cfg["blend"]["submission"]["dir"] = str(a_file / "below")
    assert_user_error(lambda: blend.run_blend(cfg), "blend.submission.dir", "cannot be written")


def in_small_mount(script: str, size: str, options: str = "") -> subprocess.CompletedProcess:
    """Run ``script`` (bash) where /mnt/small is a fresh tmpfs of ``size``, in a private mount
    namespace (unshare -rm: no root needed, nothing outside sees it); skip where that is refused."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("this machine refuses a private tmpfs mount (unshare -rm), needed for a small disk")
    mount = f"mount -t tmpfs -o size={size}{',' + options if options else ''} tmpfs /mnt"
    return subprocess.run(["unshare", "-rm", "bash", "-c", f"{mount} && {script}"], capture_output=True,
                          text=True, timeout=300, env=ONE_THREAD, cwd=common.REPO_ROOT)


def test_preprocess_on_a_full_or_read_only_disk_is_one_line_and_leaves_no_scratch(tiny_raw):
    command = (f"{sys.executable} src/preprocess.py --set data.raw_dir={tiny_raw} --set data.work_dir=/mnt/work"
               f"; echo rc=$?; ls -A /mnt/work 2>/dev/null | tr '\\n' ' '")
    full = in_small_mount(command, "256k")
    assert "rc=2" in full.stdout and "Traceback" not in full.stderr, full.stderr
    assert_one_line_error(SimpleNamespace(returncode=2, stderr=full.stderr), "/mnt/work", "needs about",
                          "GiB free")
    assert full.stdout.strip().endswith("rc=2"), "nothing left in the work folder"
    read_only = in_small_mount(command, "1m", "ro")
    assert "rc=2" in read_only.stdout, read_only.stderr
    assert_one_line_error(SimpleNamespace(returncode=2, stderr=read_only.stderr), "/mnt/work", "cannot be written",
                          "Read-only file system")


def test_an_array_that_does_not_fit_is_enospc_naming_it_not_sigbus(tmp_path):
    """The memory-mapped arrays are sparse files: without a reservation a full disk kills the
    process with SIGBUS at the first write, with no message."""
    script = (f"{sys.executable} -c \"from mmctr import common, preprocess; import numpy as np, pathlib; "
              f"common.run_main(lambda: preprocess._new_array(pathlib.Path('/mnt'), "
              f"'item_emb', np.float32, (100_000, 128))[:] .fill(1))\"; echo rc=$?")
    result = in_small_mount(script, "1m")
    assert result.stdout.strip().endswith("rc=2"), (result.stdout, result.stderr)
    assert_one_line_error(SimpleNamespace(returncode=2, stderr=result.stderr), "/mnt/item_emb.npy",
                          "No space left on device", "free space")


def test_run_sh_refuses_unwritable_outputs_before_setup(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for option, value, fragment in [("--submissions", a_file, "a file, not a folder"),
                                    ("--data-root", a_file / "below", "cannot write there")]:
        result = subprocess.run(["bash", "run.sh", "--preset", "tiny", option, str(value)], capture_output=True,
                                text=True, timeout=60, cwd=common.REPO_ROOT)
        assert result.returncode == 2 and "=== setup" not in result.stdout, (result.stdout, result.stderr)
        assert result.stderr.strip() == f"run.sh: {option} {value}: {fragment}" or fragment in result.stderr
