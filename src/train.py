"""K-fold trainer: one model config in, out-of-fold, valid-holdout and test predictions out.

    python src/train.py --config configs/qin.yaml [--set train.lr=1e-3] [--folds 0,2] [--device cpu]

Each fold trains on the other folds' train rows with QIN's released schedule (configs/train.yaml):
Adam, L2 on the embedding tables only, gradient-norm clipping, and after every epoch the AUC on the
official valid split (train.early_stopping: valid, as released) or on the fold's held-out train rows
(holdout); an epoch without improvement halves the learning rate and counts toward early stopping.
Both AUCs are logged every epoch. The best epoch's predictions of the held-out rows are the OOF
predictions; its weights then predict the test set.

The processed arrays are uploaded to the device once. A batch is a gather of shuffled row indices
on the device: no data loader, no per-batch host work, no per-fold copy of the data, and no host
sync inside the step loop, so the GPU is fed as fast as it can compute.

Outputs: {work_dir}/runs/<run.name>/ exactly as docs/DESIGN.md ("Run directory"). A fold is
complete once fold{k}/done.json exists; a rerun skips complete folds and redoes the others from
scratch with the same seed, so an interrupted run ends with the same predictions as an
uninterrupted one. Outputs made under another config or other data are discarded, never reused.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from tqdm import tqdm

import common
import model_config
import preprocess
from common import UserError

# The columns a model's batch holds (docs/DESIGN.md "Models"), stored as {split}_{name}.npy.
FEATURES = ("user_id", "item_id", "item_seq", "likes_level", "views_level")
ITEM_TABLES = ("item_tags", "item_emb", "item_likes_level", "item_views_level")

# Keys that change where or how visibly a run happens, not what it computes: left out of the
# fingerprint, so that e.g. finishing a run's last folds on another device reuses the others.
RUN_TIME_ONLY_KEYS = (("train", "device"), ("train", "log_every"))

TRAIN_KEY_TYPES = {
    "seed": int, "batch_size": int, "eval_batch_size": int, "lr": float, "lr_min": float,
    "lr_decay": float, "min_delta": float, "patience": int, "max_epochs": int, "emb_l2": float,
    "grad_clip": float, "bf16": bool, "compile": bool, "device": str, "log_every": int,
    "early_stopping": str,
}
EARLY_STOPPING = ("valid", "holdout")
AGGREGATE_FILES = ("oof.parquet", "valid.parquet", "test.parquet", "metrics.json", "report.md")


# ---------------------------------------------------------------------------------------------
# configuration and device
# ---------------------------------------------------------------------------------------------

def coerce(key: str, value, kind: type):
    """``value`` as ``kind`` (8192.0 is a fine int, 1 a fine float), or a UserError naming train.<key>."""
    if isinstance(value, bool) == (kind is bool):  # True is an int to Python, not to a config
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind is int and isinstance(value, (int, float)) and float(value).is_integer():
            return int(value)
        if isinstance(value, kind):
            return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    raise UserError(f"config: train.{key} must be {expected}, got {value!r}")


def checked_config(cfg: dict, device: str | None) -> dict:
    """A copy of ``cfg`` with its train section type-checked and coerced, and ``device`` applied."""
    cfg = copy.deepcopy(cfg)
    for section in ("data", "run", "train", "model"):
        if not isinstance(cfg.get(section), dict):
            raise UserError(f"config: missing section '{section}:' (train with a model config, "
                            f"e.g. --config configs/qin.yaml)")
    name = cfg["run"].get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"config: run.name must be a plain folder name, got {name!r}")
    train = cfg["train"]
    if device is not None:
        train["device"] = device
    unknown = sorted(set(train) - set(TRAIN_KEY_TYPES))
    if unknown:  # a typo must not silently train with the default
        raise UserError(f"config: unknown key train.{unknown[0]} (known: {', '.join(sorted(TRAIN_KEY_TYPES))})")
    for key, kind in TRAIN_KEY_TYPES.items():
        if key not in train:
            raise UserError(f"config: missing key train.{key} (see configs/train.yaml)")
        train[key] = coerce(key, train[key], kind)
    for key in ("batch_size", "eval_batch_size", "patience", "max_epochs", "log_every"):
        if train[key] < 1:
            raise UserError(f"config: train.{key} must be at least 1, got {train[key]}")
    for key in ("lr", "lr_min", "lr_decay", "grad_clip"):
        if not train[key] > 0:
            raise UserError(f"config: train.{key} must be positive, got {train[key]}")
    if train["early_stopping"] not in EARLY_STOPPING:
        raise UserError(f"config: train.early_stopping must be {' or '.join(EARLY_STOPPING)}, "
                        f"got {train['early_stopping']!r}")
    return cfg


def fingerprint_of(cfg: dict, manifest: dict) -> dict:
    """What the outputs depend on: the config (minus run-time-only keys) and the processed data."""
    relevant = copy.deepcopy(cfg)
    for section, key in RUN_TIME_ONLY_KEYS:
        relevant[section].pop(key, None)
    return {"config_hash": common.config_hash(relevant), "data_fingerprint": manifest["fingerprint"]}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"config: train.device must be auto, cpu or cuda, got {requested!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"config: train.device must be auto, cpu or cuda, got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("config: train.device is cuda but torch sees no CUDA device")
    return device


def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        # float32 matmuls that autocast leaves alone run on tensor cores: ~10 bits of mantissa is
        # plenty for a CTR model and several times faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # the same command twice gives bit-identical predictions on CPU (CUDA keeps its fast,
        # atomics-based kernels: a GPU run is reproducible only up to float rounding)
        torch.use_deterministic_algorithms(True)


# ---------------------------------------------------------------------------------------------
# data: uploaded once, batches gathered on the device
# ---------------------------------------------------------------------------------------------

@dataclass
class DeviceData:
    features: dict[str, dict[str, torch.Tensor]]  # split -> feature -> [N] or [N, 64], on device
    labels: dict[str, torch.Tensor]               # train, valid -> float32 [N], on device
    host_labels: dict[str, np.ndarray]            # the same labels on the host, for the metrics
    tables: dict                                   # the item tables and vocab sizes for build_model


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # load_processed maps the files copy-on-write: on CPU the tensor is that mapping (the page
    # cache is the one copy in RAM), on CUDA it is read straight from it onto the GPU
    return torch.from_numpy(array).to(device)


def item_tables(arrays: dict, manifest: dict, device: torch.device) -> dict:
    """The item tables and vocabulary sizes model_config.build_model takes."""
    tables = {name: upload(arrays[name], device) for name in ITEM_TABLES}
    vocab = manifest["vocab"]
    tables.update(n_items=vocab["item"], n_tags=vocab["tag"], n_users=vocab["user"],
                  n_levels=vocab["level"])
    return tables


def load_to_device(arrays: dict, manifest: dict, device: torch.device) -> DeviceData:
    features = {split: {name: upload(arrays[f"{split}_{name}"], device) for name in FEATURES}
                for split in ("train", "valid", "test")}
    labels = {split: upload(arrays[f"{split}_label"], device) for split in ("train", "valid")}
    tables = item_tables(arrays, manifest, device)
    host_labels = {split: np.asarray(arrays[f"{split}_label"]) for split in ("train", "valid")}
    return DeviceData(features, labels, host_labels, tables)


def gather(features: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: column[rows] for name, column in features.items()}


# ---------------------------------------------------------------------------------------------
# one fold
# ---------------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, train_cfg: dict, device: torch.device) -> torch.optim.Adam:
    embedding_weights = {id(m.weight): m.weight for m in model.modules()
                         if isinstance(m, nn.Embedding) and m.weight.requires_grad}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in embedding_weights]
    # Adam's weight_decay is the classic coupled L2: it adds emb_l2 * W to the gradient, exactly
    # the gradient of a penalty emb_l2/2 * ||W||^2 in the loss (FuxiCTR's embedding_regularizer),
    # and a param group confines it to the embedding tables.
    groups = [{"params": list(embedding_weights.values()), "weight_decay": train_cfg["emb_l2"]},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=train_cfg["lr"],
                            fused=device.type == "cuda")


def bf16_enabled(train_cfg: dict, device: torch.device) -> bool:
    return train_cfg["bf16"] and device.type == "cuda"  # the CPU always trains in float32


def make_step_parts(model: nn.Module, train_cfg: dict, device: torch.device):
    """(loss_fn, forward, optimizer, autocast) of a run: one place, so tools/bench.py times exactly the
    training and prediction that train_fold runs (torch.compile, bfloat16 autocast, fused Adam)."""
    loss_fn = torch.compile(model.loss) if train_cfg["compile"] else model.loss
    forward = torch.compile(model) if train_cfg["compile"] else model
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                 enabled=bf16_enabled(train_cfg, device))
    return loss_fn, forward, make_optimizer(model, train_cfg, device), autocast


def train_one_epoch(model, loss_fn, optimizer, features, labels, rows, generator, train_cfg,
                    autocast, desc) -> tuple[float, float]:
    """One pass over ``rows`` in shuffled order; returns (mean train loss, seconds)."""
    start = time.time()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the permutation is drawn on the CPU so that the shuffle is the same on every device
    order = rows[torch.randperm(rows.numel(), generator=generator).to(rows.device)]
    # near-equal batches instead of full ones plus a remainder: no tiny last batch for BatchNorm
    batches = order.tensor_split(math.ceil(rows.numel() / train_cfg["batch_size"]))
    loss_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
    seen = 0
    with tqdm(total=rows.numel(), desc=desc, unit="rows", unit_scale=True, leave=False,
              mininterval=1.0, dynamic_ncols=True) as bar:
        for step, batch_rows in enumerate(batches, 1):
            with autocast():
                loss, _ = loss_fn(gather(features, batch_rows), labels[batch_rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train_cfg["grad_clip"], foreach=True)
            optimizer.step()
            loss_sum += loss.detach() * batch_rows.numel()
            seen += batch_rows.numel()
            bar.update(batch_rows.numel())
            if step % train_cfg["log_every"] == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")  # the loop's only host sync
    mean_loss = loss_sum.item() / seen
    return mean_loss, time.time() - start


@torch.inference_mode()
def predict(forward, features, rows, batch_size, autocast) -> np.ndarray:
    """Click probabilities of ``rows`` (device indices), in that order, as float32 on the host."""
    probs = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
    for start in range(0, rows.numel(), batch_size):
        batch_rows = rows[start:start + batch_size]
        with autocast():
            logits = forward(gather(features, batch_rows))
        probs[start:start + batch_rows.numel()] = torch.sigmoid(logits.float())
    return probs.cpu().numpy()


def auc_and_logloss(labels: np.ndarray, probs: np.ndarray, what: str) -> tuple[float, float]:
    if not np.isfinite(probs).all():
        raise UserError(f"{what}: non-finite predictions, training diverged (try a lower train.lr)")
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logloss = -np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p))
    return common.roc_auc(labels, probs), float(logloss)


def train_fold(fold: int, cfg: dict, data: DeviceData, fold_of_row: np.ndarray, test_ids: np.ndarray,
               device: torch.device, fold_dir: Path) -> dict:
    """Train fold ``fold`` from scratch and write its files; returns its metrics (done.json)."""
    train_cfg = cfg["train"]
    fold_start = time.time()
    seed = train_cfg["seed"] + fold
    common.seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)

    # the model is built on the CPU so that its initial weights do not depend on the device
    model = model_config.build_model(cfg["model"], data.tables).to(device)
    loss_fn, forward, optimizer, autocast = make_step_parts(model, train_cfg, device)
    use_bf16 = bf16_enabled(train_cfg, device)

    train_rows = torch.from_numpy(np.flatnonzero(fold_of_row != fold)).to(device)
    holdout_rows_host = np.flatnonzero(fold_of_row == fold)
    holdout_rows = torch.from_numpy(holdout_rows_host).to(device)
    if train_rows.numel() == 0 or holdout_rows.numel() == 0:
        raise UserError(f"train_fold.npy: fold {fold} leaves no rows to train on or to hold out")
    holdout_labels = data.host_labels["train"][holdout_rows_host]
    valid_rows = torch.arange(data.labels["valid"].numel(), device=device)
    monitor = train_cfg["early_stopping"]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common.log(f"fold {fold}: {train_rows.numel():,} train rows, {holdout_rows.numel():,} held out, "
               f"{n_params:,} parameters, device {device}{', bf16' if use_bf16 else ''}")

    lr = train_cfg["lr"]
    best = {"monitored": -math.inf}
    history, bad_epochs, train_seconds, rows_trained = [], 0, 0.0, 0
    for epoch in range(1, train_cfg["max_epochs"] + 1):
        epoch_start = time.time()
        train_loss, seconds = train_one_epoch(
            model, loss_fn, optimizer, data.features["train"], data.labels["train"], train_rows,
            generator, train_cfg, autocast, desc=f"fold {fold} epoch {epoch}")
        train_seconds += seconds
        rows_trained += train_rows.numel()
        model.eval()
        probs = {"holdout": predict(forward, data.features["train"], holdout_rows,
                                    train_cfg["eval_batch_size"], autocast),
                 "valid": predict(forward, data.features["valid"], valid_rows,
                                  train_cfg["eval_batch_size"], autocast)}
        scores = {}
        for prefix, split, labels in (("fold", "holdout", holdout_labels),
                                      ("valid", "valid", data.host_labels["valid"])):
            scores[f"{prefix}_auc"], scores[f"{prefix}_logloss"] = auc_and_logloss(
                labels, probs[split], f"fold {fold} epoch {epoch} {split}")
        monitored = scores["valid_auc" if monitor == "valid" else "fold_auc"]
        improved = monitored > best["monitored"] + train_cfg["min_delta"]
        if improved:
            # the best epoch's predictions of the held-out rows are the OOF predictions, and
            # its valid predictions the fold's: kept rather than predicted again after training
            best = {"monitored": monitored, "epoch": epoch, "scores": scores,
                    "oof": probs["holdout"], "valid": probs["valid"],
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        history.append({"epoch": epoch, "train_loss": train_loss, **scores, "lr": lr,
                        "seconds": time.time() - epoch_start})
        common.write_json(fold_dir / "history.json", history)
        common.log(f"fold {fold} epoch {epoch:3d}  train loss {train_loss:.5f}  "
                   f"fold AUC {scores['fold_auc']:.6f}  valid AUC {scores['valid_auc']:.6f} "
                   f"({monitor} decides)  lr {lr:.2e}  "
                   f"{time.time() - fold_start:.0f}s" + ("  *best" if improved else ""))
        if not improved:
            lr = max(lr * train_cfg["lr_decay"], train_cfg["lr_min"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            if bad_epochs >= train_cfg["patience"]:
                break

    model.load_state_dict(best["state"])
    model.eval()
    with common.atomic_path(fold_dir / "best.pt") as tmp:
        torch.save({k: v.cpu() for k, v in best["state"].items()}, tmp)
    test_probs = predict(forward, data.features["test"], torch.arange(
        len(test_ids), device=device), train_cfg["eval_batch_size"], autocast)
    common.write_parquet(fold_dir / "oof.parquet",
                         pd.DataFrame({"row_id": holdout_rows_host, "pred": best["oof"]}))
    common.write_parquet(fold_dir / "valid.parquet",
                         pd.DataFrame({"row_id": np.arange(len(best["valid"])), "pred": best["valid"]}))
    common.write_parquet(fold_dir / "test.parquet", pd.DataFrame({"ID": test_ids, "pred": test_probs}))
    metrics = {"fold": fold, "best_epoch": best["epoch"], "epochs": len(history),
               "early_stopping": monitor, **best["scores"], "train_rows": int(train_rows.numel()),
               "rows_per_s": rows_trained / train_seconds, "seconds": time.time() - fold_start,
               "device": str(device)}
    common.write_json(fold_dir / "done.json", metrics)
    common.log(f"fold {fold} done: best epoch {best['epoch']} by {monitor} AUC, fold AUC "
               f"{metrics['fold_auc']:.6f}, valid AUC {metrics['valid_auc']:.6f}, "
               f"{metrics['rows_per_s']:,.0f} rows/s, "
               f"{metrics['seconds']:.0f}s")
    return metrics


# ---------------------------------------------------------------------------------------------
# run directory
# ---------------------------------------------------------------------------------------------

def fold_dirs(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.glob("fold*") if p.is_dir() and re.fullmatch(r"fold\d+", p.name)]


def written_config(path: Path) -> dict | None:
    """The config a run folder records, or None if there is none that reads back."""
    try:
        return common.parse_yaml(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


def fold_done(run_dir: Path, fold: int) -> bool:
    """Whether fold{k}/done.json exists and reads back (a damaged one means the fold is redone)."""
    done = run_dir / f"fold{fold}" / "done.json"
    if not done.is_file():
        return False
    try:
        return isinstance(common.read_json(done), dict)
    except UserError as exc:
        common.log(f"{exc}: fold {fold} counts as not done")
        return False


def read_fold_file(run_dir: Path, fold: int, name: str, columns: list[str]) -> pd.DataFrame:
    try:
        return common.read_parquet(run_dir / f"fold{fold}" / name, columns)
    except UserError as exc:
        raise UserError(f"{exc}; delete {run_dir / f'fold{fold}'} and rerun to retrain that fold") from None


def remove_aggregates(run_dir: Path) -> None:
    for name in AGGREGATE_FILES:
        (run_dir / name).unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, fingerprint: dict) -> None:
    """Discard outputs made under another config or other data, then record this fingerprint."""
    stamp = run_dir / "fingerprint.json"
    try:
        previous = common.read_json(stamp) if stamp.is_file() else None
    except UserError as exc:  # a damaged stamp vouches for nothing: its outputs count as another's
        common.log(str(exc))
        previous = None
    has_outputs = bool(fold_dirs(run_dir)) or any((run_dir / name).exists() for name in AGGREGATE_FILES)
    if previous != fingerprint and has_outputs:
        common.log(f"{run_dir}: outputs were made with another config or other data "
                   f"(fingerprint {previous} != {fingerprint}): discarding them")
        for path in fold_dirs(run_dir):
            shutil.rmtree(path)
        remove_aggregates(run_dir)
    if previous != fingerprint:  # an unchanged stamp stays untouched, mtime included
        common.write_json(stamp, fingerprint)


def write_aggregates(run_dir: Path, n_folds: int, arrays: dict, raw_dir: Path) -> dict:
    """OOF (every train row once), fold-mean valid and test predictions, metrics.json, report.md."""
    fold_metrics = [common.read_json(run_dir / f"fold{k}" / "done.json") for k in range(n_folds)]
    oof = pd.concat([read_fold_file(run_dir, k, "oof.parquet", ["row_id", "pred"]).assign(fold=k)
                     for k in range(n_folds)]).sort_values("row_id", kind="stable")
    train_labels = np.asarray(arrays["train_label"], dtype=np.float64)
    if not np.array_equal(oof["row_id"].to_numpy(), np.arange(len(train_labels))):
        raise UserError(f"{run_dir}: fold OOF files do not cover every train row exactly once")
    oof = oof[["row_id", "fold", "pred"]].astype({"fold": np.int8})

    def fold_mean(split: str, id_column: str) -> pd.DataFrame:
        frames = [read_fold_file(run_dir, k, f"{split}.parquet", [id_column, "pred"]).sort_values(id_column)
                  for k in range(n_folds)]
        for k, frame in enumerate(frames):
            if not np.array_equal(frame[id_column].to_numpy(), frames[0][id_column].to_numpy()):
                raise UserError(f"{run_dir / f'fold{k}' / f'{split}.parquet'}: column '{id_column}': other "
                                f"rows than fold 0's; delete {run_dir / f'fold{k}'} and rerun to retrain it")
        preds = np.mean([f["pred"].to_numpy(np.float64) for f in frames], axis=0)
        return pd.DataFrame({id_column: frames[0][id_column].to_numpy(), "pred": preds.astype(np.float32)})

    valid, test = fold_mean("valid", "row_id"), fold_mean("test", "ID")
    valid_labels = np.asarray(arrays["valid_label"], dtype=np.float64)
    oof_auc, oof_logloss = auc_and_logloss(train_labels, oof["pred"].to_numpy(), "OOF")
    valid_auc, valid_logloss = auc_and_logloss(valid_labels, valid["pred"].to_numpy(), "valid")

    def oracle_auc(split: str, labels: np.ndarray) -> float | None:
        # the true click probabilities (synthetic data only) score the ceiling any model could
        # reach on the same rows
        prob = common.read_oracle_prob(raw_dir, split)
        return None if prob is None else common.roc_auc(labels, prob)

    metrics = {
        "n_folds": n_folds, "early_stopping": fold_metrics[0]["early_stopping"],
        "oof_auc": oof_auc, "oof_logloss": oof_logloss,
        "valid_auc": valid_auc, "valid_logloss": valid_logloss,
        "oracle_oof_auc": oracle_auc("train", train_labels),
        "oracle_valid_auc": oracle_auc("valid", valid_labels),
        "seconds": sum(m["seconds"] for m in fold_metrics), "folds": fold_metrics,
    }
    common.write_parquet(run_dir / "oof.parquet", oof)
    common.write_parquet(run_dir / "valid.parquet", valid)
    common.write_parquet(run_dir / "test.parquet", test)
    common.write_json(run_dir / "metrics.json", metrics)
    common.write_text(run_dir / "report.md", report_markdown(run_dir.name, metrics))
    return metrics


EARLY_STOPPING_NOTE = {
    "valid": "on the valid split's AUC (as QIN was released), which chose each fold's epoch, so the "
             "holdout AUC flatters a little; the OOF AUC is untouched",
    "holdout": "on each fold's held-out train rows, so the valid holdout AUC is an untouched check",
}


def oracle_text(value: float | None) -> str:
    return "n/a (real data)" if value is None else f"{value:.6f}"


def report_markdown(run_name: str, metrics: dict) -> str:
    lines = [f"# Run {run_name}: {metrics['n_folds']}-fold training", "",
             "| fold | best epoch | epochs | fold AUC | fold logloss | valid AUC | rows/s | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in metrics["folds"]:
        lines.append(f"| {m['fold']} | {m['best_epoch']} | {m['epochs']} | {m['fold_auc']:.6f} | "
                     f"{m['fold_logloss']:.5f} | {m['valid_auc']:.6f} | {m['rows_per_s']:,.0f} | "
                     f"{m['seconds']:.0f} |")
    lines += ["", "| predictions | AUC | logloss | oracle AUC (true probabilities, same rows) |",
              "|---|---:|---:|---:|",
              f"| OOF (every train row) | {metrics['oof_auc']:.6f} | {metrics['oof_logloss']:.5f} | "
              f"{oracle_text(metrics['oracle_oof_auc'])} |",
              f"| valid holdout (fold mean) | {metrics['valid_auc']:.6f} | {metrics['valid_logloss']:.5f} | "
              f"{oracle_text(metrics['oracle_valid_auc'])} |",
              "", f"Early stopping: {EARLY_STOPPING_NOTE[metrics['early_stopping']]}.",
              "", f"Training time: {metrics['seconds']:.0f} s over all folds.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def run_training(cfg: dict, folds: list[int] | None = None, device: str | None = None) -> Path:
    """Train the given folds (default: all) that are not done yet; returns the run directory."""
    run_start = time.time()
    cfg = checked_config(cfg, device)
    processed_dir = preprocess.run_preprocess(cfg)
    arrays, manifest = preprocess.load_processed(processed_dir)
    n_folds = int(manifest["n_folds"])
    folds = list(range(n_folds)) if folds is None else sorted(set(folds))
    if any(not 0 <= k < n_folds for k in folds):
        raise UserError(f"--folds {','.join(map(str, folds))}: the data has folds 0..{n_folds - 1}")

    # every check that can fail comes before the run folder is touched: a typo in a --set must
    # not discard finished folds. The model is built on the meta device: no memory, no init.
    torch_device = resolve_device(cfg["train"]["device"])
    with torch.device("meta"):
        model_config.build_model(cfg["model"], item_tables(arrays, manifest, torch.device("cpu")))

    run_dir = common.data_paths(cfg)["runs"] / cfg["run"]["name"]
    prepare_run_dir(run_dir, fingerprint_of(cfg, manifest))
    config_path = run_dir / "config.yaml"
    if written_config(config_path) != cfg:  # an unchanged config.yaml stays untouched
        common.write_yaml(config_path, cfg)

    todo = [k for k in folds if not fold_done(run_dir, k)]
    skipped = [k for k in folds if k not in todo]
    if skipped:
        common.log(f"{run_dir}: folds {skipped} already done, skipped")
    if todo:
        remove_aggregates(run_dir)  # they would describe folds about to change
        configure_backend(torch_device)
        data = load_to_device(arrays, manifest, torch_device)
        fold_of_row = np.asarray(arrays["train_fold"])
        test_ids = np.asarray(arrays["test_ID"], dtype=np.int64)
        for k in todo:
            fold_dir = run_dir / f"fold{k}"
            shutil.rmtree(fold_dir, ignore_errors=True)  # leftovers of an interrupted attempt
            train_fold(k, cfg, data, fold_of_row, test_ids, torch_device, fold_dir)

    done = [k for k in range(n_folds) if fold_done(run_dir, k)]
    missing = [k for k in range(n_folds) if k not in done]
    metrics = None if missing else write_aggregates(run_dir, n_folds, arrays, Path(cfg["data"]["raw_dir"]))
    print_summary(run_dir, done, missing, metrics, time.time() - run_start)
    return run_dir


def print_summary(run_dir: Path, done: list[int], missing: list[int], metrics: dict | None,
                  seconds: float) -> None:
    print(f"\n=== {run_dir.name}: summary")
    for k in done:
        m = common.read_json(run_dir / f"fold{k}" / "done.json")
        print(f"fold {k}: fold AUC {m['fold_auc']:.6f}  valid AUC {m['valid_auc']:.6f}  "
              f"best epoch {m['best_epoch']}/{m['epochs']}  {m['rows_per_s']:,.0f} rows/s  "
              f"{m['seconds']:.0f}s")
    if metrics is None:
        print(f"folds missing: {','.join(map(str, missing))} (aggregates are written once every fold "
              f"is done: rerun without --folds or with --folds {','.join(map(str, missing))})")
    else:
        print(f"OOF AUC     {metrics['oof_auc']:.6f}   oracle {oracle_text(metrics['oracle_oof_auc'])}")
        print(f"holdout AUC {metrics['valid_auc']:.6f}   oracle {oracle_text(metrics['oracle_valid_auc'])}")
        print(f"early stopping: {EARLY_STOPPING_NOTE[metrics['early_stopping']]}")
        print(f"training time over all folds {metrics['seconds']:.0f}s")
    print(f"this command took {seconds:.0f}s; run dir {run_dir}")


def parse_folds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "qin.yaml")
    parser.add_argument("--folds", type=parse_folds, default=None, metavar="K,K,...",
                        help="train only these folds (default: all); aggregates need every fold done")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="force the device (default: train.device, auto = CUDA when present)")
    args = parser.parse_args()
    run_training(common.config_from_args(args), args.folds, args.device)


if __name__ == "__main__":
    common.run_main(main)
