"""Hyperparameter search over any model config: Optuna, a study in a real database, pruning.

    python src/tune.py --config configs/tune/qin_small.yaml [--set tune.n_trials=40] [--set data.raw_dir=...]
    python src/tune.py --config configs/tune/qin_small.yaml --devices cuda:0,cuda:1   # one worker per GPU
    python src/tune.py --config ... --storage postgresql://user@host/db              # several machines (a driver:
                                                                                      # pip install psycopg2-binary)

A tune config is a model config (``base: ../qin_small.yaml``) plus a ``tune:`` section: the study's
name, the objective (``fold0``: fold 0's valid AUC; ``oof``: the OOF AUC over every fold), the
number of trials, a time budget, the sampler's seed, the pruner, and the search space, one entry
per dotted config key:

    space:
      train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      model.emb_dim: {type: int, low: 8, high: 32, step: 8}
      model.mlp_hidden: {type: categorical, choices: ["[128, 64]", "[256, 128]"]}   # YAML values

Every key is checked against the model config (its bounds too, and a value inside a float range)
before any trial runs; a trial that diverges is pruned, three failed trials in a row stop the search.

Outputs, all resumable (the same command continues a killed search, retrying a trial its process
did not finish, with the same parameters):
- ``{work_dir}/tune/<study>.db``: the study (SQLite; ``--storage`` takes any SQLAlchemy URL).
  Look at it with ``optuna-dashboard sqlite:///{work_dir}/tune/<study>.db``: the trials, the
  history, parameter importances, parallel coordinates.
- one run folder per trial, ``{work_dir}/runs/<study>-t<NNN>/`` (src/mmctr/runs.py), and one row per
  finished trial in ``{work_dir}/experiments.csv``;
- the best trial as a ready config, ``configs/<study>_tuned.yaml`` (``--out``): ``src/train.py
  --config`` trains it and ``run.sh --models <study>_tuned`` runs it with the rest.
"""
from __future__ import annotations

import argparse
import copy
import glob
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
import yaml

from mmctr import common
from mmctr import experiments
from mmctr import model_config
from mmctr import processed_data
from mmctr import runs
from mmctr import train
from mmctr.common import UserError

TUNED_MARK = "# Written by src/tune.py"
TUNED_DATA = "# on processed data "  # + the data fingerprint the trials trained on


@dataclass
class ParamSpec:
    """One entry of tune.space: how a config key is drawn."""
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False                 # float/int: draw on a log scale
    step: float | None = None         # float/int: a grid step
    choices: list[Any] | None = None  # categorical: values as written in YAML ("[128, 64]" for a list)


@dataclass
class TuneConfig:
    study: str = field(metadata={"nonempty": True})  # names the database, the trials' runs and the tuned config
    objective: Literal["fold0", "oof"] = "fold0"     # fold 0's valid AUC, or the OOF AUC over every fold
    n_trials: int = field(default=20, metadata={"min": 1})   # finished (complete or pruned) trials in the study
    timeout_s: float | None = field(default=None, metadata={"positive": True})  # this command's budget
    seed: int = 20250101                              # the sampler's: same seed, same storage, same trials
    startup_trials: int = field(default=5, metadata={"min": 0})  # random trials before TPE models the space
    pruner: Literal["median", "hyperband", "none"] = "median"
    prune_startup_trials: int = field(default=3, metadata={"min": 0})  # median: completed trials before pruning
    prune_warmup_epochs: int = field(default=1, metadata={"min": 0})   # epochs a trial runs before it can be pruned
    space: dict = field(default_factory=dict)         # checked entry by entry (ParamSpec)


# ---------------------------------------------------------------------------------------------
# the tune config
# ---------------------------------------------------------------------------------------------

def split_config(cfg: dict) -> tuple[TuneConfig, dict[str, ParamSpec], dict]:
    """(tune settings, space, the model config without its tune section)."""
    if not isinstance(cfg.get("tune"), dict):
        raise UserError("config: missing section 'tune:' (give a tune config, e.g. --config "
                        "configs/tune/qin_small.yaml)")
    model_cfg = {key: value for key, value in cfg.items() if key != "tune"}
    raw = dict(cfg["tune"])
    space_raw = raw.pop("space", None)
    settings = common.typed_section(TuneConfig, raw, "tune")
    if not isinstance(space_raw, dict) or not space_raw:
        raise UserError("config: tune.space must map config keys to distributions, e.g. "
                        "train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}")
    space = {str(key): checked_spec(str(key), spec) for key, spec in space_raw.items()}
    settings.space = {key: vars(spec) for key, spec in space.items()}
    return settings, space, model_cfg


def checked_spec(key: str, raw: Any) -> ParamSpec:
    where = f"tune.space.{key}"
    if key.split(".")[0] in ("data", "run"):  # the processed data is built once; run.name is the trial's
        raise UserError(f"config: {where}: data and run settings are not searched (a trial trains on the data "
                        f"the search was given, as run <study>-tNNN); search model and train keys")
    spec = common.typed_section(ParamSpec, raw, where)
    if spec.type == "categorical":
        if not spec.choices:
            raise UserError(f"config: {where}: a categorical entry needs choices: [...]")
        extra = [name for name in ("low", "high", "step") if getattr(spec, name) is not None] + (["log"] if spec.log else [])
        bad = [c for c in spec.choices if not isinstance(c, (bool, int, float, str))]
        if extra or bad:
            raise UserError(f"config: {where}: a categorical entry takes choices only, each a number, true/false "
                            f"or a string (a list as a YAML string, \"[128, 64]\"); got "
                            f"{', '.join(extra) or repr(bad[0])}")
        return spec
    if spec.low is None or spec.high is None or spec.choices is not None:
        raise UserError(f"config: {where}: a {spec.type} entry needs low and high (and no choices)")
    if not spec.low <= spec.high:
        raise UserError(f"config: {where}: low ({spec.low:g}) must not exceed high ({spec.high:g})")
    if spec.step is not None and not spec.step > 0:
        raise UserError(f"config: {where}: step must be positive, got {spec.step:g}")
    if spec.log and (spec.low <= 0 or spec.step is not None):
        raise UserError(f"config: {where}: log: true needs low > 0 and no step")
    if spec.type == "int" and any(v is not None and float(v) != int(v) for v in (spec.low, spec.high, spec.step)):
        raise UserError(f"config: {where}: an int entry needs whole low, high and step")
    return spec


def suggest(trial: optuna.Trial, key: str, spec: ParamSpec):
    if spec.type == "float":
        return trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)
    if spec.type == "int":
        return trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return trial.suggest_categorical(key, spec.choices)


def overrides_of(params: dict) -> list[str]:
    """A trial's parameters as --set assignments (values as YAML, so "[128, 64]" is a list)."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            if not isinstance(value, str) else f"{key}={value}" for key, value in params.items()]


def run_name(study: str, number: int) -> str:
    return f"{study}-t{number:03d}"


def trial_config(model_cfg: dict, params: dict, name: str) -> dict:
    """The model config of one trial: the parameters applied (unknown keys are errors), its run name."""
    cfg = copy.deepcopy(model_cfg)
    for assignment in overrides_of(params) + [f"run.name={name}"]:
        common.apply_override(cfg, assignment)
    return cfg


def range_ends(spec: ParamSpec) -> list:
    """The values at the ends of a parameter's range, as a trial gets them: every choice of a
    categorical, else low and high (whole numbers for an int)."""
    if spec.type == "categorical":
        return list(spec.choices)
    return [int(v) if spec.type == "int" else v for v in (spec.low, spec.high)]


def probe_values(spec: ParamSpec) -> list:
    """The ends of a parameter's range and, for a float without a step, a value inside it, as a
    trial may draw it (8.73 on an integer key fails where 8.0 and 16.0 pass)."""
    values = range_ends(spec)
    if spec.type == "float" and spec.step is None and spec.low < spec.high:
        inside = 0.382  # a fraction no grid of round numbers holds
        values.append(spec.low * (spec.high / spec.low) ** inside if spec.log
                      else spec.low + (spec.high - spec.low) * inside)
    return values


def check_space(model_cfg: dict, space: dict[str, ParamSpec], tables: dict, study: str) -> None:
    """The study's name makes valid run names; every key exists in the model config and each end of
    its range (every choice), and a value inside it, passes the config's own checks: one line now,
    not the same failure at every trial."""
    if not re.fullmatch(train.RUN_NAME, run_name(study, 0)):
        raise UserError(f"config: tune.study {study!r} names the trials' run folders ({run_name(study, 0)}): "
                        f"letters, digits, _ . - only, not starting with . - or _")
    for key, spec in space.items():
        for value in probe_values(spec):
            try:
                cfg = trial_config(model_cfg, {key: value}, run_name(study, 0))
                cfg = train.checked_config(cfg, "cpu")
                with torch.device("meta"):
                    model_config.build_model(cfg["model"], tables)
            except UserError as exc:
                raise UserError(f"config: tune.space.{key} = {value!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------

def counts_for_the_seed(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial but one its killed process left unfinished (failed, then queued again): a search
    resumed after a kill draws what the uninterrupted one would have drawn, and a trial that failed
    (its user attribute ``failed``) moves the seed on, so the next one does not draw it again."""
    return trial.state != optuna.trial.TrialState.FAIL or "failed" in trial.user_attrs


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random state is a function of (seed, how many trials came before that count for
    it: counts_for_the_seed)."""

    def __init__(self, seed: int, startup_trials: int):
        self.seed, self.startup_trials = seed, startup_trials
        self._sampler, self._for_trial = None, None

    def _tpe(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.samplers.TPESampler:
        if self._for_trial != trial.number:
            before = [t for t in study.get_trials(deepcopy=False)
                      if t.number < trial.number and counts_for_the_seed(t)]
            self._sampler = optuna.samplers.TPESampler(seed=(self.seed * 1_000_003 + len(before)) % 2**32,
                                                       n_startup_trials=self.startup_trials)
            self._for_trial = trial.number
        return self._sampler

    def infer_relative_search_space(self, study, trial):
        return self._tpe(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._tpe(study, trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._tpe(study, trial).after_trial(study, trial, state, values)


def make_pruner(settings: TuneConfig) -> optuna.pruners.BasePruner:
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup_trials,
                                           n_warmup_steps=settings.prune_warmup_epochs)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.prune_warmup_epochs))
    return optuna.pruners.NopPruner()


def default_storage(model_cfg: dict, study: str) -> str:
    folder = common.require_writable_folder(common.data_paths(model_cfg)["work"] / "tune", "the study's folder")
    return f"sqlite:///{(folder / f'{study}.db').resolve()}"


def trials_fingerprint(model_cfg: dict, space: dict[str, ParamSpec], manifest: dict) -> dict:
    """What every trial of a search has in common: the config and --set values it does not vary and
    the processed data (a run's fingerprint, train.fingerprint_of, of the config with every searched
    key at one value and one run name: the base's values of those keys reach no trial). Trials are
    comparable, and the best one a config to train, only under one."""
    anchor = {key: range_ends(spec)[0] for key, spec in space.items()}
    return train.fingerprint_of(train.parse_config(trial_config(model_cfg, anchor, "trial"), None)[0], manifest)


def rdb_storage(storage_url: str) -> optuna.storages.RDBStorage:
    # a generous SQLite timeout: several workers write to one file
    engine = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(storage_url, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001: a bad URL or an unreachable server, in the user's words
        raise UserError(f"the study's database {storage_url}: cannot open ({common.first_line(exc)})") from None


def study_id(storage_url: str, name: str) -> str | None:
    """The id of the study ``name`` in the database, None while there is none (nothing is created)."""
    storage = rdb_storage(storage_url)
    if not study_exists(storage, name):
        return None
    return storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get("id")


def open_study(settings: TuneConfig, storage_url: str, fixed: dict, runs_dir: Path | None = None) -> optuna.Study:
    """The study, created or checked against this search's settings. ``runs_dir`` (the first opening
    only): a new study whose trials' run folders are there already, from an earlier study of that
    name (another database, or one deleted), is refused: its trials would move them aside."""
    storage = rdb_storage(storage_url)
    if runs_dir is not None and not study_exists(storage, settings.study):
        earlier = sorted(runs_dir.glob(f"{glob.escape(settings.study)}-t[0-9][0-9][0-9]*"))
        if earlier:
            raise UserError(f"{earlier[0]}: a trial of an earlier study '{settings.study}' (not in {storage_url}): "
                            f"give this search another tune.study name, or move that study's runs away")
    study = optuna.create_study(study_name=settings.study, storage=storage, direction="maximize",
                                sampler=TrialSeededTPE(settings.seed, settings.startup_trials),
                                pruner=make_pruner(settings), load_if_exists=True)
    recorded = study.user_attrs.get("tune")
    ours = {"seed": settings.seed, "objective": settings.objective, "space": settings.space}
    if "id" not in study.user_attrs:  # which study a tuned config came from: names repeat across databases
        study.set_user_attr("id", uuid.uuid4().hex[:12])
    if recorded is None:
        study.set_user_attr("tune", ours)
    elif recorded != ours:
        raise UserError(f"{storage_url}: study '{settings.study}' was searched with another objective, space or "
                        f"seed ({recorded}); give this search another tune.study name")
    recorded_fixed = study.user_attrs.get("fixed")
    if recorded_fixed is None:  # a new study, or one made before tune recorded it: from now on, this
        study.set_user_attr("fixed", fixed)
    elif recorded_fixed != fixed:
        raise UserError(f"{storage_url}: study '{settings.study}' was searched with other fixed settings or on "
                        f"other data (config {recorded_fixed.get('config_hash')}, data "
                        f"{recorded_fixed.get('data_fingerprint')}; this search: config {fixed['config_hash']}, "
                        f"data {fixed['data_fingerprint']}): its trials would not compare; give this search another "
                        f"tune.study name")
    return study


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
FAILURES_IN_A_ROW = 3  # a worker stops after this many failed trials with no finished one between


def retry_abandoned_trials(study: optuna.Study) -> None:
    """A trial left RUNNING by a process of this machine that is gone (killed) is marked failed and
    its parameters queued again, so the search neither loses it nor counts it twice."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") != host or common.process_alive(int(worker.get("pid", 0))):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker of this search has just done it
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        common.log(f"tune: trial {trial.number} was left unfinished by process {worker.get('pid')}: "
                   f"queued again with the same parameters")


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ---------------------------------------------------------------------------------------------
# one trial
# ---------------------------------------------------------------------------------------------

def objective_for(settings: TuneConfig, space: dict[str, ParamSpec], model_cfg: dict, device: str,
                  config_file: str, overrides: list[str]):
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        params = {key: suggest(trial, key, spec) for key, spec in space.items()}
        name = run_name(settings.study, trial.number)
        trial.set_user_attr("run", name)
        common.log(f"tune: trial {trial.number} ({name}): {', '.join(overrides_of(params))}")
        try:
            return run_trial(trial, params, name)
        except train.TrainingDiverged as exc:  # a learning rate too high: the worst outcome, not a fault
            common.log(f"tune: trial {trial.number} pruned: {exc}")
            raise optuna.TrialPruned() from None
        except UserError as exc:  # e.g. values that do not go together (train.lr_min above train.lr)
            trial.set_user_attr("failed", common.first_line(exc))
            raise

    def run_trial(trial: optuna.Trial, params: dict, name: str) -> float:
        cfg = trial_config(model_cfg, params, name)
        max_epochs = train.parse_config(cfg, device)[1].max_epochs

        def report(fold, record: dict) -> None:  # each epoch's valid AUC; the pruner may stop here
            step = int(fold) * max_epochs + record["epoch"]
            trial.report(record["valid_auc"], step)
            if trial.should_prune():
                common.log(f"tune: trial {trial.number} pruned at fold {fold} epoch {record['epoch']} "
                           f"(valid AUC {record['valid_auc']:.6f})")
                raise optuna.TrialPruned()

        folds = [0] if settings.objective == "fold0" else None
        run_dir = train.run_training(cfg, folds=folds, device=device, epoch_hook=report)
        experiments.record_run(cfg, config_file, overrides + overrides_of(params) + [f"run.name={name}"],
                               folds=folds)
        if settings.objective == "fold0":
            return float(runs.fold_metrics(run_dir, 0)["valid_auc"])
        return float(runs.read_metrics(run_dir)["oof_auc"])

    return objective


def optimize(settings: TuneConfig, space: dict[str, ParamSpec], model_cfg: dict, storage_url: str, fixed: dict,
             device: str, config_file: str, overrides: list[str], deadline: float | None) -> None:
    """One worker's loop: run trials until the study has tune.n_trials finished ones or time is up."""
    study = open_study(settings, storage_url, fixed)
    retry_abandoned_trials(study)
    objective = objective_for(settings, space, model_cfg, device, config_file, overrides)
    # one trial per call, so the count (shared by every worker) and the time budget are looked at
    # between trials; workers starting their last trials at once may finish a few more than n_trials
    failures: list[str] = []  # this worker's trials that failed since its last finished one

    def count_failures(_, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            failures.append(trial.user_attrs.get("failed", "failed"))
        else:
            failures.clear()
    while finished_trials(study) < settings.n_trials:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            break
        study.optimize(objective, n_trials=1, timeout=left, catch=(UserError,), gc_after_trial=False,
                       show_progress_bar=False, callbacks=[count_failures])
        if len(failures) >= FAILURES_IN_A_ROW:  # a fault every trial meets: searching on repeats it
            raise UserError(f"tune: {len(failures)} trials in a row failed (the last: {failures[-1]}): fix that, "
                            f"then rerun the same command to continue the search")


class _NoTracebackOfKnownFailures(logging.Filter):
    """Optuna logs a failed trial with its traceback. For a Ctrl-C, or a UserError (whose one line
    tune already printed), the line "Trial N failed ... because of the following error: ..." says
    it all: the traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, UserError)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_optuna() -> None:
    """Optuna's warnings only (the trials' own lines say what happens), without the tracebacks of
    known failures; in the main process and in every worker."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:  # optuna's own handler: every record of its modules
        if not any(isinstance(f, _NoTracebackOfKnownFailures) for f in handler.filters):
            handler.addFilter(_NoTracebackOfKnownFailures())


def worker(settings: TuneConfig, space: dict, model_cfg: dict, storage_url: str, fixed: dict, device: str,
           config_file: str, overrides: list[str], deadline: float | None, threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_optuna()
    common.run_main(lambda: optimize(settings, space, model_cfg, storage_url, fixed, device, config_file, overrides,
                                     deadline))


# ---------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------

TUNED_FIXED = "# with fixed settings "  # + the config hash of what every trial shared (trials_fingerprint)
OBJECTIVE_TEXT = {"fold0": "fold 0 valid", "oof": "OOF"}  # tune.objective as the header names it


def tuned_header(text: str) -> dict:
    """What the header of a tuned config records: study name and id, data fingerprint, fixed
    settings' hash and best value (None where a file of an older version has none)."""
    def find(pattern: str) -> str | None:
        match = re.search(pattern, text, re.M)
        return match and match.group(1)
    value = find(r"^# Written by .* AUC (\d+\.\d+)")
    objective = find(rf"^# Written by .*, ({'|'.join(OBJECTIVE_TEXT.values())}) AUC ")
    return {"study": find(r"the best of study '([^']*)'"), "id": find(r"the best of study '[^']*' \(id (\w+)\)"),
            "data": find(rf"^{re.escape(TUNED_DATA)}(\S+)"), "fixed": find(rf"^{re.escape(TUNED_FIXED)}(\S+)"),
            "objective": {text: name for name, text in OBJECTIVE_TEXT.items()}.get(objective),
            "value": None if value is None else float(value)}


def check_out(out: Path, study: str, study_id: str | None, data_fingerprint: str, fixed_hash: str, objective: str,
              value: float | None = None) -> bool:
    """May ``out`` be written? True where it does not exist or tune.py wrote it for this very study (its
    id: the study has moved on since; a file from before ids were recorded, by its name), or for an
    earlier study of the same name, objective and fixed settings on the same data (e.g. the shipped
    demo result) that ``value``, this search's best, beats; False where that earlier best is as
    good (kept, and said). A file tune.py did not write, or another study's, data's, objective's or
    fixed settings' best, is the user's result: a UserError, before the search (``value`` None)
    and again before the write."""
    if not out.exists():
        return True
    text = out.read_text()
    if not text.startswith(TUNED_MARK):
        raise UserError(f"{out}: exists and was not written by src/tune.py; give --out another path")
    there = tuned_header(text)
    # a file from before ids and fixed settings were recorded is its study's by name; any other is the
    # study's with its id alone (none yet, before a new study is made: another study's)
    same_study = (study_id is not None and there["id"] == study_id) if there["id"] or there["fixed"] else True
    if there["study"] == study and same_study and there["data"] == data_fingerprint:
        return True
    if (there["study"], there["data"], there["fixed"], there["objective"]) != (study, data_fingerprint, fixed_hash,
                                                                               objective):
        raise UserError(f"{out}: holds the best ({there['objective']}) of study '{there['study']}' on data "
                        f"{there['data'] or '(not recorded)'} with fixed settings {there['fixed'] or '(not recorded)'}, "
                        f"and this search ({objective}) is study '{study}' on data {data_fingerprint} with fixed "
                        f"settings {fixed_hash}: give --out another path, or delete that file to replace it")
    if value is None or there["value"] is None or value > there["value"]:
        return True
    common.log(f"tune: {out} kept: the best of an earlier study '{study}' ({there['value']:.6f}) beats this "
               f"search's ({value:.6f})")
    return False


def write_best_config(study: optuna.Study, settings: TuneConfig, config_file: Path, overrides: list[str],
                      out: Path, data: dict, data_fingerprint: str) -> Path | None:
    """The best trial as a config: the tune config's own sections but tune and data (data is the
    caller's, --set at run time), the search's --set values but data's, its best parameters, and
    run.name = the file's stem. Its header names the study (and its id), the processed data's fingerprint
    and the fixed settings' hash. None where check_out keeps an earlier study's better file."""
    best = study.best_trial
    raw = common.parse_yaml(config_file.read_text()) or {}
    fixed_hash = study.user_attrs["fixed"]["config_hash"]
    if not check_out(out, settings.study, study.user_attrs["id"], data_fingerprint, fixed_hash, settings.objective,
                     best.value):
        return None
    body = {key: value for key, value in raw.items() if key not in ("tune", "data")}
    if "base" in body:
        body["base"] = os.path.relpath((config_file.parent / body["base"]).resolve(), out.parent.resolve())
    cfg = {"base": body.pop("base")} if "base" in body else {}
    cfg.update(body)
    fixed = [o.split("=", 1) for o in overrides if not o.startswith("data.")]
    for key, value in fixed + [(k, v) for k, v in best.params.items()]:
        section, *path, last = key.strip().split(".")
        node = cfg.setdefault(section, {})
        for part in path:
            node = node.setdefault(part, {})
        node[last] = common.parse_yaml(value) if isinstance(value, str) else value
    cfg.setdefault("run", {})["name"] = out.stem
    # the data is the caller's: the command trains on the data the search had (its settings that
    # differ from configs/data.yaml's)
    defaults = processed_data.checked_data(common.load_config(common.CONFIG_DIR / "data.yaml"))
    data_sets = processed_data.data_set_args(data, [key for key, value in data.items() if value != defaults[key]])
    header = (f"{TUNED_MARK}: the best of study '{settings.study}' (id {study.user_attrs['id']}) (trial "
              f"{best.number}, {OBJECTIVE_TEXT[settings.objective]} AUC {best.value:.6f}, "
              f"{finished_trials(study)} finished trials)\n# searched with {shown_path(config_file)}; "
              f"python src/train.py --config {shown_path(out)}{' ' + data_sets if data_sets else ''} trains it\n"
              f"{TUNED_DATA}{data_fingerprint}\n{TUNED_FIXED}{fixed_hash}\n")
    common.write_text(out, header + common.dump_yaml(cfg))
    return out


def shown_path(path: Path) -> str:
    """``path`` relative to the repo when it is inside it (what a user types from its root)."""
    try:
        return str(path.resolve().relative_to(common.REPO_ROOT))
    except ValueError:
        return str(path)


def print_summary(study: optuna.Study, settings: TuneConfig, storage_url: str, out: Path | None,
                  seconds: float) -> None:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    print(f"\n=== tune {settings.study}: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
          + f" ({seconds:.0f} s)")
    finished = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: t.value, reverse=True)
    for t in finished[:5]:
        print(f"trial {t.number:3d}  {t.value:.6f}  " + "  ".join(overrides_of(t.params)))
    if out is not None:
        print(f"best config: {shown_path(out)}")
    print(f"look at it: optuna-dashboard {storage_url}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "tune/qin_small.yaml")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="the study's database (default: sqlite:///{work_dir}/tune/<study>.db)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where the trials train")
    parser.add_argument("--devices", type=train.parse_devices, default=None, metavar="DEV,DEV,...",
                        help="one worker process per device, all on one study, e.g. cuda:0,cuda:1 or cpu,cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="the best trial's config (default: configs/<study>_tuned.yaml)")
    args = parser.parse_args(argv)
    quiet_optuna()
    if args.device and args.devices:
        parser.error("give --device or --devices, not both")
    started = time.time()
    settings, space, model_cfg = split_config(common.config_from_args(args))
    _, arrays, manifest = processed_data.load_current(model_cfg)  # current processed data, or one line
    check_space(model_cfg, space, train.item_tables(arrays, manifest, torch.device("cpu")), settings.study)
    storage_url = args.storage or default_storage(model_cfg, settings.study)
    out = args.out or common.CONFIG_DIR / f"{settings.study}_tuned.yaml"
    fixed = trials_fingerprint(model_cfg, space, manifest)
    # before hours of search (and before a new study is made), not after
    check_out(out, settings.study, study_id(storage_url, settings.study), manifest["fingerprint"],
              fixed["config_hash"], settings.objective)
    # created (or checked) once, before any worker; its trials are read from the database at every
    # call, the workers' included
    study = open_study(settings, storage_url, fixed, runs_dir=common.data_paths(model_cfg)["runs"])
    deadline = None if settings.timeout_s is None else started + settings.timeout_s
    overrides = [o for o in args.overrides if not o.startswith("tune.")]
    devices = args.devices or [args.device or train.parse_config(model_cfg, None)[1].device]
    if len(devices) == 1:
        optimize(settings, space, model_cfg, storage_url, fixed, devices[0], args.config, overrides, deadline)
    else:
        threads = max(1, torch.get_num_threads() // len(devices))
        failed = train.run_worker_processes(worker, {
            f"tune worker {i} ({d})": (settings, space, model_cfg, storage_url, fixed, d, args.config, overrides,
                                       deadline, threads) for i, d in enumerate(devices)})
        if failed:
            raise UserError(f"{'; '.join(failed)}: rerun the same command to continue the search")
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    written = (write_best_config(study, settings, Path(args.config), overrides, out,
                                 processed_data.checked_data(model_cfg), manifest["fingerprint"])
               if completed else None)
    print_summary(study, settings, storage_url, written, time.time() - started)


if __name__ == "__main__":
    common.run_main(main)
