"""The run folder (mmctr.runs): one config holds it at a time and a dead holder frees it, a second
run with other settings is refused while the first trains, damaged run metadata means redo never
reuse, and no stage ever reads the leftover temporaries of killed writers (on the shared
`pipeline`, conftest)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from mmctr import blend
from mmctr import common
from mmctr import preprocess
from mmctr import processed_data
from mmctr import runs
from mmctr import train
from helpers import (ONE_THREAD_ENV, RUN, TINY_TRAIN, assert_one_line_error, assert_user_error, outputs, restored,
                     run_script, snapshot, write_config)


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
def test_a_second_run_with_other_settings_is_refused_while_the_first_trains(tiny_raw, tmp_path, one_thread):
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
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV)
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


def test_a_damaged_aggregate_is_written_again_from_the_finished_folds(pipeline, one_thread, capsys):
    p = pipeline
    with restored(p.run_dir):
        before = runs.read_metrics(p.run_dir)
        oof = (p.run_dir / "oof.parquet").read_bytes()
        folds = snapshot(p.run_dir / "fold0", p.run_dir / "fold1")
        (p.run_dir / "metrics.json").write_text("")  # a disk that filled, an editor that crashed
        train.run_training(p.model_cfg, device="cpu")
        assert re.search(r"metrics.json: not a readable JSON file .*: the aggregates are written again from the folds",
                         capsys.readouterr().out)
        assert snapshot(p.run_dir / "fold0", p.run_dir / "fold1") == folds  # nothing retrained
        assert runs.read_metrics(p.run_dir)["oof_auc"] == before["oof_auc"]
        assert (p.run_dir / "oof.parquet").read_bytes() == oof
        (p.run_dir / "metrics.json").write_text("{}")  # JSON, but not a run's aggregates
        train.run_training(p.model_cfg, device="cpu")
        assert "not the aggregates of a run: the aggregates are written again" in capsys.readouterr().out
        assert runs.read_metrics(p.run_dir)["oof_auc"] == before["oof_auc"]


def test_leftover_temporaries_of_killed_writers_are_never_read(pipeline, one_thread):
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


def test_the_stages_that_only_read_run_folders_start_without_torch():
    """blend, single, summary, score, validate_submission and the experiment log read run folders
    and predictions: none imports torch (1.5-2 s of each such process's start); runs imports it
    only to write a fold's checkpoint."""
    stages = ("blend", "single", "summary", "experiments", "score", "validate_submission")
    code = f"import sys; import {', '.join('mmctr.' + s for s in stages)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False\n"
