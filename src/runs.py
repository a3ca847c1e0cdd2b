"""The run folder {work_dir}/runs/<name>/: the one module that writes and reads it.

Layout (docs/DESIGN.md "Run directory"): config.yaml, fingerprint.json, fold{k}/{best.pt,
history.json, oof.parquet, valid.parquet, test.parquet, done.json}, once every fold is done the
aggregates oof.parquet, valid.parquet, test.parquet, metrics.json, report.md, and optionally
refit/ (one model on every train row: best.pt, history.json, valid.parquet, test.parquet,
done.json). Every file is
written atomically; a fold is done when its done.json (written last) reads back as a mapping.
Predictions are stored with their row ids (``row_id`` for train and valid rows, ``ID`` for test),
so that reading them back is a join on the ids, checked here against the ids the caller expects.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

import common
from common import UserError
from metrics import log_loss, roc_auc

SPLITS = ("oof", "valid", "test")
ID_COLUMN = {"oof": "row_id", "valid": "row_id", "test": "ID"}
AGGREGATE_FILES = ("oof.parquet", "valid.parquet", "test.parquet", "metrics.json", "report.md")
EARLY_STOPPING_NOTE = {
    "valid": "on the valid split's AUC (as QIN was released), which chose each fold's epoch, so the "
             "holdout AUC flatters a little; the OOF AUC is untouched",
    "holdout": "on each fold's held-out train rows, so the valid holdout AUC is an untouched check",
}


# ---------------------------------------------------------------------------------------------
# numbers in reports
# ---------------------------------------------------------------------------------------------

def auc_text(value: float | None, digits: int = 6) -> str:
    """An AUC as every report prints it; None (no labels: real data's oracle or test) as n/a."""
    return "n/a (real data)" if value is None else f"{value:.{digits}f}"


def markdown_table(header: tuple, rows: list[tuple], align: str | None = None) -> list[str]:
    """Lines of a markdown table; align holds one of l/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(map(str, header)) + " |", rule] + ["| " + " | ".join(map(str, r)) + " |"
                                                                for r in rows]


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


def prepare(run: Path, fingerprint: dict, cfg: dict) -> None:
    """Discard outputs made under another fingerprint, then record this fingerprint and config."""
    previous = read_fingerprint(run)
    has_outputs = bool(fold_dirs(run)) or any((run / name).exists() for name in AGGREGATE_FILES)
    if previous != fingerprint and has_outputs:
        common.log(f"{run}: outputs were made with another config or other data "
                   f"(fingerprint {previous} != {fingerprint}): discarding them")
        for path in fold_dirs(run):
            shutil.rmtree(path)
        remove_aggregates(run)
    if previous != fingerprint:  # an unchanged stamp stays untouched, mtime included
        common.write_json(run / "fingerprint.json", fingerprint)
    config_path = run / "config.yaml"
    try:
        written = common.parse_yaml(config_path.read_text()) if config_path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        written = None
    if written != cfg:  # an unchanged config.yaml stays untouched
        common.write_yaml(config_path, cfg)


def remove_aggregates(run: Path) -> None:
    for name in AGGREGATE_FILES:
        (run / name).unlink(missing_ok=True)


def clear_fold(run: Path, fold: int | str) -> None:
    shutil.rmtree(fold_dir(run, fold), ignore_errors=True)  # leftovers of an interrupted attempt


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


def write_fold(run: Path, fold: int | str, state: dict, preds: dict[str, tuple[np.ndarray, np.ndarray]],
               metrics: dict) -> None:
    """A finished fold: its checkpoint, its predictions (split -> (ids, probabilities)), done.json last."""
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
    common.write_text(run / "report.md", report_markdown(run.name, metrics))
    return metrics


def report_markdown(run_name: str, metrics: dict) -> str:
    folds = [(m["fold"], m["best_epoch"], m["epochs"], auc_text(m["fold_auc"]), f"{m['fold_logloss']:.5f}",
              auc_text(m["valid_auc"]), f"{m['rows_per_s']:,.0f}", f"{m['seconds']:.0f}")
             for m in metrics["folds"]]
    totals = [("OOF (every train row)", auc_text(metrics["oof_auc"]), f"{metrics['oof_logloss']:.5f}",
               auc_text(metrics["oracle_oof_auc"])),
              ("valid holdout (fold mean)", auc_text(metrics["valid_auc"]), f"{metrics['valid_logloss']:.5f}",
               auc_text(metrics["oracle_valid_auc"]))]
    lines = [f"# Run {run_name}: {metrics['n_folds']}-fold training", ""]
    lines += markdown_table(("fold", "best epoch", "epochs", "fold AUC", "fold logloss", "valid AUC",
                             "rows/s", "seconds"), folds, align="r" * 8)
    lines += [""] + markdown_table(("predictions", "AUC", "logloss", "oracle AUC (true probabilities, same rows)"),
                                   totals)
    lines += ["", f"Early stopping: {EARLY_STOPPING_NOTE[metrics['early_stopping']]}.",
              "", f"Training time: {metrics['seconds']:.0f} s over all folds.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reading a finished run (the blend, the summary)
# ---------------------------------------------------------------------------------------------

def read_metrics(run: Path) -> dict:
    return common.read_json(run / "metrics.json")


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


PROCESSED_SPLIT = {"oof": "train", "valid": "valid", "test": "test"}  # the OOF rows are the train rows


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
        path = (fold_dir(run, REFIT) if test_from == REFIT and split != "oof" else run) / f"{split}.parquet"
        preds[split] = aligned_predictions(path, read_run_file(path, split, name), split, expected[split],
                                           fold if split == "oof" else None, PROCESSED_SPLIT[split])
    return preds


def write_finished_run(run: Path, preds: dict[str, np.ndarray], fold: np.ndarray, test_ids: np.ndarray,
                       data_fingerprint: str, refit: dict[str, np.ndarray] | None = None) -> None:
    """A finished run from given predictions in row order, with no model behind them (tests);
    ``refit`` (valid and test predictions) adds a finished refit."""
    common.write_json(run / "fingerprint.json", {"config_hash": "handmade", "data_fingerprint": data_fingerprint})
    for k in range(int(fold.max()) + 1):
        common.write_json(fold_dir(run, k) / "done.json", {"fold": k})
    write_predictions(run, {"oof": prediction_frame("oof", np.arange(len(fold)), preds["oof"], fold),
                            "valid": prediction_frame("valid", np.arange(len(preds["valid"])), preds["valid"]),
                            "test": prediction_frame("test", test_ids, preds["test"])})
    if refit is not None:
        folder = fold_dir(run, REFIT)
        common.write_parquet(folder / "valid.parquet",
                             prediction_frame("valid", np.arange(len(refit["valid"])), refit["valid"]))
        common.write_parquet(folder / "test.parquet", prediction_frame("test", test_ids, refit["test"]))
        common.write_json(folder / "done.json", {"fold": REFIT})
