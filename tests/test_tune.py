"""src/tune.py: the search space checked before any trial, a study on the tiny preset, the same
trials from the same seed, pruning, a SIGKILL mid-trial resumed without a lost or doubled trial,
two workers on one SQLite study, and the best trial as a config train.py takes."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from mmctr import common
from mmctr import experiments
from mmctr import preprocess
from mmctr import processed_data
from mmctr import runs
from mmctr import train
from mmctr import tune
from mmctr.common import UserError
from helpers import ONE_THREAD_ENV, assert_user_error

SRC = common.REPO_ROOT / "src"
SPACE = {"train.lr": {"type": "float", "low": 1.0e-3, "high": 5.0e-3, "log": True},
         "model.emb_dim": {"type": "int", "low": 8, "high": 16, "step": 8},
         "train.batch_size": {"type": "categorical", "choices": [512, 1024]}}


@pytest.fixture(scope="module")
def work(tiny_raw, tmp_path_factory):
    """The tiny data, processed once for every study here."""
    folder = tmp_path_factory.mktemp("tune_work")
    preprocess.run_preprocess({"data": {"raw_dir": str(tiny_raw), "work_dir": str(folder)}})
    return folder


# the trials of tiny models: one thread is faster than two busy ones
pytestmark = pytest.mark.usefixtures("one_thread")


def tune_file(tmp_path: Path, tiny_raw: Path, work: Path, **tune_keys) -> Path:
    settings = {"study": "s", "n_trials": 3, "seed": 7, "startup_trials": 2, "pruner": "none",
                "space": SPACE, **tune_keys}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(common.CONFIG_DIR / "qin_small.yaml"),
        "data": {"raw_dir": str(tiny_raw), "work_dir": str(work)},
        "train": {"max_epochs": 2, "eval_batch_size": 2048},
        "tune": settings}))
    return path


def run_tune(path: Path, *args: str, wait: bool = True):
    command = [sys.executable, str(SRC / "tune.py"), "--config", str(path), "--device", "cpu", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ONE_THREAD_ENV)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV)


def study_of(work: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'tune' / f'{name}.db'}")


FIXED = {"config_hash": "c0", "data_fingerprint": "d0"}  # what a test's trials have in common


def params_of(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]


# ---------------------------------------------------------------------------------------------
# the space file
# ---------------------------------------------------------------------------------------------

BAD_SPACES = {
    "unknown tune key": ({"n_trial": 3}, "tune.n_trial", "unknown key"),
    "key the config lacks": ({"space": {"model.emb_dims": {"type": "int", "low": 8, "high": 16}}},
                             "tune.space.model.emb_dims", "unknown config key 'emb_dims'"),
    "unknown entry key": ({"space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "logg": True}}},
                          "tune.space.train.lr.logg", "unknown key"),
    "low above high": ({"space": {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}},
                       "tune.space.train.lr", "low (0.01) must not exceed high (0.001)"),
    "log from zero": ({"space": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "log": True}}},
                      "tune.space.model.dropout", "log: true needs low > 0"),
    "categorical without choices": ({"space": {"train.batch_size": {"type": "categorical"}}},
                                    "tune.space.train.batch_size", "needs choices"),
    "a list as a choice": ({"space": {"model.mlp_hidden": {"type": "categorical", "choices": [[64, 32]]}}},
                           "tune.space.model.mlp_hidden", "a list as a YAML string"),
    "fractional int": ({"space": {"model.emb_dim": {"type": "int", "low": 8, "high": 16.5}}},
                       "tune.space.model.emb_dim", "whole low, high and step"),
    "out of the config's bounds": ({"space": {"model.dropout": {"type": "float", "low": 0.0, "high": 1.5}}},
                                   "tune.space.model.dropout = 1.5", "model.dropout"),
    "wrong type for the key": ({"space": {"train.batch_size": {"type": "categorical", "choices": ["big"]}}},
                               "tune.space.train.batch_size = 'big'", "train.batch_size"),
    "empty space": ({"space": {}}, "tune.space must map config keys"),
    "a step of zero": ({"space": {"model.emb_dim": {"type": "int", "low": 8, "high": 16, "step": 0}}},
                       "tune.space.model.emb_dim", "step must be positive, got 0"),
    "a negative step": ({"space": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": -0.1}}},
                        "tune.space.model.dropout", "step must be positive, got -0.1"),
    # the trials would draw 9.23: the ends 8.0 and 16.0 alone pass as integers
    "a float range on an integer key": ({"space": {"model.emb_dim": {"type": "float", "low": 8, "high": 16}}},
                                        "tune.space.model.emb_dim = 11.05", "must be an integer"),
    "a data setting": ({"space": {"data.fold_seed": {"type": "int", "low": 1, "high": 9}}},
                       "tune.space.data.fold_seed", "data and run settings are not searched"),
    "a run setting": ({"space": {"run.name": {"type": "categorical", "choices": ["a", "b"]}}},
                      "tune.space.run.name", "data and run settings are not searched"),
    "a study name no run folder takes": ({"study": "my study"}, "tune.study 'my study' names the trials' run folders",
                                         "letters, digits, _ . - only"),
    "bad objective": ({"objective": "test"}, "tune.objective", "fold0 or oof"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_a_bad_space_file_is_one_line_before_any_trial(case, tiny_raw, work, tmp_path, capsys):
    keys, *fragments = BAD_SPACES[case]
    path = tune_file(tmp_path, tiny_raw, work, **{"study": f"bad{abs(hash(case))}", **keys})
    assert_user_error(lambda: tune.main(["--config", str(path), "--device", "cpu"]), *fragments)
    said = capsys.readouterr()
    assert "tune: trial" not in said.out + said.err, "no trial ran"


def test_a_space_is_checked_with_its_own_values_not_the_bases(tiny_raw, work, tmp_path):
    """A base train.lr_min of 3e-3 is below every lr the space draws, though above the base's own lr."""
    path = tune_file(tmp_path, tiny_raw, work, study="lifted",
                     space={"train.lr": {"type": "float", "low": 4.0e-3, "high": 1.0e-2}})
    text = path.read_text().replace("  max_epochs: 2\n", "  max_epochs: 2\n  lr_min: 0.003\n")
    path.write_text(text)
    settings, space, model_cfg = tune.split_config(common.load_config(path))
    assert model_cfg["train"]["lr_min"] == 0.003
    _, arrays, manifest = processed_data.load_current(model_cfg)
    tune.check_space(model_cfg, space, train.item_tables(arrays, manifest, torch.device("cpu")), settings.study)


def test_a_refused_out_makes_no_study(tiny_raw, work, tmp_path):
    """The result file is checked before the study is made: the search can be rerun with another --out
    and another space, as if it never started."""
    (tmp_path / "mine.yaml").write_text("base: qin_small.yaml\n")
    path = tune_file(tmp_path, tiny_raw, work, study="refused")
    assert_user_error(lambda: tune.main(["--config", str(path), "--device", "cpu", "--out", str(tmp_path / "mine.yaml")]),
                      "not written by src/tune.py")
    assert tune.study_id(f"sqlite:///{work / 'tune' / 'refused.db'}", "refused") is None


def test_the_command_line_says_a_bad_space_in_one_line_and_exits_2(tiny_raw, work, tmp_path):
    keys, *fragments = BAD_SPACES["low above high"]
    result = run_tune(tune_file(tmp_path, tiny_raw, work, study="bad_cli", **keys))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("path", sorted((common.CONFIG_DIR / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_passes_its_checks(path, tiny_raw, work):
    settings, space, model_cfg = tune.split_config(common.load_config(
        path, [f"data.raw_dir={tiny_raw}", f"data.work_dir={work}"]))
    _, arrays, manifest = processed_data.load_current(model_cfg)
    tune.check_space(model_cfg, space, train.item_tables(arrays, manifest, torch.device("cpu")), settings.study)
    assert settings.study == path.stem and space


def test_a_study_of_three_trials_gives_runs_rows_and_a_config_train_takes(tiny_raw, work, tmp_path):
    out = tmp_path / "s_tuned.yaml"
    result = run_tune(tune_file(tmp_path, tiny_raw, work, study="three"), "--out", out, "--set", f"data.work_dir={work}")
    assert result.returncode == 0, result.stderr[-3000:]
    study = study_of(work, "three")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials:  # each trial is a run folder whose fold 0 gives the trial's value
        run = work / "runs" / f"three-t{t.number:03d}"
        assert t.user_attrs["run"] == run.name and runs.fold_metrics(run, 0)["valid_auc"] == t.value
        assert 1.0e-3 <= t.params["train.lr"] <= 5.0e-3 and t.params["model.emb_dim"] in (8, 16)
    rows = [r for r in experiments.read_log(work / "experiments.csv") if r["name"].startswith("three-t")]
    assert sorted(r["name"] for r in rows) == [f"three-t{k:03d}" for k in range(3)]
    assert all(r["kind"] == "folds" and r["folds"] == "0" and r["holdout_auc"] for r in rows)

    # the best trial as a config: train.py trains it and gets the best trial's fold 0
    assert out.read_text().startswith(tune.TUNED_MARK)
    fingerprint = common.read_json(work / "processed" / "manifest.json")["fingerprint"]
    assert f"{tune.TUNED_DATA}{fingerprint}\n" in out.read_text()
    # the command in the header trains on the data the search had: the data is the caller's
    assert f"--config {out} --set data.raw_dir={tiny_raw} --set data.work_dir={work} trains it" in out.read_text()
    cfg = common.load_config(out, [f"data.raw_dir={tiny_raw}", f"data.work_dir={work}"])
    best = study.best_trial
    assert cfg["run"]["name"] == "s_tuned" and cfg["train"]["max_epochs"] == 2
    assert {key: cfg[key.split(".")[0]][key.split(".")[1]] for key in best.params} == best.params
    run = train.run_training(cfg, folds=[0], device="cpu")
    assert runs.fold_metrics(run, 0)["valid_auc"] == best.value, "same machine: the same fold 0"
    assert "optuna-dashboard sqlite:///" in result.stdout

    # the same command again: the study has its trials, nothing more runs
    again = run_tune(tune_file(tmp_path, tiny_raw, work, study="three"), "--out", out, "--set", f"data.work_dir={work}")
    assert again.returncode == 0 and "tune: trial" not in again.stdout + again.stderr
    assert len(study_of(work, "three").get_trials()) == 3


def test_a_trial_stopped_by_ctrl_c_or_a_user_error_is_logged_without_a_traceback():
    tune.quiet_optuna()
    tune.quiet_optuna()  # twice (the main process, then a worker's call): one filter
    [handler] = [h for h in logging.getLogger("optuna").handlers]
    assert sum(isinstance(f, tune._NoTracebackOfKnownFailures) for f in handler.filters) == 1
    stream = handler.setStream(io.StringIO())  # optuna's handler writes to the stderr it found first
    try:
        for error in (KeyboardInterrupt(), UserError("train.lr must be positive"), ValueError("a bug")):
            try:
                raise error
            except BaseException:
                logging.getLogger("optuna.study._optimize").warning(f"Trial 1 failed: {error!r}", exc_info=True)
    finally:
        said = handler.setStream(stream).getvalue()
    assert said.count("Traceback") == 1 and "ValueError: a bug" in said  # a bug keeps its traceback
    assert "KeyboardInterrupt()" in said and "UserError('train.lr must be positive')" in said


def test_a_tuned_config_of_another_study_or_data_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "s_tuned.yaml"

    def check(study="s", study_id="id1", data="abc", fixed="f1", objective="fold0", value=None):
        return tune.check_out(out, study, study_id, data, fixed, objective, value)
    assert check()  # nothing there yet
    out.write_text("base: qin_small.yaml\n")
    assert_user_error(check, "not written by src/tune.py", "--out")

    def written(study_part: str, value: float = 0.8, data: str = "abc", fixed: str | None = "f1",
                measure: str = "fold 0 valid") -> None:
        out.write_text(f"{tune.TUNED_MARK}: the best of study {study_part} (trial 1, {measure} AUC {value:.6f}, "
                       f"3 finished trials)\n# searched ...\n{tune.TUNED_DATA}{data}\n"
                       + (f"{tune.TUNED_FIXED}{fixed}\n" if fixed else ""))
    written("'s' (id id1)")
    assert check(value=0.5)  # the same study, moved on: its best replaces it
    assert_user_error(lambda: check(data="xyz"), "study 's' on data abc", "on data xyz")
    assert_user_error(lambda: check(study="t"), "study 's'", "this search (fold0) is study 't'")
    # an earlier study of the same name (another database, or the shipped result): the same objective and
    # fixed settings on the same data, and replaced only by a better best
    assert check(study_id=None) and check(study_id="id2")  # before the search: it may go on
    assert check(study_id="id2", value=0.81)
    capsys.readouterr()
    assert not check(study_id="id2", value=0.79)
    assert "kept: the best of an earlier study 's' (0.800000) beats this search's (0.790000)" in capsys.readouterr().out
    assert_user_error(lambda: check(study_id="id2", fixed="f2"), "with fixed settings f1",
                      "with fixed settings f2", "--out")  # e.g. --set train.max_epochs=1: values not comparable
    assert_user_error(lambda: check(study_id="id2", objective="oof"), "the best (fold0)", "this search (oof)")
    for other in ({"fixed": "f2"}, {"objective": "oof"}):  # before a new study is made (no id yet): refused too
        assert_user_error(lambda: check(study_id=None, **other), "give --out another path")
    written("'s'", measure="OOF", fixed=None)  # written before ids: its study by name, as then
    assert check(study_id="id2", objective="oof", value=0.1)
    assert_user_error(lambda: check(study_id="id2", data="xyz", objective="oof"), "on data abc")
    # the shipped result is the demo's (docs/TUNING.md): a fresh demo search with its settings may beat it
    shipped = common.CONFIG_DIR / "qin_small_tuned.yaml"
    settings, space, model_cfg = tune.split_config(common.load_config(common.CONFIG_DIR / "tune" / "qin_small.yaml"))
    fixed = tune.trials_fingerprint(model_cfg, space, {"fingerprint": "607a15ce0353d120"})
    assert tune.tuned_header(shipped.read_text()) == {
        "study": "qin_small", "id": None, "data": "607a15ce0353d120", "fixed": fixed["config_hash"],
        "objective": "fold0", "value": 0.853959}
    assert not tune.check_out(shipped, "qin_small", "new", "607a15ce0353d120", fixed["config_hash"], "fold0", 0.85)


def test_the_same_seed_gives_the_same_trials_and_another_seed_others(tiny_raw, work, tmp_path):
    settings, space, model_cfg = tune.split_config(common.load_config(
        tune_file(tmp_path, tiny_raw, work, study="x", seed=11, n_trials=4, startup_trials=2)))

    def draws(storage: str, seed: int) -> list[dict]:
        settings.seed = seed
        study = tune.open_study(settings, storage, FIXED)
        for _ in range(4):  # ask and tell a fixed value: the sampler alone decides the parameters
            trial = study.ask()
            params = {key: tune.suggest(trial, key, spec) for key, spec in space.items()}
            study.tell(trial, params["train.lr"] * 100)
        return params_of(study)

    first = draws(f"sqlite:///{tmp_path / 'a.db'}", 11)
    assert draws(f"sqlite:///{tmp_path / 'b.db'}", 11) == first
    assert draws(f"sqlite:///{tmp_path / 'c.db'}", 12) != first
    # one study is searched one way: another seed on the same storage is refused
    with pytest.raises(UserError, match="another objective, space or seed"):
        tune.open_study(settings, f"sqlite:///{tmp_path / 'a.db'}", FIXED)


def test_a_study_takes_no_trials_of_other_fixed_settings_or_data(tiny_raw, work, tmp_path):
    """The trials of a study share every setting the search does not vary and the processed data:
    a search with another --set value or on other data is refused before its first trial."""
    config = tune_file(tmp_path, tiny_raw, work, study="fixed")
    settings, space, model_cfg = tune.split_config(common.load_config(config))
    manifest = processed_data.load_current(model_cfg)[2]
    fixed = tune.trials_fingerprint(model_cfg, space, manifest)
    storage = f"sqlite:///{tmp_path / 'fixed.db'}"
    assert tune.open_study(settings, storage, fixed).user_attrs["fixed"] == fixed
    tune.open_study(settings, storage, fixed)  # the same search again: taken
    # where the data is, which device trains, the run name and the base's values of the searched keys
    # (every trial sets its own) are no settings of the trials
    for same in (["data.raw_dir=elsewhere", "train.device=cpu"], ["run.name=other", "train.lr=0.001"],
                 ["tune.n_trials=50"]):
        assert tune.trials_fingerprint(tune.split_config(common.load_config(config, same))[2], space, manifest) == fixed
    other_setting = tune.trials_fingerprint(
        tune.split_config(common.load_config(config, ["train.max_epochs=1"]))[2], space, manifest)
    other_data = tune.trials_fingerprint(model_cfg, space, {**manifest, "fingerprint": "other"})
    for other in (other_setting, other_data):
        assert other != fixed
        with pytest.raises(UserError, match="other fixed settings or on other data"):
            tune.open_study(settings, storage, other)
    # a study made before tune recorded this takes it from the next search on
    old = f"sqlite:///{tmp_path / 'old.db'}"
    optuna.create_study(study_name="fixed", storage=old).set_user_attr("tune", {
        "seed": settings.seed, "objective": settings.objective, "space": settings.space})
    assert tune.open_study(settings, old, fixed).user_attrs["fixed"] == fixed


def test_a_diverged_trial_is_pruned_and_the_search_goes_on(tiny_raw, work, tmp_path):
    """A learning rate too high is an outcome of the search, the worst one, not a fault that stops it
    or that the next trial repeats."""
    huge_lr = {"train.lr": {"type": "float", "low": 1.0e+3, "high": 1.0e+6, "log": True}}
    config = tune_file(tmp_path, tiny_raw, work, study="diverged", n_trials=2, space=huge_lr)
    settings, space, model_cfg = tune.split_config(common.load_config(config))
    storage = f"sqlite:///{tmp_path / 'diverged.db'}"
    fixed = tune.trials_fingerprint(model_cfg, space, processed_data.load_current(model_cfg)[2])
    tune.open_study(settings, storage, fixed)
    tune.optimize(settings, space, model_cfg, storage, fixed, "cpu", str(config), [], None)
    trials = optuna.load_study(study_name="diverged", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert trials[0].params != trials[1].params


@pytest.mark.parametrize("where", ["parse_config", "run_training"])
def test_failing_trials_draw_anew_and_three_in_a_row_stop_the_search(where, tiny_raw, work, tmp_path, monkeypatch):
    """A failed trial moves the sampler's seed on (the next trial does not draw it again), whether its
    config (values that do not go together, e.g. train.lr_min above train.lr) or its training failed;
    a fault every trial meets stops the worker after three, in one line, instead of looping on."""
    config = tune_file(tmp_path, tiny_raw, work, study="failing", n_trials=5)
    settings, space, model_cfg = tune.split_config(common.load_config(config))
    storage = f"sqlite:///{tmp_path / 'failing.db'}"
    tune.open_study(settings, storage, FIXED)

    def broken(cfg, *_, **__):
        raise UserError(f"{cfg['run']['name']}: the disk is full")
    monkeypatch.setattr(train, where, broken)
    assert_user_error(lambda: tune.optimize(settings, space, model_cfg, storage, FIXED, "cpu", str(config), [], None),
                      "tune: 3 trials in a row failed (the last: failing-t002: the disk is full)", "rerun")
    trials = optuna.load_study(study_name="failing", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3, "each failed trial drew other parameters"


def test_a_new_study_is_refused_where_an_earlier_study_of_its_name_left_trial_runs(tmp_path, tiny_raw, work):
    """Its trials would move the earlier study's runs aside, and that study's trials point at them."""
    settings = tune.split_config(common.load_config(tune_file(tmp_path, tiny_raw, work, study="reused")))[0]
    runs_dir = tmp_path / "runs"
    (runs_dir / "reused-t000").mkdir(parents=True)
    assert_user_error(lambda: tune.open_study(settings, f"sqlite:///{tmp_path / 'new.db'}", FIXED, runs_dir=runs_dir),
                      "reused-t000: a trial of an earlier study 'reused'", "another tune.study name")
    storage = f"sqlite:///{tmp_path / 'own.db'}"
    tune.open_study(settings, storage, FIXED)  # its own study: the runs are its trials'
    tune.open_study(settings, storage, FIXED, runs_dir=runs_dir)


def test_a_trial_worse_than_the_median_is_pruned_after_its_first_epoch(tiny_raw, work, tmp_path):
    """Two finished trials with a valid AUC of 0.99 at every epoch (out of the tiny data's reach):
    the median pruner stops each real trial after its first epoch's report, its fold is left
    unfinished, and the search goes on to n_trials."""
    config = tune_file(tmp_path, tiny_raw, work, study="pruned", n_trials=4, pruner="median",
                       prune_startup_trials=2, prune_warmup_epochs=0)
    settings, space, model_cfg = tune.split_config(common.load_config(config))
    storage = f"sqlite:///{tmp_path / 'pruned.db'}"
    fixed = tune.trials_fingerprint(model_cfg, space, processed_data.load_current(model_cfg)[2])
    study = tune.open_study(settings, storage, fixed)
    distributions = {key: optuna.distributions.FloatDistribution(1e-3, 5e-3, log=True) if key == "train.lr" else
                     optuna.distributions.IntDistribution(8, 16, step=8) if key == "model.emb_dim" else
                     optuna.distributions.CategoricalDistribution([512, 1024]) for key in space}
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": 2e-3, "model.emb_dim": 8, "train.batch_size": 512}, distributions=distributions,
            value=0.99, intermediate_values={1: 0.99, 2: 0.99}))
    tune.optimize(settings, space, model_cfg, storage, fixed, "cpu", str(config), [], None)
    trials = optuna.load_study(study_name="pruned", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    for t in trials[2:]:
        assert list(t.intermediate_values) == [1] and t.intermediate_values[1] < 0.9, "stopped at its first epoch"
        run = work / "runs" / t.user_attrs["run"]
        assert (run / "fold0" / "history.json").is_file() and not runs.fold_done(run, 0)


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_without_a_lost_or_doubled_trial(tiny_raw, work, tmp_path):
    reference = run_tune(tune_file(tmp_path, tiny_raw, work, study="reference", seed=3), "--out", tmp_path / "r.yaml")
    assert reference.returncode == 0, reference.stderr[-3000:]
    config = tune_file(tmp_path, tiny_raw, work, study="killed", seed=3)
    process = run_tune(config, "--out", tmp_path / "k.yaml", wait=False)
    history = work / "runs" / "killed-t001" / "fold0" / "history.json"
    try:
        deadline = time.time() + 300
        while not history.exists():  # trial 1 has finished an epoch, not its fold
            assert process.poll() is None and time.time() < deadline, process.stdout.read()
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not runs.fold_done(work / "runs" / "killed-t001", 0), "killed too late: trial 1 had finished"

    resumed = run_tune(config, "--out", tmp_path / "k.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trial 1 was left unfinished" in resumed.stdout + resumed.stderr
    study = study_of(work, "killed")
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and "RUNNING" not in states, states
    # the same three trials as the uninterrupted search: the retry has trial 1's parameters, and
    # the trial after it draws what the uninterrupted trial 2 drew
    assert params_of(study) == params_of(study_of(work, "reference"))
    assert [t.value for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))] == \
        [t.value for t in study_of(work, "reference").get_trials(states=(optuna.trial.TrialState.COMPLETE,))]


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tiny_raw, work, tmp_path):
    config = tune_file(tmp_path, tiny_raw, work, study="pair", n_trials=4)
    result = subprocess.run([sys.executable, str(SRC / "tune.py"), "--config", str(config), "--devices", "cpu,cpu",
                             "--out", str(tmp_path / "p.yaml")], capture_output=True, text=True, timeout=600,
                            env=ONE_THREAD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_of(work, "pair").get_trials()
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(finished) <= 5, [t.state for t in trials]  # two last trials may start at once
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2, "both workers ran trials"
    names = [t.user_attrs["run"] for t in finished]
    assert len(set(names)) == len(names) and all(runs.fold_done(work / "runs" / n, 0) for n in names)


@pytest.mark.slow
def test_the_dashboard_serves_the_study_and_its_trials(tiny_raw, work, tmp_path):
    """optuna-dashboard on a study tune.py made: its API (what the web page draws from) lists the
    study and every trial with its value and parameters."""
    settings, space, _ = tune.split_config(common.load_config(tune_file(tmp_path, tiny_raw, work, study="shown")))
    storage = f"sqlite:///{tmp_path / 'shown.db'}"
    study = tune.open_study(settings, storage, FIXED)
    for value in (0.61, 0.63):
        trial = study.ask()
        for key, spec in space.items():
            tune.suggest(trial, key, spec)
        study.tell(trial, value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", f"from optuna_dashboard import run_server; "
                               f"run_server({storage!r}, host='127.0.0.1', port={port})"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the dashboard did not start"
                time.sleep(0.2)
        [summary] = [s for s in studies if s["study_name"] == "shown"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=5) as response:
            trials = json.load(response)["trials"]
        assert [t["values"] for t in trials] == [[0.61], [0.63]]
        assert {p["name"] for p in trials[0]["params"]} == set(space)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as response:
            assert b"Optuna Dashboard" in response.read()
    finally:
        server.kill()
        server.wait()
