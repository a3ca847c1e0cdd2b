"""The run folder {work_dir}/runs/<name>/: the one module that writes and reads it.

Layout (docs/DESIGN.md "Run directory"): config.yaml, fingerprint.json, fold{k}/{best.pt,
history.json, oof.parquet, valid.parquet, test.parquet, done.json}, once every fold is done the
aggregates oof.parquet, valid.parquet, test.parquet, metrics.json, report.md with its pictures
curves.png and (synthetic data) calibration.png, and optionally refit/ (one model on every train
row: best.pt, history.json, valid.parquet, test.parquet, done.json) and refits of another
train.refit_epochs moved aside (refit.old-<time>/). Every file is written
atomically; a fold is done when its done.json (written last) reads back as a mapping. While a
process trains fold k, fold{k}.claim (refit.claim) holds its pid.
Predictions are stored with their row ids (``row_id`` for train and valid rows, ``ID`` for test),
so that reading them back is a join on the ids, checked here against the ids the caller expects.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import yaml

from mmctr import common
from mmctr import plots
from mmctr import reports
from mmctr.common import UserError
from mmctr.models.metrics import log_loss, roc_auc

SPLITS = ("oof", "valid", "test")
ID_COLUMN = {"oof": "row_id", "valid": "row_id", "test": "ID"}
AGGREGATE_FILES = ("oof.parquet", "valid.parquet", "test.parquet", "metrics.json", "report.md")
# report.md's pictures: written with the aggregates and removed with them, but not among them, since
# a picture that could not be drawn is only a warning and must not make a finished run look unfinished
CURVES_PNG, CALIBRATION_PNG = "curves.png", "calibration.png"
PICTURES = (CURVES_PNG, CALIBRATION_PNG)


# ---------------------------------------------------------------------------------------------
# paths and state
# ---------------------------------------------------------------------------------------------

def run_dir(cfg: dict, name: str | None = None) -> Path:
    return common.data_paths(cfg)["runs"] / (name or cfg["run"]["name"])


REFIT = "refit"  # the "fold" that trains on every train row: its folder is {run}/refit/


def fold_dir(run: Path, fold: int | str) -> Path:
    return run / (REFIT if fold == REFIT else f"fold{fold}")


def fold_dirs(run: Path) -> list[Path]:
    """The run's fold folders, the refit's included."""
    return [p for p in run.glob("*") if p.is_dir() and re.fullmatch(rf"fold\d+|{REFIT}", p.name)]


def fold_done(run: Path, fold: int | str) -> bool:
    """Whether fold{k}/done.json (or refit/done.json) exists and reads back as a mapping (a damaged
    one: not done)."""
    done = fold_dir(run, fold) / "done.json"
    if not done.is_file():
        return False
    try:
        return isinstance(common.read_json(done), dict)
    except UserError as exc:
        common.log(f"{exc}: fold {fold} counts as not done")
        return False


def fold_metrics(run: Path, fold: int | str) -> dict:
    return common.read_json(fold_dir(run, fold) / "done.json")


def read_fingerprint(run: Path) -> dict | None:
    """The run's recorded fingerprint, or None when there is none that reads back."""
    stamp = run / "fingerprint.json"
    try:
        stamped = common.read_json(stamp) if stamp.is_file() else None
    except UserError as exc:  # a damaged stamp vouches for nothing
        common.log(str(exc))
        return None
    return stamped if isinstance(stamped, dict) else None


def move_aside(run: Path) -> Path:
    """Move the run's outputs (everything but claims) into a new folder <run>.old-<time> beside it."""
    aside = common.aside_path(run)
    aside.mkdir()
    for path in sorted(run.iterdir()):
        if not path.name.endswith(".claim") and not path.name.startswith(LOCK_FILE):
            path.replace(aside / path.name)
    return aside


def has_outputs(run: Path) -> bool:
    return bool(fold_dirs(run)) or any((run / name).exists() for name in AGGREGATE_FILES)


def prepare(run: Path, fingerprint: dict, cfg: dict, legacy: list[dict] = ()) -> None:
    """Move outputs made under another fingerprint aside (never delete them), then record this
    fingerprint and config. ``legacy``: the same config's fingerprints in an older form; a run
    stamped with one keeps its outputs and is restamped."""
    previous = read_fingerprint(run)
    if previous in legacy:  # an older form's stamp differs from every current one: it hashed the paths
        common.log(f"{run}: fingerprint.json restamped in the form that leaves out paths and refit-only "
                   f"settings; its outputs are kept")
    elif previous != fingerprint and has_outputs(run):
        aside = move_aside(run)
        common.log(f"{run}: its outputs were made with another config or other data (fingerprint "
                   f"{previous} != {fingerprint}): moved to {aside}, delete that when no longer needed")
    if previous != fingerprint:  # an unchanged stamp stays untouched, mtime included
        common.write_json(run / "fingerprint.json", fingerprint)
    config_path = run / "config.yaml"
    try:
        written = common.parse_yaml(config_path.read_text()) if config_path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        written = None
    if written != cfg:  # an unchanged config.yaml stays untouched
        common.write_yaml(config_path, cfg)


# the end of a refit's early_stopping text since its epochs replay the folds' learning rates
FOLDS_LRS = "at their learning rates"


def refit_setting(metrics: dict) -> str:
    """train.refit_epochs of a finished refit: done.json records it; one written before it did says
    how the refit stopped ("N epochs, as the folds' median best epoch", or "valid"). A folds refit
    from before its epochs replayed the folds' learning rates (one rate throughout) is a setting of
    its own, so that it is moved aside and trained again."""
    stopping = str(metrics.get("early_stopping"))
    setting = metrics.get("refit_epochs") or ("folds" if "median best epoch" in stopping else "valid")
    if setting == "folds" and FOLDS_LRS not in stopping:
        return "folds at one learning rate (an older refit)"
    return setting


def retire_other_refit(run: Path, refit_epochs: str) -> None:
    """A finished refit made with another train.refit_epochs is moved aside to refit.old-<time>/ in
    the run folder (the folds stay: the setting does not touch them), so that it is trained again."""
    if not fold_done(run, REFIT):
        return
    made_with = refit_setting(fold_metrics(run, REFIT))
    if made_with != refit_epochs:
        aside = common.aside_path(fold_dir(run, REFIT))
        fold_dir(run, REFIT).replace(aside)
        common.log(f"{run}: its refit was made with train.refit_epochs={made_with}, not {refit_epochs}: moved "
                   f"to {aside}, delete that when no longer needed")


def remove_aggregates(run: Path) -> None:
    for name in AGGREGATE_FILES + PICTURES:
        (run / name).unlink(missing_ok=True)


def clear_fold(run: Path, fold: int | str) -> None:
    shutil.rmtree(fold_dir(run, fold), ignore_errors=True)  # leftovers of an interrupted attempt


# The run lock: a run folder holds the folds of one fingerprint only. Every process that trains
# into it holds a shared flock on run.lock for its whole run and records the fingerprint there;
# processes with the same fingerprint share the folder (claims split the folds), one with another
# fingerprint is refused while any holder lives. The kernel drops a dead process's flock: no stale
# lock survives a kill.

LOCK_FILE = "run.lock"
HOLDERS_FILE = "run.lock.json"  # the fingerprint the holders train with, and their pids


@contextlib.contextmanager
def hold(run: Path, fingerprint: dict) -> Iterator[None]:
    """Hold ``run`` for a process training with ``fingerprint``; UserError when processes with
    another fingerprint hold it."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / LOCK_FILE, "a+") as lock:
        with _mutex(run):  # one process at a time looks at run.lock and joins
            recorded = _read_holders(run)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holders = {}  # nobody holds it: what run.lock.json says is of processes long gone,
                remove_claims(run)  # and so are the claims (every claiming process holds the run)
            except BlockingIOError:
                holders = recorded
                if holders.get("fingerprint") != fingerprint:
                    pids = [pid for pid in holders.get("pids", []) if common.process_alive(pid)]
                    raise UserError(
                        f"{run}: in use by process {', '.join(map(str, pids)) or '(unknown)'}, which trains "
                        f"it with another config or other data (fingerprint {holders.get('fingerprint')}); "
                        f"wait for it to end, or name this run differently (--set run.name=...)") from None
            pids = [pid for pid in holders.get("pids", []) if common.process_alive(pid) and pid != os.getpid()]
            joined = {"fingerprint": fingerprint, "pids": pids + [os.getpid()]}
            if joined != recorded:  # for the message above; an unchanged record stays untouched
                common.write_json(run / HOLDERS_FILE, joined)
            fcntl.flock(lock, fcntl.LOCK_SH)  # ours is shared: processes with this fingerprint may join
        yield


def _read_holders(run: Path) -> dict:
    try:
        holders = common.read_json(run / HOLDERS_FILE)
    except UserError:
        holders = None
    return holders if isinstance(holders, dict) else {}


@contextlib.contextmanager
def _mutex(run: Path) -> Iterator[None]:
    with open(run / (LOCK_FILE + ".mutex"), "a") as mutex:
        fcntl.flock(mutex, fcntl.LOCK_EX)  # held for milliseconds; released by close or death
        yield


# Claims: which process trains which fold, so that workers training the folds of one run at once
# (train.py --devices, stages.py --fold-workers) take each fold exactly once. Between processes of
# one machine (pids); only a process that holds the run (hold) claims a fold.

def claim_path(run: Path, fold: int | str) -> Path:
    return run / f"{fold_dir(run, fold).name}.claim"


def claim_fold(run: Path, fold: int | str) -> bool:
    """Claim ``fold`` for this process to train it: create its claim file holding our pid,
    atomically (O_EXCL: of processes claiming at once, exactly one gets it). False when another
    process holds it, or has finished it since (the claim is released once the fold is done)."""
    try:
        fd = os.open(claim_path(run, fold), os.O_CREAT | os.O_EXCL | os.O_WRONLY, common.FILE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as claim:
        claim.write(f"{os.getpid()}\n")
    if fold_done(run, fold):
        release_claim(run, fold)
        return False
    return True


def release_claim(run: Path, fold: int | str) -> None:
    claim_path(run, fold).unlink(missing_ok=True)


def claim_owner(path: Path) -> int | None:
    """The pid in a claim file, or None when it is gone or unreadable (its writer died first)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


CLAIM_WRITE_S = 30.0  # an empty claim younger than this may be its writer's, between create and write


def claim_being_written(path: Path) -> bool:
    """An empty claim its process may be writing its pid into now: young; an old one was left by a
    process killed in between."""
    try:
        return time.time() - path.stat().st_mtime < CLAIM_WRITE_S
    except OSError:
        return False


def remove_claims(run: Path) -> None:
    """Remove every claim: of processes that held the run and are gone, whatever their pids now name."""
    for path in run.glob("*.claim"):
        common.log(f"{path}: left by a run that has ended: the fold is free again")
        path.unlink(missing_ok=True)


def remove_stale_claims(run: Path) -> None:
    """Remove the claims of processes that are gone (a killed worker's), so that their folds are
    trained again; a live process's claim stays."""
    for path in run.glob("*.claim"):
        pid = claim_owner(path)
        if pid is None and claim_being_written(path):
            continue
        if pid is None or not common.process_alive(pid):
            common.log(f"{path}: its process {pid} is gone: the fold is free again")
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def prediction_frame(split: str, ids: np.ndarray, preds: np.ndarray, fold: np.ndarray | None = None):
    columns = {ID_COLUMN[split]: np.asarray(ids)}
    if fold is not None:
        columns["fold"] = np.asarray(fold).astype(np.int8)
    return pd.DataFrame({**columns, "pred": np.asarray(preds, dtype=np.float32)})


def write_history(run: Path, fold: int | str, history: list[dict]) -> None:
    common.write_json(fold_dir(run, fold) / "history.json", history)


def read_history(run: Path, fold: int | str) -> list[dict]:
    """A fold's epochs as fit recorded them (epoch, train_loss, the AUCs, lr, seconds)."""
    return common.read_json(fold_dir(run, fold) / "history.json")


def write_fold(run: Path, fold: int | str, state: dict, preds: dict[str, tuple[np.ndarray, np.ndarray]],
               metrics: dict) -> None:
    """A finished fold: its checkpoint, its predictions (split -> (ids, probabilities)), done.json last."""
    # torch here, not at the top: blend, single, summary and the experiment log read run folders
    # without it (1.5-2 s of each such process's start)
    import torch
    folder = fold_dir(run, fold)
    with common.atomic_path(folder / "best.pt") as tmp:
        torch.save({k: v.cpu() for k, v in state.items()}, tmp)
    for split, (ids, probs) in preds.items():
        common.write_parquet(folder / f"{split}.parquet", prediction_frame(split, ids, probs))
    common.write_json(folder / "done.json", metrics)


def write_predictions(run: Path, preds: dict[str, pd.DataFrame]) -> None:
    for split in SPLITS:
        common.write_parquet(run / f"{split}.parquet", preds[split])


def read_fold_predictions(run: Path, fold: int, split: str) -> pd.DataFrame:
    columns = [ID_COLUMN[split], "pred"]
    try:
        return common.read_parquet(fold_dir(run, fold) / f"{split}.parquet", columns)
    except UserError as exc:
        raise UserError(f"{exc}; delete {fold_dir(run, fold)} and rerun to retrain that fold") from None


def write_aggregates(run: Path, n_folds: int, labels: dict[str, np.ndarray],
                     oracle: dict[str, np.ndarray | None]) -> dict:
    """OOF (every train row once), fold-mean valid and test predictions, metrics.json, report.md.

    labels and oracle map train and valid to [N] arrays in row order (oracle: the true click
    probabilities of synthetic data, or None).
    """
    folds = [fold_metrics(run, k) for k in range(n_folds)]
    oof = pd.concat([read_fold_predictions(run, k, "oof").assign(fold=k)
                     for k in range(n_folds)]).sort_values("row_id", kind="stable")
    if not np.array_equal(oof["row_id"].to_numpy(), np.arange(len(labels["train"]))):
        raise UserError(f"{run}: fold OOF files do not cover every train row exactly once")
    oof = oof[["row_id", "fold", "pred"]].astype({"fold": np.int8})

    def fold_mean(split: str) -> pd.DataFrame:
        id_column = ID_COLUMN[split]
        frames = [read_fold_predictions(run, k, split).sort_values(id_column) for k in range(n_folds)]
        for k, frame in enumerate(frames):
            if not np.array_equal(frame[id_column].to_numpy(), frames[0][id_column].to_numpy()):
                raise UserError(f"{fold_dir(run, k) / f'{split}.parquet'}: column '{id_column}': other "
                                f"rows than fold 0's; delete {fold_dir(run, k)} and rerun to retrain it")
        preds = np.mean([f["pred"].to_numpy(np.float64) for f in frames], axis=0)
        return prediction_frame(split, frames[0][id_column].to_numpy(), preds)

    preds = {"oof": oof, "valid": fold_mean("valid"), "test": fold_mean("test")}
    scored = {"oof": ("train", preds["oof"]["pred"]), "valid": ("valid", preds["valid"]["pred"])}
    metrics = {"n_folds": n_folds, "early_stopping": folds[0]["early_stopping"]}
    for name, (split, pred) in scored.items():
        if not np.isfinite(pred).all():
            raise UserError(f"{run / f'{name}.parquet'}: non-finite predictions")
        metrics[f"{name}_auc"] = roc_auc(labels[split], pred.to_numpy())
        metrics[f"{name}_logloss"] = log_loss(labels[split], pred.to_numpy())
        metrics[f"oracle_{name}_auc"] = None if oracle[split] is None else roc_auc(labels[split], oracle[split])
    metrics.update(seconds=sum(m["seconds"] for m in folds), folds=folds)
    write_predictions(run, preds)
    common.write_json(run / "metrics.json", metrics)
    pictures = draw_pictures(run, folds, preds, oracle)
    common.write_text(run / "report.md", reports.run_report(run.name, metrics, pictures))
    return metrics


def draw_pictures(run: Path, folds: list[dict], preds: dict[str, pd.DataFrame],
                  oracle: dict[str, np.ndarray | None]) -> list[tuple[str, str]]:
    """The report's pictures: (caption, file name) of each one drawn (a failure is a warning)."""
    monitor = {"valid": "valid", "holdout": "fold"}[folds[0]["early_stopping"]]

    def curves():  # read inside draw(): a damaged history.json costs the picture, not the run
        return plots.training_curves(run.name, {
            m["fold"]: {"history": common.read_json(fold_dir(run, m["fold"]) / "history.json"),
                        "best_epoch": m["best_epoch"], "monitor": monitor} for m in folds})

    pictures = []
    if plots.draw(run / CURVES_PNG, curves):
        pictures.append(("Train loss and AUC per epoch, every fold", CURVES_PNG))
    if oracle["train"] is not None:  # synthetic data: the true click probabilities are known
        series = {"OOF": (preds["oof"]["pred"].to_numpy(), oracle["train"]),
                  "valid holdout": (preds["valid"]["pred"].to_numpy(), oracle["valid"])}
        if plots.draw(run / CALIBRATION_PNG, plots.calibration, run.name, series):
            pictures.append(("Predicted vs true click probability (synthetic data)", CALIBRATION_PNG))
    return pictures


# ---------------------------------------------------------------------------------------------
# reading a finished run (the blend, the summary)
# ---------------------------------------------------------------------------------------------

def read_metrics(run: Path) -> dict:
    """A run's aggregate metrics.json; an unreadable one, or JSON of another shape, is a UserError."""
    metrics = common.read_json(run / "metrics.json")
    if not isinstance(metrics, dict) or "oof_auc" not in metrics:
        raise UserError(f"{run / 'metrics.json'}: not the aggregates of a run")
    return metrics


def require_finished(run: Path, name: str, data_fingerprint: str, n_folds: int) -> None:
    """A one-line UserError unless ``run`` is a finished run made from this processed data."""
    if not run.is_dir():
        raise UserError(f"{run}: run '{name}' not found (train it first with src/train.py, or fix blend.runs)")
    stamp = run / "fingerprint.json"
    if not stamp.is_file():
        raise UserError(f"{stamp}: missing: '{name}' is not a run written by src/train.py")
    stamped = common.read_json(stamp)
    run_fingerprint = stamped.get("data_fingerprint") if isinstance(stamped, dict) else None
    if run_fingerprint != data_fingerprint:
        raise UserError(f"{stamp}: run '{name}' was trained on other data (data fingerprint "
                        f"{run_fingerprint}, the processed data has {data_fingerprint}): retrain it")
    for k in range(n_folds):
        if not fold_done(run, k):
            raise UserError(f"{run}: run '{name}' is not finished: fold {k} is not done "
                            f"(fold{k}/done.json missing or unreadable); rerun src/train.py with its "
                            f"config to finish it")


def read_run_file(path: Path, split: str, name: str) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: missing: run '{name}' is not finished (src/train.py writes it once "
                        f"every fold is done)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a damaged file; all mean the same here
        raise UserError(f"{path}: not a readable parquet file ({common.first_line(exc)})") from None
    for column in (ID_COLUMN[split], "pred") + (("fold",) if split == "oof" else ()):
        if column not in frame.columns:
            raise UserError(f"{path}: column '{column}': missing (found: {', '.join(map(str, frame.columns))})")
    return frame


def aligned_predictions(path: Path, frame: pd.DataFrame, split: str, expected_ids: np.ndarray,
                        expected_fold: np.ndarray | None, processed_split: str) -> np.ndarray:
    """The predictions in the order of ``expected_ids``, after checking rows, folds and values."""
    id_column = ID_COLUMN[split]
    if len(frame) != len(expected_ids):
        raise UserError(f"{path}: {len(frame):,} rows, but the processed {processed_split} split has "
                        f"{len(expected_ids):,}: the run does not line up with the processed data")
    frame = frame.sort_values(id_column, kind="stable")
    ids = frame[id_column].to_numpy()
    differ = np.flatnonzero(ids != expected_ids)
    if len(differ):
        raise UserError(f"{path}: column '{id_column}': row ids differ from the processed "
                        f"{processed_split} split ({ids[differ[0]]} where {expected_ids[differ[0]]} was "
                        f"expected): the run does not line up with the processed data")
    if expected_fold is not None:
        other_fold = np.flatnonzero(frame["fold"].to_numpy() != expected_fold)
        if len(other_fold):
            raise UserError(f"{path}: column 'fold': {len(other_fold):,} rows differ from the processed "
                            f"train_fold.npy (first: row_id {ids[other_fold[0]]}): the run used other folds")
    preds = frame["pred"].to_numpy(np.float64)
    nan = np.isnan(preds)
    if nan.any():
        raise UserError(f"{path}: column 'pred': {int(nan.sum()):,} NaN predictions (first: "
                        f"{id_column} {ids[np.flatnonzero(nan)[0]]})")
    outside = ~((preds >= 0) & (preds <= 1))
    if outside.any():
        first = np.flatnonzero(outside)[0]
        raise UserError(f"{path}: column 'pred': {int(outside.sum()):,} values outside [0, 1] (first: "
                        f"{preds[first]:g} at {id_column} {ids[first]})")
    return preds


def hidden_test_auc(pred_path: Path, labels: np.ndarray | None) -> float | None:
    """AUC of a finished run's (or the blend's) test.parquet on the hidden test labels of synthetic
    data; None without labels (real data)."""
    if labels is None:
        return None
    if not pred_path.is_file():
        raise UserError(f"{pred_path}: missing: the run changed after the blend (a retraining "
                        f"not finished?); finish it with src/train.py, then rerun src/blend.py")
    frame = read_run_file(pred_path, "test", pred_path.parent.name).sort_values("ID")
    pred = frame["pred"].to_numpy(np.float64)
    if not np.array_equal(frame["ID"].to_numpy(), np.arange(len(labels))):
        raise UserError(f"{pred_path}: column 'ID': {len(frame)} rows that are not the "
                        f"{len(labels)} test IDs of the oracle labels: other data?")
    if not np.isfinite(pred).all():
        raise UserError(f"{pred_path}: column 'pred': NaN or infinite predictions")
    return roc_auc(labels, pred)


PROCESSED_SPLIT = {"oof": "train", "valid": "valid", "test": "test"}  # the OOF rows are the train rows


def prediction_path(run: Path, split: str, test_from: str = "folds") -> Path:
    """The file a blend reads a run's split from: the OOF rows from the folds, valid and test from the
    fold mean or, with test_from 'refit', from the refit."""
    return (fold_dir(run, REFIT) if test_from == REFIT and split != "oof" else run) / f"{split}.parquet"


def read_predictions(run: Path, name: str, manifest: dict, expected: dict[str, np.ndarray],
                     fold: np.ndarray, test_from: str = "folds") -> dict[str, np.ndarray]:
    """A finished run's OOF/valid/test predictions aligned to the expected ids (split -> ids), or
    a one-line UserError saying why they cannot be used. test_from 'refit' takes the valid and test
    predictions of the run's refit (one model on every train row) instead of the fold mean."""
    require_finished(run, name, manifest["fingerprint"], int(manifest["n_folds"]))
    if test_from == REFIT and not fold_done(run, REFIT):
        raise UserError(f"{run}: run '{name}' has no finished refit ({REFIT}/done.json missing): run "
                        f"src/train.py --refit with its config, or blend with blend.test_from: folds")
    preds = {}
    for split in SPLITS:
        path = prediction_path(run, split, test_from)
        preds[split] = aligned_predictions(path, read_run_file(path, split, name), split, expected[split],
                                           fold if split == "oof" else None, PROCESSED_SPLIT[split])
    return preds
