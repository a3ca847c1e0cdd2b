"""Fold parallelism (train.py --devices): one worker process per device, each fold claimed exactly
once, the same files as a sequential run, and a worker killed mid-fold costs only a rerun.

On the CPU with two workers (--devices cpu,cpu), on the tiny data with 3 folds: what a GPU machine
does with cuda:0,cuda:1, except the device.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmctr import common
from mmctr import preprocess
from mmctr import runs
from mmctr import train
from helpers import ONE_THREAD_ENV, single_thread
from conftest import make_data_cfg

FOLDS = 3
# a window of a second or more between a fold's first epoch and its end, for the kill
TRAIN = ["train.max_epochs=3", "train.patience=3", "train.batch_size=64", "train.eval_batch_size=2048"]
PREDICTIONS = ["oof.parquet", "valid.parquet", "test.parquet"] + [
    f"fold{k}/{split}.parquet" for k in range(FOLDS) for split in ("oof", "valid", "test")]
# one thread per process (ONE_THREAD_ENV, single_thread), in this one and in the workers (they take
# the parent's count): the models are tiny, and the reference and parallel runs must share the
# setting to compare bits


@pytest.fixture(scope="module")
def three_folds(tiny_raw, tmp_path_factory) -> dict:
    """The tiny data preprocessed into 3 folds (a config's data section)."""
    cfg = make_data_cfg(tiny_raw, tmp_path_factory.mktemp("three_folds"), n_folds=FOLDS)
    preprocess.run_preprocess(cfg)
    return cfg["data"]


def model_cfg(data: dict, name: str) -> dict:
    cfg = common.load_config(common.CONFIG_DIR / "qin_small.yaml", TRAIN)
    cfg["data"] = dict(data)
    cfg["run"]["name"] = name
    return cfg


@pytest.fixture(scope="module")
def sequential(three_folds):
    """The reference: every fold one after another in this process."""
    with single_thread():
        return train.run_training(model_cfg(three_folds, "sequential"), device="cpu")


def assert_same_bytes(run, reference) -> None:
    for name in PREDICTIONS:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_claim_is_taken_once_and_a_dead_processs_claim_is_removed(tmp_path):
    assert runs.claim_fold(tmp_path, 0) and not runs.claim_fold(tmp_path, 0)
    assert runs.claim_owner(runs.claim_path(tmp_path, 0)) == os.getpid()
    runs.release_claim(tmp_path, 0)
    assert runs.claim_fold(tmp_path, 0)
    common.write_json(runs.fold_dir(tmp_path, 2) / "done.json", {"fold": 2})  # finished by another worker
    assert not runs.claim_fold(tmp_path, 2) and not runs.claim_path(tmp_path, 2).exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    runs.claim_path(tmp_path, 1).write_text(gone.stdout)       # a worker killed mid-fold
    runs.claim_path(tmp_path, runs.REFIT).write_text("")      # killed before it wrote its pid, long ago
    old = time.time() - runs.CLAIM_WRITE_S - 1
    os.utime(runs.claim_path(tmp_path, runs.REFIT), (old, old))
    runs.claim_path(tmp_path, 3).write_text("")               # its writer is between create and write
    runs.remove_stale_claims(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.claim")) == ["fold0.claim", "fold3.claim"]  # alive, or young


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")


@LINUX
def test_a_zombie_is_no_live_process():
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, and stays a zombie until waited for
    try:
        deadline = time.time() + 30
        while common.process_alive(child.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not common.process_alive(child.pid)
        assert os.waitpid(child.pid, os.WNOHANG) == (child.pid, 0)  # it was a zombie: still ours to reap
    finally:
        child.poll()
    assert common.process_alive(os.getpid())


def test_the_first_holder_of_a_run_frees_every_claim_whatever_its_pid_names_now(tmp_path):
    """Every claiming process holds the run: once nobody does, every claim is stale, also one whose
    pid now names another live process (pid 1: a reused pid; a folder copied from another machine)."""
    runs.claim_path(tmp_path, 1).write_text("1\n")
    runs.remove_stale_claims(tmp_path)
    assert runs.claim_path(tmp_path, 1).exists()  # by its pid alone it looks alive
    with runs.hold(tmp_path, {"config_hash": "a"}):
        assert not list(tmp_path.glob("*.claim"))
        assert runs.claim_fold(tmp_path, 1)
        with runs.hold(tmp_path, {"config_hash": "a"}):  # a second holder joins: the claims stay
            assert runs.claim_path(tmp_path, 1).exists()


PARENT_OF_A_WORKER = """
import os, sys, time
from mmctr import train

def sleeper(pid_file):
    open(pid_file, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    train.run_worker_processes(sleeper, {"sleeper": (sys.argv[1],)})
"""


CLEANING_WORKER = """
import os, sys, time
from mmctr import train

def cleaner(pid_file, flag):
    open(pid_file, "w").write(str(os.getpid()))
    try:
        time.sleep(120)
    except KeyboardInterrupt:  # a trial marked failed, a claim released: it takes a moment
        time.sleep(0.5)
        open(flag, "w").write("cleaned")

if __name__ == "__main__":
    train.run_worker_processes(cleaner, {"cleaner": (sys.argv[1], sys.argv[2])})
"""


@LINUX
def test_a_terminals_ctrl_c_lets_the_workers_clean_up(tmp_path):
    """A Ctrl-C at a terminal reaches the whole process group: the workers are not killed while they
    handle it."""
    script = tmp_path / "parent.py"
    script.write_text(CLEANING_WORKER)
    pid_file, flag = tmp_path / "worker.pid", tmp_path / "cleaned"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file), str(flag)], env=ONE_THREAD_ENV,
                              start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(parent.pid, signal.SIGINT)
        parent.wait(timeout=30)
        assert flag.read_text() == "cleaned"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


@LINUX
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_worker_dies_with_the_process_that_started_it(tmp_path, stop):
    """A killed run leaves no worker behind: it would train on into a folder a rerun takes over. A
    Ctrl-C sent to the parent alone (not its process group) stops the workers too, at once."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_OF_A_WORKER)
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], env=ONE_THREAD_ENV)
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert common.process_alive(worker)
        parent.send_signal(stop)
        parent.wait(timeout=30)
        deadline = time.time() + 30
        while common.process_alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not common.process_alive(worker)
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text() and common.process_alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_two_workers_train_each_fold_once_into_the_sequential_runs_files(three_folds, sequential, capfd):
    with single_thread():
        run_dir = train.run_training(model_cfg(three_folds, "two_workers"), devices=["cpu", "cpu"])
    log = capfd.readouterr().out
    for k in range(FOLDS):
        assert len(re.findall(rf"fold {k} done:", log)) == 1, log  # claimed and trained exactly once
    assert "with 2 workers on cpu, cpu" in log
    assert_same_bytes(run_dir, sequential)
    assert not list(run_dir.glob("*.claim")), "every claim released"


@pytest.mark.slow
def test_a_worker_killed_mid_fold_costs_a_rerun_of_its_fold_only(three_folds, sequential, tmp_path):
    config = tmp_path / "qin.yaml"
    common.write_yaml(config, model_cfg(three_folds, "killed"))
    command = [sys.executable, str(common.REPO_ROOT / "src" / "train.py"), "--config", str(config),
               "--devices", "cpu,cpu"]
    run_dir = runs.run_dir(model_cfg(three_folds, "killed"))

    killed = None
    with open(tmp_path / "killed.log", "w") as log:
        parent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD_ENV)
        try:
            deadline = time.time() + 600
            # a fold has finished an epoch but is not done: kill the worker that holds its claim
            while parent.poll() is None and killed is None:
                assert time.time() < deadline, "no fold ever started"
                for k in range(FOLDS):
                    owner = runs.claim_owner(runs.claim_path(run_dir, k))
                    if owner and (run_dir / f"fold{k}" / "history.json").exists() and not runs.fold_done(run_dir, k):
                        os.kill(owner, signal.SIGKILL)
                        killed = k
                        break
                time.sleep(0.01)
            parent.wait(timeout=600)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    output = (tmp_path / "killed.log").read_text()
    assert killed is not None, "the run ended before a worker could be killed"
    assert parent.returncode == 2, output
    assert not runs.fold_done(run_dir, killed), "killed too late: the fold had finished"
    assert "exited with -9 (killed by a signal)" in output and f"folds [{killed}] are not done" in output
    # the surviving worker trained every other fold, and nobody wrote the aggregates
    assert [k for k in range(FOLDS) if not runs.fold_done(run_dir, k)] == [killed], output
    assert runs.claim_path(run_dir, killed).exists() and not (run_dir / "oof.parquet").exists()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    # the rerun holds the run alone: the killed worker's claim is of a run that has ended
    assert f"fold{killed}.claim: left by a run that has ended: the fold is free again" in rerun.stdout
    assert len(re.findall(r"fold \d done:", rerun.stdout)) == 1, rerun.stdout  # only the killed fold
    assert_same_bytes(run_dir, sequential)
    assert not list(run_dir.glob("*.claim"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run.sh --gpus would train")
def test_run_sh_gpus_hands_one_cuda_device_per_gpu_to_train_py(tmp_path):
    bad = subprocess.run(["bash", "run.sh", "--gpus", "0,x"], cwd=common.REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--gpus must be GPU numbers" in bad.stderr
    result = subprocess.run(["bash", "run.sh", "--preset", "tiny", "--data-root", str(tmp_path / "data"),
                             "--submissions", str(tmp_path / "sub"), "--gpus", "0,1"],
                            cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=600)
    # this machine has no GPU: train.py names the first device run.sh made of --gpus, and stops
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: device cuda:0: torch sees no CUDA device"


def test_a_missing_fold_another_live_process_trains_is_named_with_its_process(tmp_path, capsys):
    """Two train.py on one run: the second skips the fold the first holds, and says who trains it."""
    from mmctr import train
    assert runs.claim_fold(tmp_path, 1)
    train.print_summary(tmp_path, done=[], missing=[0, 1], metrics=None, seconds=0.0)
    out = capsys.readouterr().out
    assert f"with --folds 0,1; fold 1 is being trained by process {os.getpid()})" in out
    assert "fold 0 is being trained" not in out
