"""K-fold trainer: one model config in, out-of-fold, valid-holdout and test predictions out.

    python src/train.py --config configs/qin.yaml [--set train.lr=1e-3] [--folds 0,2] [--device cpu]

The orchestration around the training loop (src/mmctr/models/fit.py): config -> processed data on the
device -> for each fold, a model trained by fit() on the other folds' train rows -> its files in
the run folder (src/mmctr/runs.py). Every epoch scores the official valid split and the fold's held-out
train rows; train.early_stopping says whose AUC decides (valid, as QIN was released, or
holdout). The best epoch's held-out predictions are the fold's OOF predictions; its weights then
predict the test split.

With --refit it trains one more model instead, on every train row (refit/ in the run folder):
early stopping on the valid split as released, or the folds' median best epoch
(train.refit_epochs). The blend can use its test predictions (blend.test_from: refit).

Several devices (docs/GPUS.md), two ways:

    python src/train.py --config configs/qin.yaml --devices cuda:0,cuda:1     # folds in parallel
    torchrun --nproc-per-node 2 src/train.py --config configs/qin.yaml --refit  # one fit, DDP

--devices starts one worker process per device; each claims the next unclaimed fold (a claim file
in the run folder) until none is left, and this process writes the aggregates once all are done.
A fold's seed decides everything, so each fold's files are those of a sequential run. Under
torchrun every process trains each fold together (src/mmctr/models/fit.py: a slice of every batch per
rank, NCCL on CUDA, gloo on the CPU); rank 0 alone writes files.

Outputs: {work_dir}/runs/<run.name>/ exactly as docs/DESIGN.md ("Run directory"). A fold is
complete once fold{k}/done.json reads back; a rerun skips complete folds and redoes the others from
scratch with the same seed, so an interrupted run ends with the same predictions as an
uninterrupted one. Outputs made under another config or other data are moved aside to
runs/<run.name>.old-<time>/, never reused and never deleted; a refit made with another
train.refit_epochs (the folds do not read it) is moved aside alone, to refit.old-<time>/.
The processed data must exist and match the config's data section (src/preprocess.py builds it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import os
import re
import signal
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmctr import common
from mmctr import experiments
from mmctr import model_config
from mmctr import processed_data
from mmctr import reports
from mmctr import runs
from mmctr.common import UserError
from mmctr.models.fit import FitSettings, bf16_enabled, fit, from_rank0, predict, rank_and_world
from mmctr.models.schema import FEATURES, ITEM_TABLES
from mmctr.models.tables import user_row_counts
from mmctr.models.metrics import log_loss, roc_auc


RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # a run's folder: one plain path component


class TrainingDiverged(UserError):
    """Non-finite predictions: the settings (a learning rate too high) made training diverge; for a
    search (tune.py) an outcome of the trial, not a fault of the config."""


# Keys that change where or how visibly a run happens, not what it computes: left out of the
# fingerprint, so that e.g. finishing a run's last folds on another device reuses the others.
RUN_TIME_ONLY_KEYS = (("train", "device"), ("train", "log_every"))
# Where the data is, not what it is (the data fingerprint holds its content): moving the data or
# the work folder, or naming either by a relative path, keeps every finished run
LOCATION_KEYS = (("data", "raw_dir"), ("data", "work_dir"))
# Read by the refit alone, which records it in its done.json: changing it redoes the refit, not the folds
REFIT_ONLY_KEYS = (("train", "refit_epochs"),)


@dataclass
class TrainConfig(FitSettings):
    """The train: section: fit.py's schedule (defaults: QIN's released one) plus where to run."""
    # whose AUC decides: the official valid split (as released) or the fold's held-out train rows
    early_stopping: Literal["valid", "holdout"] = "valid"
    # how long the refit (--refit: one model on every train row) trains: early stopping on the valid
    # split (as released) or the median best epoch of the run's folds
    refit_epochs: Literal["valid", "folds"] = "valid"
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N

    def fit_settings(self, seed: int) -> FitSettings:
        """fit.py's part of the section, with a fold's own seed."""
        return FitSettings(**{**{f.name: getattr(self, f.name) for f in fields(FitSettings)}, "seed": seed})


@dataclass
class RunConfig:
    """The run: section."""
    name: str  # the run folder {work_dir}/runs/<name>/; each model config sets its own file name


# ---------------------------------------------------------------------------------------------
# configuration and device
# ---------------------------------------------------------------------------------------------

EpochHook = Callable[[int | str, dict], None]  # (fold, the epoch's history record)


def parse_config(cfg: dict, device: str | None) -> tuple[dict, TrainConfig]:
    """The one parse of a training config: (a copy of ``cfg`` with its run and train sections
    type-checked and completed and ``device`` applied: what is saved and fingerprinted, its typed
    train section: what the training reads)."""
    cfg = copy.deepcopy(cfg)
    for section in ("data", "run", "train", "model"):
        if not isinstance(cfg.get(section), dict):
            raise UserError(f"config: missing section '{section}:' (train with a model config, "
                            f"e.g. --config configs/qin.yaml)")
    cfg["run"] = asdict(common.typed_section(RunConfig, cfg["run"], "run"))
    if not re.fullmatch(RUN_NAME, cfg["run"]["name"]):
        raise UserError(f"config: run.name must be a plain folder name, got {cfg['run']['name']!r}")
    configured = cfg["train"].get("device", "auto")  # checked even when --device replaces it
    if not (isinstance(configured, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", configured)):
        raise UserError(f"config: train.device must be auto, cpu, cuda or cuda:N, got {configured!r}")
    if device is not None:
        cfg["train"]["device"] = device
    train_cfg = common.typed_section(TrainConfig, cfg["train"], "train")
    if train_cfg.lr_min > train_cfg.lr:  # the floor would raise the lr at the first decay
        raise UserError(f"config: train.lr_min ({train_cfg.lr_min:g}) must not exceed train.lr ({train_cfg.lr:g})")
    cfg["train"] = asdict(train_cfg)
    return cfg, train_cfg


def checked_config(cfg: dict, device: str | None) -> dict:
    """parse_config's resolved config alone (for the tools that only check or fingerprint one)."""
    return parse_config(cfg, device)[0]


# Keys added after runs were first made, with the value that switches them off (and the keys that
# only matter when on): a run made before such a key existed computed what its off value computes,
# so at that value the keys are left out of the fingerprint and the run's finished folds stay valid.
ADDED_LATER_OFF = {**{("data", key): (None, ()) for key in processed_data.OPTIONAL_SETTINGS},
                   ("model", "target_attention_layers"): (0, ("target_attention_heads", "target_attention_dropout")),
                   ("model", "senet"): (False, ("senet_reduction", "senet_activation")),
                   ("model", "user_min_rows"): (0, ()),
                   ("train", "cuda_graphs"): (False, ()), ("train", "foreach_l2"): (False, ()),
                   ("train", "adam_impl"): ("auto", ())}


def legacy_fingerprints(cfg: dict, manifest: dict) -> list[dict]:
    """The fingerprints this config had in the older form, one per train.refit_epochs (which that
    form hashed): a run stamped with one of them keeps its outputs (runs.prepare restamps it). The
    older form also hashed the paths, so a run moved since then is not recognised."""
    return [fingerprint_of({**cfg, "train": {**cfg["train"], "refit_epochs": value}}, manifest, legacy=True)
            for value in typing.get_args(typing.get_type_hints(TrainConfig)["refit_epochs"])]


def fingerprint_of(cfg: dict, manifest: dict, legacy: bool = False) -> dict:
    """What the folds depend on: the config (minus run-time-only, location and refit-only keys, and
    added keys that are off) and the processed data's fingerprint. ``legacy``: the fingerprint as
    it was computed before location and refit-only keys were left out, which a run folder stamped
    then still carries (runs.prepare restamps it rather than retrain its finished folds)."""
    relevant = copy.deepcopy(cfg)
    for section, key in RUN_TIME_ONLY_KEYS + (() if legacy else LOCATION_KEYS + REFIT_ONLY_KEYS):
        relevant[section].pop(key, None)
    for (section, key), (off, only_when_on) in ADDED_LATER_OFF.items():
        if key in relevant.get(section, {}) and relevant[section][key] == off:
            for name in (key, *only_when_on):
                relevant[section].pop(name, None)
    return {"config_hash": common.config_hash(relevant), "data_fingerprint": manifest["fingerprint"]}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"device {requested!r}: must be auto, cpu, cuda or cuda:N (train.device, --device, "
                        f"--devices)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {requested!r}: must be auto, cpu, cuda or cuda:N (train.device, --device, "
                        f"--devices)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested}: torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {requested}: torch sees {torch.cuda.device_count()} CUDA devices "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


# ---------------------------------------------------------------------------------------------
# data: uploaded once
# ---------------------------------------------------------------------------------------------

def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # load_processed maps the files copy-on-write: on CPU the tensor is that mapping (the page
    # cache is the one copy in RAM), on CUDA it is read straight from it onto the GPU
    return torch.from_numpy(array).to(device)


def item_tables(arrays: dict, manifest: dict, device: torch.device) -> dict:
    """The item tables, the train rows of each user (user_rows) and the vocabulary sizes
    model_config.build_model takes."""
    tables = {name: upload(arrays[name], device) for name in ITEM_TABLES}
    vocab = manifest["vocab"]
    tables.update(n_items=vocab["item"], n_tags=vocab["tag"], n_users=vocab["user"],
                  n_levels=vocab["level"])
    tables["user_rows"] = upload(user_row_counts(arrays["train_user_id"], vocab["user"]), device)
    return tables


def load_to_device(arrays: dict, device: torch.device) -> dict:
    """fit.py's data: split -> its feature columns and (train, valid) labels, on the device."""
    data = {split: {name: upload(arrays[f"{split}_{name}"], device) for name in FEATURES}
            for split in ("train", "valid", "test")}
    for split in ("train", "valid"):
        data[split]["label"] = upload(arrays[f"{split}_label"], device)
    return data


# ---------------------------------------------------------------------------------------------
# one fold
# ---------------------------------------------------------------------------------------------

# A process training folds beside other such processes (src/mmctr/stages.py's fold workers) draws
# no progress bars and prints no run summary: its lines interleave with the others', and the train
# stage that runs after the workers reports each run whole.
QUIET_WORKER = False


class Progress:
    """A tqdm bar per epoch, fed by fit's progress reports (the running loss every log_every steps)."""

    def __init__(self, name: str):
        self.name, self.bar, self.epoch = name, None, None

    def __call__(self, epoch: int, done: int, total: int, loss: float) -> None:
        if epoch != self.epoch:
            self.close()
            self.epoch = epoch
            self.bar = tqdm(total=total, desc=f"{self.name} epoch {epoch}", unit="rows", unit_scale=True,
                            leave=False, mininterval=1.0, dynamic_ncols=True, smoothing=0,
                            disable=QUIET_WORKER)
        self.bar.update(done - self.bar.n)
        if loss == loss:  # not NaN: the start of an epoch has no loss yet
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_fold(fold: int | str, cfg: dict, train_cfg: TrainConfig, data: dict, tables: dict, fold_of_row: np.ndarray,
               test_ids: np.ndarray, device: torch.device, run_dir: Path,
               refit_lrs: list[float] | None = None, epoch_hook: EpochHook | None = None) -> dict | None:
    """Train fold ``fold`` from scratch and write its files; returns its metrics (done.json), or
    None on the ranks > 0 of torchrun, which train with rank 0 and leave the files to it.

    fold runs.REFIT is the refit: every train row, seed train.seed + K (no fold's), early stopping on
    the valid split, or, when ``refit_lrs`` is given, one epoch at each of its learning rates (the
    last epoch kept): the folds' schedule (refit_lrs_from_folds).
    """
    fold_start = time.time()
    refit = fold == runs.REFIT
    seed = train_cfg.seed + (int(fold_of_row.max()) + 1 if refit else fold)
    common.seed_everything(seed)  # weight init and dropout; fit draws the shuffles from the same seed
    # the model is built on the CPU so that its initial weights do not depend on the device
    model = model_config.build_model(cfg["model"], tables).to(device)

    holdout_host = np.flatnonzero(fold_of_row == fold)  # none for the refit
    train_rows = torch.from_numpy(np.flatnonzero(fold_of_row != fold)).to(device)
    if train_rows.numel() == 0 or (len(holdout_host) == 0 and not refit):
        raise UserError(f"train_fold.npy: fold {fold} leaves no rows to train on or to hold out")
    n_valid = data["valid"]["label"].numel()
    valid_rows = torch.arange(n_valid, device=device)
    settings = train_cfg.fit_settings(seed)
    # "fold" scores the held-out train rows, "valid" the official valid split
    if refit:
        eval_sets, monitor = ({}, None) if refit_lrs else ({"valid": ("valid", valid_rows)}, "valid")
        settings = replace(settings, max_epochs=len(refit_lrs) if refit_lrs else settings.max_epochs)
        stopping = (f"{len(refit_lrs)} epochs, as the folds' median best epoch, {runs.FOLDS_LRS}"
                    if refit_lrs else "valid")
    else:
        eval_sets = {"fold": ("train", torch.from_numpy(holdout_host).to(device)), "valid": ("valid", valid_rows)}
        monitor = {"valid": "valid", "holdout": "fold"}[train_cfg.early_stopping]
        stopping = train_cfg.early_stopping
    name = f"{run_dir.name} " + ("refit" if refit else f"fold {fold}")
    use_bf16 = bf16_enabled(settings, device)
    rank, world = rank_and_world()
    where = str(device) if world == 1 else f"{world} processes on {device.type} (DDP)"
    if rank == 0:
        common.log(f"{name}: {train_rows.numel():,} train rows, {len(holdout_host):,} held out, "
                   f"{model_config.count_parameters(model):,} parameters, device {where}{', bf16' if use_bf16 else ''}")

    history = []

    def on_epoch(record: dict) -> None:
        history.append({k: v for k, v in record.items() if k != "improved"})
        runs.write_history(run_dir, fold, history)
        scores = "  ".join(f"{key[:-4]} AUC {value:.6f}" for key, value in record.items() if key.endswith("_auc"))
        common.log(f"{name} epoch {record['epoch']:3d}  train loss {record['train_loss']:.5f}  {scores} "
                   f"({stopping} decides)  lr {record['lr']:.2e}  "
                   f"{time.time() - fold_start:.0f}s" + ("  *best" if record["improved"] and monitor else ""))
        if epoch_hook is not None:  # e.g. tune.py's pruner: it may stop the fold by raising
            epoch_hook(fold, record)

    progress = Progress(name)
    try:
        result = fit(model, data, train_rows, eval_sets, settings, monitor=monitor, on_epoch=on_epoch,
                     progress=progress, lr_by_epoch=refit_lrs)
    except FloatingPointError as exc:
        raise TrainingDiverged(f"{name}: {exc}") from None
    finally:
        progress.close()
    if rank > 0:
        return None
    predictions = dict(result.predictions)
    scores = dict(result.scores)
    if "valid" not in predictions:  # a refit of fixed epochs scores the valid split once, at its end
        predictions["valid"] = predict(result.model, data["valid"], batch_size=settings.eval_batch_size,
                                       bf16=settings.bf16)
        labels = data["valid"]["label"].cpu().numpy()
        scores.update(valid_auc=roc_auc(labels, predictions["valid"]), valid_logloss=log_loss(labels, predictions["valid"]))
    test_probs = predict(result.model, data["test"], batch_size=settings.eval_batch_size, bf16=settings.bf16)
    metrics = {"fold": fold, "best_epoch": result.best_epoch, "epochs": len(result.history),
               "early_stopping": stopping, **({"refit_epochs": train_cfg.refit_epochs} if refit else {}), **scores,
               "train_rows": int(train_rows.numel()), "rows_per_s": result.rows_per_s,
               "seconds": time.time() - fold_start, "device": where, "numerics": numerics(device)}
    preds = {} if refit else {"oof": (holdout_host, predictions["fold"])}
    preds.update(valid=(np.arange(n_valid), predictions["valid"]), test=(test_ids, test_probs))
    runs.write_fold(run_dir, fold, result.model.state_dict(), preds, metrics)
    common.log(f"{name} done: best epoch {result.best_epoch} by {stopping}, "
               + "".join(f"{key[:-4]} AUC {metrics[key]:.6f}, " for key in ("fold_auc", "valid_auc") if key in metrics)
               + f"{metrics['rows_per_s']:,.0f} rows/s, {metrics['seconds']:.0f}s")
    return metrics


def numerics(device: torch.device) -> dict:
    """What decides a fold's last bits besides config, data and seed (docs/REPRODUCTION.md): the
    same values give the same files; other values move predictions by up to ~1e-3."""
    if device.type != "cpu":
        return {"torch": torch.__version__, "device": torch.cuda.get_device_name(device)}
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.enabled}


def warn_of_other_numerics(run_dir: Path, done: list, device: torch.device) -> None:
    """A resumed run whose finished folds were trained under other numerics (thread count, CPU
    kernels, torch) is valid but not the bits one uninterrupted run would give: say so."""
    ours = numerics(device)
    for k in done:
        theirs = runs.fold_metrics(run_dir, k).get("numerics")
        if theirs is not None and theirs != ours:
            different = ", ".join(f"{key} {theirs.get(key)} (now {value})" for key, value in ours.items()
                                  if theirs.get(key) != value)
            common.log(f"note: fold {k} was trained with {different}: its predictions may differ from an "
                       f"uninterrupted run's in the last bits (docs/REPRODUCTION.md)")


def refit_lrs_from_folds(run_dir: Path, n_folds: int) -> list[float]:
    """How a refit trains when train.refit_epochs is 'folds': the median best epoch of the finished
    folds (rounded half up) epochs, each at the median learning rate the folds trained that epoch
    at (their decays on a plateau included: a refit without an eval set has no plateau to decay on).
    At least half the folds ran each of these epochs, as each ran past its best one."""
    missing = [k for k in range(n_folds) if not runs.fold_done(run_dir, k)]
    if missing:
        raise UserError(f"{run_dir}: train.refit_epochs is folds, but folds {missing} are not done: "
                        f"train them first (src/train.py without --refit)")
    epochs = int(np.floor(np.median([runs.fold_metrics(run_dir, k)["best_epoch"] for k in range(n_folds)]) + 0.5))
    lrs = [{r["epoch"]: r["lr"] for r in runs.read_history(run_dir, k)} for k in range(n_folds)]
    return [float(np.median([fold[e] for fold in lrs if e in fold])) for e in range(1, epochs + 1)]


# ---------------------------------------------------------------------------------------------
# several devices: a worker process per device taking folds (--devices), or torchrun's DDP
# ---------------------------------------------------------------------------------------------

def train_claimed_folds(todo: list, cfg: dict, train_cfg: TrainConfig, arrays: dict, manifest: dict, device: torch.device,
                        run_dir: Path, refit_lrs: list[float] | None, epoch_hook: EpochHook | None = None) -> None:
    """A worker's loop: train every fold of ``todo`` that it can claim (runs.claim_fold), in order.
    Under torchrun the ranks are one worker: rank 0 claims for them all."""
    data = load_to_device(arrays, device)
    tables = item_tables(arrays, manifest, device)
    fold_of_row = np.asarray(arrays["train_fold"])
    test_ids = np.asarray(arrays["test_ID"], dtype=np.int64)
    main = rank_and_world()[0] == 0
    for k in todo:
        [claimed] = from_rank0([main and runs.claim_fold(run_dir, k)])
        if not claimed:
            if main:
                common.log(f"{run_dir.name} fold {k}: taken by another worker (being trained or done), skipped")
            continue
        try:
            if main:
                runs.clear_fold(run_dir, k)
            train_fold(k, cfg, train_cfg, data, tables, fold_of_row, test_ids, device, run_dir, refit_lrs, epoch_hook)
        finally:
            if main:
                runs.release_claim(run_dir, k)  # done or failed: the fold is free again


def fold_worker(cfg: dict, train_cfg: TrainConfig, processed: Path, device: str, run_dir: Path, todo: list,
                refit_lrs: list[float] | None, threads: int) -> None:
    """The body of a worker process (train_on_devices): its own copy of the data on ``device``. It
    holds the run folder as its parent does (runs.hold), so that while it lives no run of another
    config can take the folder over."""
    # the parent's thread count: a fold's CPU float results depend on it, not on how it was run
    torch.set_num_threads(threads)
    arrays, manifest = processed_data.load_processed(processed)

    def train_held_folds():
        with runs.hold(run_dir, fingerprint_of(cfg, manifest)):
            train_claimed_folds(todo, cfg, train_cfg, arrays, manifest, torch.device(device), run_dir, refit_lrs)
    common.run_main(train_held_folds)


def train_on_devices(todo: list, cfg: dict, train_cfg: TrainConfig, processed: Path, devices: list[torch.device], run_dir: Path,
                     refit_lrs: list[float] | None) -> None:
    """Train the folds of ``todo`` with one worker process per device (at most one per fold), each
    claiming the next unclaimed fold until none is left; returns once every worker has ended. A
    worker that dies leaves its fold unfinished (its claim names a dead process): the next run
    redoes it."""
    used = devices[:len(todo)]
    common.log(f"training folds {todo} with {len(used)} workers on {', '.join(map(str, used))}")
    failed = run_worker_processes(fold_worker, {
        f"fold worker {i} ({device})": (cfg, train_cfg, processed, str(device), run_dir, todo, refit_lrs,
                                        torch.get_num_threads())
        for i, device in enumerate(used)})
    if failed:
        unfinished = [k for k in todo if not runs.fold_done(run_dir, k)]
        raise UserError(f"{'; '.join(failed)}: folds {unfinished} are not done; rerun the same command "
                        f"to train them (finished folds are kept)")


def run_worker_processes(target: Callable, args_of: dict[str, tuple]) -> list[str]:
    """One spawned process per name, running target(*args); returns once all have ended, with a line
    for each that failed. Spawned, not forked: CUDA cannot be initialised again in a forked child.
    A worker dies with this process (common.die_with_parent): a killed run leaves none behind."""
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_worker_main, name=name, args=(os.getpid(), target, args))
               for name, args in args_of.items()]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    except BaseException:  # a Ctrl-C: the workers stop with this process
        stop_workers(workers)
        raise
    return [f"{w.name} exited with {w.exitcode}" + (" (killed by a signal)" if w.exitcode < 0 else "")
            for w in workers if w.exitcode != 0]


def stop_workers(workers: list, grace_s: float = 2.0, patience_s: float = 10.0) -> None:
    """After a Ctrl-C: a terminal's reached the workers too (its whole process group), so they get
    ``grace_s`` to clean up (a trial marked failed, a claim released); one sent to this process alone
    did not, so those still running get it now, then ``patience_s``; any left are killed."""
    started = [w for w in workers if w.pid is not None]

    def interrupt(worker) -> None:
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            os.kill(worker.pid, signal.SIGINT)
    for wait_s, then in ((grace_s, interrupt), (patience_s, lambda w: w.kill())):
        deadline = time.time() + wait_s
        for worker in started:
            worker.join(max(0.0, deadline - time.time()))
        for worker in started:
            if worker.is_alive():
                then(worker)
    for worker in started:
        worker.join()


def _worker_main(parent_pid: int, target: Callable, args: tuple) -> None:
    common.die_with_parent(parent_pid)
    target(*args)


def start_torchrun_process(requested: str) -> str:
    """Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU) and return this
    process's device (CUDA: the GPU of its local rank)."""
    device = resolve_device(requested)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return str(device)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def run_training(cfg: dict, folds: list[int] | None = None, device: str | None = None,
                 refit: bool = False, devices: list[str] | None = None,
                 epoch_hook: EpochHook | None = None) -> Path:
    """Train the given folds (default: all) that are not done yet, or with ``refit`` the refit (one
    model on every train row) if it is not done yet; returns the run directory. ``devices``: one
    worker process per device trains the folds in parallel (instead of ``device``). ``epoch_hook``
    (fold, epoch record) is called after every epoch of a fold trained in this process."""
    run_start = time.time()
    cfg, train_cfg = parse_config(cfg, device)
    processed, arrays, manifest = processed_data.load_current(cfg)
    n_folds = int(manifest["n_folds"])
    folds = list(range(n_folds)) if folds is None else sorted(set(folds))
    if any(not 0 <= k < n_folds for k in folds):
        raise UserError(f"--folds {','.join(map(str, folds))}: the data has folds 0..{n_folds - 1}")
    if refit:
        folds = [runs.REFIT]

    # every check that can fail comes before the run folder is touched: a typo in a --set must
    # not discard finished folds. The model is built on the meta device: no memory, no init.
    torch_devices = [resolve_device(d) for d in devices or [train_cfg.device]]
    with torch.device("meta"):
        model_config.build_model(cfg["model"], item_tables(arrays, manifest, torch.device("cpu")))
    if cfg["model"].get("history_levels"):
        levels = (manifest.get("item_levels") or {}).get("from", "the rounded mean level of the item's rows")
        common.log(f"history items carry per-item likes/views levels from {levels}")

    run_dir = runs.run_dir(cfg)
    main = rank_and_world()[0] == 0  # under torchrun, rank 0 alone reads and writes the run folder
    fingerprint = fingerprint_of(cfg, manifest)
    with runs.hold(run_dir, fingerprint) if main else contextlib.nullcontext():
        return train_in_run_folder(cfg, train_cfg, arrays, manifest, processed, folds, refit, torch_devices,
                                   run_dir, fingerprint, run_start, epoch_hook)


def train_in_run_folder(cfg: dict, train_cfg: TrainConfig, arrays: dict, manifest: dict, processed: Path,
                        folds: list, refit: bool,
                        torch_devices: list[torch.device], run_dir: Path, fingerprint: dict,
                        run_start: float, epoch_hook: EpochHook | None = None) -> Path:
    """run_training's part inside the run folder, which this process holds (runs.hold)."""
    n_folds = int(manifest["n_folds"])
    main = rank_and_world()[0] == 0
    todo, refit_lrs = [], None
    if main:
        legacy = legacy_fingerprints(cfg, manifest)
        if refit and train_cfg.refit_epochs == "folds":  # before the folder is touched: it may fail
            if runs.has_outputs(run_dir) and runs.read_fingerprint(run_dir) not in (fingerprint, *legacy):
                raise UserError(f"{run_dir}: train.refit_epochs is folds, but the run's folds were made with "
                                f"another config or other data, or its fingerprint.json is unreadable: train "
                                f"this config's folds first (src/train.py without --refit, which moves the old "
                                f"ones aside), or refit with --set train.refit_epochs=valid")
            refit_lrs = refit_lrs_from_folds(run_dir, n_folds)
        runs.prepare(run_dir, fingerprint, cfg, legacy)
        runs.remove_stale_claims(run_dir)
        if refit:
            runs.retire_other_refit(run_dir, train_cfg.refit_epochs)
        todo = [k for k in folds if not runs.fold_done(run_dir, k)]
        skipped = [k for k in folds if k not in todo]
        if skipped:
            common.log(f"{run_dir}: folds {skipped} already done, skipped")
        if todo:
            warn_of_other_numerics(run_dir, [k for k in range(n_folds) if runs.fold_done(run_dir, k)],
                                   torch_devices[0])
        if todo and not refit:
            runs.remove_aggregates(run_dir)  # they would describe folds about to change
    todo, refit_lrs = from_rank0([todo, refit_lrs])
    if len(todo) > 1 and len(torch_devices) > 1:
        if epoch_hook is not None:
            raise UserError("an epoch hook needs the folds trained in this process: give one device")
        train_on_devices(todo, cfg, train_cfg, processed, torch_devices, run_dir, refit_lrs)
    elif todo:
        train_claimed_folds(todo, cfg, train_cfg, arrays, manifest, torch_devices[0], run_dir, refit_lrs,
                            epoch_hook)
    if not main:
        return run_dir
    if refit and runs.fold_done(run_dir, runs.REFIT):  # another process may have claimed and trained it
        made_with = runs.refit_setting(runs.fold_metrics(run_dir, runs.REFIT))
        if made_with != train_cfg.refit_epochs:
            raise UserError(f"{run_dir}: its refit was trained meanwhile by another process, with "
                            f"train.refit_epochs={made_with}, not {train_cfg.refit_epochs}: rerun this command "
                            f"to train this one (the other is then moved aside)")

    done = [k for k in range(n_folds) if runs.fold_done(run_dir, k)]
    missing = [k for k in range(n_folds) if k not in done]
    metrics = None
    if not missing and (refit or not todo) and all((run_dir / name).is_file() for name in runs.AGGREGATE_FILES):
        try:
            metrics = runs.read_metrics(run_dir)  # nothing changed: the aggregates stay as they are
        except UserError as exc:  # damaged: the folds are all there to write them again
            common.log(f"{common.first_line(exc)}: the aggregates are written again from the folds")
    if metrics is None and not missing:
        raw_dir = Path(cfg["data"]["raw_dir"])
        labels = {split: np.asarray(arrays[f"{split}_label"], dtype=np.float64) for split in ("train", "valid")}
        oracle = {split: common.read_oracle_prob(raw_dir, split) for split in ("train", "valid")}
        metrics = runs.write_aggregates(run_dir, n_folds, labels, oracle)
    if QUIET_WORKER:
        return run_dir
    print_summary(run_dir, done, missing, metrics, time.time() - run_start)
    if runs.fold_done(run_dir, runs.REFIT):
        m = runs.fold_metrics(run_dir, runs.REFIT)
        print(f"refit: valid AUC {reports.auc_text(m['valid_auc'])}  epochs {m['epochs']} "
              f"(best {m['best_epoch']}, {m['early_stopping']})  {m['seconds']:.0f}s")
    return run_dir


def print_summary(run_dir: Path, done: list[int], missing: list[int], metrics: dict | None,
                  seconds: float) -> None:
    print(f"\n=== {run_dir.name}: summary")
    for k in done:
        m = runs.fold_metrics(run_dir, k)
        print(f"fold {k}: fold AUC {reports.auc_text(m['fold_auc'])}  valid AUC {reports.auc_text(m['valid_auc'])}  "
              f"best epoch {m['best_epoch']}/{m['epochs']}  {m['rows_per_s']:,.0f} rows/s  "
              f"{m['seconds']:.0f}s")
    if metrics is None:
        # a fold another live process holds is being trained there: rerunning now would skip it again
        held = {k: runs.claim_owner(runs.claim_path(run_dir, k)) for k in missing}
        held = {k: pid for k, pid in held.items() if pid is not None and common.process_alive(pid)}
        print(f"folds missing: {','.join(map(str, missing))} (aggregates are written once every fold "
              f"is done: rerun without --folds or with --folds {','.join(map(str, missing))}"
              + "".join(f"; fold {k} is being trained by process {pid}" for k, pid in held.items()) + ")")
    else:
        print(f"OOF AUC     {reports.auc_text(metrics['oof_auc'])}   oracle {reports.auc_text(metrics['oracle_oof_auc'])}")
        print(f"holdout AUC {reports.auc_text(metrics['valid_auc'])}   oracle {reports.auc_text(metrics['oracle_valid_auc'])}")
        print(f"early stopping: {reports.EARLY_STOPPING_NOTE[metrics['early_stopping']]}")
        print(f"training time over all folds {metrics['seconds']:.0f}s")
    print(f"this command took {seconds:.0f}s; run dir {run_dir}")


def parse_folds(text: str) -> list[int]:
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        folds = []
    if not folds:  # an empty --folds would train nothing and succeed
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers, got {text!r}")
    return folds


def parse_devices(text: str) -> list[str]:
    devices = [part.strip() for part in text.split(",") if part.strip()]
    if not devices:
        raise argparse.ArgumentTypeError(f"expected comma-separated devices (cuda:0,cuda:1 or cpu,cpu), got {text!r}")
    return devices


def parse_cli(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """train.py's arguments and the config they name (with its --set overrides applied)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "qin.yaml")
    parser.add_argument("--folds", type=parse_folds, default=None, metavar="K,K,...",
                        help="train only these folds (default: all); aggregates need every fold done")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="force the device (default: train.device, auto = CUDA when present)")
    parser.add_argument("--devices", type=parse_devices, default=None, metavar="DEV,DEV,...",
                        help="train folds in parallel, one worker process per device, e.g. cuda:0,cuda:1 "
                             "(cpu,cpu: two CPU workers)")
    parser.add_argument("--refit", action="store_true",
                        help="train the refit instead of folds: one model on every train row "
                             "(train.refit_epochs says how long), written to the run's refit/ folder")
    args = parser.parse_args(argv)
    if args.refit and args.folds is not None:
        parser.error("--refit trains on every train row: it takes no --folds")
    if args.devices and args.device:
        parser.error("give --device (one device) or --devices (folds in parallel), not both")
    under_torchrun = "LOCAL_RANK" in os.environ
    if under_torchrun and args.devices:
        parser.error("under torchrun the processes train each fold together: give --device, not --devices")
    return args, common.config_from_args(args)


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_cli(argv)
    under_torchrun = "LOCAL_RANK" in os.environ
    device = args.device
    if under_torchrun:
        device = start_torchrun_process(parse_config(cfg, device)[1].device)
    try:
        run_training(cfg, args.folds, device, refit=args.refit, devices=args.devices)
        if rank_and_world()[0] == 0:
            experiments.record_run(cfg, args.config, args.overrides, refit=args.refit)  # once finished, one row
    finally:
        if under_torchrun:
            dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
