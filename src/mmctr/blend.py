"""Blend k-fold runs into one test prediction and write the submission.

    python src/blend.py --config configs/blend.yaml [--set blend.select=logistic]

Reads the aggregate predictions of every run in blend.runs ({work_dir}/runs/<name>/oof.parquet,
valid.parquet, test.parquet), checks that they come from the same processed data and line up row by
row, and fits each method of src/mmctr/blend_methods.py (rank_mean, logit_mean, auc_weights,
logistic, lightgbm) on the out-of-fold (OOF) predictions only.

Every method that fits anything (auc_weights, logistic, lightgbm) is cross-fitted: it predicts each
fold's rows with weights or a model that never saw that fold, so its OOF AUC is an honest estimate;
rank_mean and logit_mean fit nothing. The best single run competes as a candidate too, and a blend
is chosen by OOF AUC (select: auto) only when it beats that run out of fold.
The official valid holdout is scored for every candidate and used for nothing else: it shows
whether the OOF choice carries over. A run's valid and test predictions average its fold models, so
they are a little smoother than its OOF ones; the holdout column is where that would show.

Writes {work_dir}/blend/ (oof/valid/test.parquet, metrics.json, report.md with its pictures
candidates.png and, on synthetic data, calibration.png; staged and swapped in whole: the folder is
complete once it exists) and <submission.dir>/<submission.name>-blend.csv and .zip, each validated
before it is renamed into place. The
command line (not run_blend) appends the blend's row to the experiment log (src/experiments.py).
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd

from mmctr import common
from mmctr import experiments
from mmctr import plots
from mmctr import processed_data
from mmctr.blend_methods import (METHODS, ROW_FEATURES, AucWeightsConfig, BlendData, LightGBMConfig,
                                  LogisticConfig, Predictions, lightgbm)
from mmctr.common import UserError
from mmctr.reports import auc_text, markdown_table, picture_lines
from mmctr.runs import PROCESSED_SPLIT, SPLITS, fold_metrics, prediction_path, read_predictions
from mmctr.submission import SubmissionConfig, require_outside, submission_paths, write_submission
from mmctr.models.metrics import roc_auc

BEST_SINGLE = "best_single"
# An OOF AUC above the holdout AUC by more than this is flagged: OOF predictions that saw their own
# rows (a leak) look excellent out of fold and ordinary on the holdout
GAP_WARNING = 0.05
CANDIDATES_PNG, CALIBRATION_PNG = "candidates.png", "calibration.png"  # report.md's pictures


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

Method = Literal[tuple(METHODS)]  # blend.methods' type: a name of the registry


@dataclass
class BlendConfig:
    """The blend: section (configs/blend.yaml)."""
    runs: list[str]                                       # run folders under {work_dir}/runs/
    methods: list[Method] = field(default_factory=lambda: list(get_args(Method)))
    select: str = "auto"                                  # auto | best_single | one of methods
    # whose valid and test predictions the fitted blend is applied to: each run's fold mean, or its
    # refit (one model on every train row, src/train.py --refit)
    test_from: Literal["folds", "refit"] = "folds"
    # each method's settings, under its name (blend_methods.METHODS[name].settings)
    auc_weights: AucWeightsConfig = field(default_factory=AucWeightsConfig)
    logistic: LogisticConfig = field(default_factory=LogisticConfig)
    lightgbm: LightGBMConfig = field(default_factory=LightGBMConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)


def checked_settings(cfg: dict) -> BlendConfig:
    """The blend section, validated: every problem is one line naming the key."""
    if not isinstance(cfg.get("blend"), dict):
        raise UserError("config: missing section 'blend:' (use --config configs/blend.yaml)")
    settings = common.typed_section(BlendConfig, cfg["blend"], "blend")
    # what the annotations cannot say
    runs, methods, select = settings.runs, settings.methods, settings.select
    if not runs or not all(runs):
        raise UserError(f"config: blend.runs must be a non-empty list of run names, got {runs!r}")
    if len(set(runs)) != len(runs):
        raise UserError(f"config: blend.runs names a run twice: {runs}")
    if len(set(methods)) != len(methods):
        raise UserError(f"config: blend.methods names a method twice: {methods}")
    if select not in ("auto", BEST_SINGLE, *methods):
        raise UserError(f"config: blend.select must be auto, {BEST_SINGLE} or one of blend.methods "
                        f"({', '.join(methods) or 'none'}), got {select!r}")
    name = settings.submission.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"config: blend.submission.name must be a plain file stem, got {name!r}")
    return settings


# ---------------------------------------------------------------------------------------------
# the runs' predictions, side by side
# ---------------------------------------------------------------------------------------------

def history_length(item_seq: np.ndarray, chunk_rows: int = 262_144) -> np.ndarray:
    # chunked, so that the full train split's [3.6M, 64] memory map is never read whole into RAM
    return np.concatenate([(item_seq[i:i + chunk_rows] > 0).sum(axis=1)
                           for i in range(0, len(item_seq), chunk_rows)])


def row_features_of(arrays: dict) -> dict[str, np.ndarray]:
    """oof/valid/test -> float32 [N, 3]: the columns of ROW_FEATURES, in that order."""
    def column(name: str, feature: str) -> np.ndarray:
        if feature == "history_len":
            return history_length(arrays[f"{name}_item_seq"])
        return np.asarray(arrays[f"{name}_{feature}"])
    return {split: np.column_stack([column(name, feature) for feature in ROW_FEATURES]).astype(np.float32)
            for split, name in PROCESSED_SPLIT.items()}


def load_blend_data(cfg: dict, runs: list[str], with_row_features: bool, test_from: str = "folds") -> BlendData:
    """Every run's predictions checked against the processed data and stacked column-wise."""
    paths = common.data_paths(cfg)
    _, arrays, manifest = processed_data.load_current(cfg)
    fold = np.asarray(arrays["train_fold"]).astype(np.int64)
    oof_label = np.asarray(arrays["train_label"], dtype=np.float64)
    valid_label = np.asarray(arrays["valid_label"], dtype=np.float64)
    test_ids = np.asarray(arrays["test_ID"], dtype=np.int64)
    for split, labels in (("train", oof_label), ("valid", valid_label)):
        if labels.min() == labels.max():
            raise UserError(f"{paths['processed']}/{split}_label.npy: every label is {labels[0]:.0f}: "
                            f"AUC is undefined")
    expected = {"oof": np.arange(len(oof_label)), "valid": np.arange(len(valid_label)), "test": test_ids}
    per_run = [read_predictions(paths["runs"] / run, run, manifest, expected, fold, test_from) for run in runs]
    probs = {split: np.column_stack([preds[split] for preds in per_run]) for split in SPLITS}
    return BlendData(runs=list(runs), probs=probs, oof_label=oof_label, valid_label=valid_label,
                     fold=fold, test_ids=test_ids,
                     row_features=row_features_of(arrays) if with_row_features else None)


# ---------------------------------------------------------------------------------------------
# candidates, selection and outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A single run or a fitted method: its predictions on every split and their AUCs."""
    name: str
    preds: Predictions
    oof_auc: float
    valid_auc: float
    seconds: float
    details: dict


def evaluate(name: str, preds: Predictions, data: BlendData, seconds: float, details: dict) -> Candidate:
    return Candidate(name, preds, roc_auc(data.oof_label, preds["oof"]),
                     roc_auc(data.valid_label, preds["valid"]), seconds, details)


def single_runs(data: BlendData) -> list[Candidate]:
    return [evaluate(run, {split: data.probs[split][:, r] for split in SPLITS}, data, 0.0, {})
            for r, run in enumerate(data.runs)]


def method_settings(settings: BlendConfig, method: str):
    """The method's own section of the blend settings (blend.<method>:), or None if it has none."""
    return getattr(settings, method) if METHODS[method].settings is not None else None


def fit_methods(data: BlendData, settings: BlendConfig) -> list[Candidate]:
    candidates = []
    for method in settings.methods:
        started = time.time()
        preds, details = METHODS[method].fit(data, method_settings(settings, method))
        candidate = evaluate(method, preds, data, time.time() - started, details)
        common.log(f"{method}: OOF AUC {candidate.oof_auc:.6f}, valid AUC {candidate.valid_auc:.6f} "
                   f"({candidate.seconds:.1f}s)")
        candidates.append(candidate)
    return candidates


def choose(best_single: Candidate, methods: list[Candidate], select: str) -> Candidate:
    """select=auto: the highest OOF AUC, the best single run first so that a tie keeps it."""
    if select == "auto":
        return max([best_single] + methods, key=lambda c: c.oof_auc)
    if select == BEST_SINGLE:
        return best_single
    return next(c for c in methods if c.name == select)


def oracle_probs(cfg: dict, data: BlendData) -> dict[str, np.ndarray | None]:
    """The true click probabilities of the OOF and valid rows (synthetic data only), else None."""
    raw_dir = common.data_paths(cfg)["raw"]
    result = {}
    for split, raw_split, labels in (("oof", "train", data.oof_label), ("valid", "valid", data.valid_label)):
        prob = common.read_oracle_prob(raw_dir, raw_split)
        result[split] = None if prob is None or len(prob) != len(labels) else prob
    return result


def oracle_auc(labels: np.ndarray, prob: np.ndarray | None) -> float | None:
    """AUC of the true click probabilities: the ceiling on the same rows."""
    return None if prob is None else roc_auc(labels, prob)


def chosen_weights(chosen: Candidate, run_names: list[str]) -> tuple[str, dict[str, float]]:
    """(what the numbers are, input -> number): what the chosen candidate puts on each input."""
    if chosen.name in run_names:  # the best single run
        return "weight", {run: float(run == chosen.name) for run in run_names}
    method = METHODS[chosen.name]
    if method.weights is not None:
        what, key = method.weights
        return what, chosen.details[key]
    return f"equal weight on the {method.equal_on}", {run: 1.0 / len(run_names) for run in run_names}


def draw_pictures(blend_dir: Path, runs: list[Candidate], methods: list[Candidate], chosen: Candidate,
                  data: BlendData, oracle: dict[str, np.ndarray | None]) -> list[tuple[str, str]]:
    """The report's pictures: (caption, file name) of each one drawn (a failure is a warning)."""
    pictures = []
    candidates = [(c.name, c.oof_auc, c.valid_auc) for c in runs + methods]
    if plots.draw(blend_dir / CANDIDATES_PNG, plots.blend_candidates, candidates, chosen.name,
                  chosen_weights(chosen, data.runs)):
        pictures.append(("Every candidate's OOF and valid AUC, and the chosen one's weights", CANDIDATES_PNG))
    if oracle["oof"] is not None:  # synthetic data: the true click probabilities are known
        series = {"OOF": (chosen.preds["oof"], oracle["oof"])}
        if oracle["valid"] is not None:
            series["valid holdout"] = (chosen.preds["valid"], oracle["valid"])
        if plots.draw(blend_dir / CALIBRATION_PNG, plots.calibration, f"blend ({chosen.name})", series):
            pictures.append(("Predicted vs true click probability (synthetic data)", CALIBRATION_PNG))
    return pictures


def detail_text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {detail_text(v)}" for key, v in value.items())
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table_rows(runs: list[Candidate], methods: list[Candidate], best_single: Candidate,
               chosen: Candidate) -> list[tuple[str, str, str, str, str]]:
    """(candidate, OOF AUC, OOF delta vs best single, valid AUC, valid delta) for report and stdout."""
    rows = []
    for kind, candidates in (("run", runs), ("method", methods)):
        for c in candidates:
            label = f"{c.name} ({kind})"
            if kind == "run" and c is best_single:
                label += " = best_single"
            if c is chosen:
                label += "  <- chosen"
            rows.append((label, f"{c.oof_auc:.6f}", f"{c.oof_auc - best_single.oof_auc:+.6f}",
                         f"{c.valid_auc:.6f}", f"{c.valid_auc - best_single.valid_auc:+.6f}"))
    return rows


HEADER = ("candidate", "OOF AUC", "vs best single", "valid AUC", "vs best single")


def gap_warnings(candidates: list[Candidate]) -> list[str]:
    """One line per candidate whose OOF AUC beats its holdout AUC by more than GAP_WARNING."""
    return [f"{c.name}: OOF AUC {c.oof_auc:.6f} but holdout AUC {c.valid_auc:.6f} "
            f"(gap {c.oof_auc - c.valid_auc:+.6f})" for c in candidates
            if c.oof_auc - c.valid_auc > GAP_WARNING]


def holdout_stopped(cfg: dict, run_names: list[str]) -> list[str]:
    """The runs trained with train.early_stopping: holdout: each fold chose its epoch on its own
    held-out rows, so their OOF AUC flatters them in any choice by OOF AUC."""
    runs_dir = common.data_paths(cfg)["runs"]
    return [name for name in run_names if fold_metrics(runs_dir / name, 0).get("early_stopping") == "holdout"]


def report_markdown(metrics: dict, rows: list[tuple], methods: list[Candidate],
                    pictures: list[tuple[str, str]] = ()) -> str:
    lines = [f"# Blend of {len(metrics['runs'])} runs over {metrics['n_folds']} folds", "",
             "Every method is fitted on out-of-fold (OOF) predictions only; the valid holdout is "
             "scored, never fitted on.", ""]
    lines += markdown_table(HEADER, rows)
    lines += ["", f"**Chosen: {metrics['chosen']}** (select: {metrics['select']}): OOF AUC "
              f"{metrics['chosen_oof_auc']:.6f}, {metrics['oof_auc_gain_vs_best_single']:+.6f} over the "
              f"best single run {metrics['best_single_run']} ({metrics['best_single_oof_auc']:.6f}); valid "
              f"holdout AUC {metrics['chosen_valid_auc']:.6f} ({metrics['valid_auc_gain_vs_best_single']:+.6f}).",
              "", f"Oracle AUC (true click probabilities, same rows): OOF {auc_text(metrics['oracle_oof_auc'])}, "
              f"valid {auc_text(metrics['oracle_valid_auc'])}.", ""]
    if metrics["gap_warnings"]:
        lines += [f"## Warning: OOF AUC above the holdout AUC by more than {GAP_WARNING}", "",
                  "Out-of-fold predictions that saw their own rows (a leak), or a holdout unlike the "
                  "training data, look like this; a choice by OOF AUC cannot be trusted for these:", ""]
        lines += [f"- {warning}" for warning in metrics["gap_warnings"]] + [""]
    if metrics["holdout_stopped"]:
        lines += ["## Warning: runs whose folds chose their epoch on their own held-out rows", "",
                  f"{', '.join(metrics['holdout_stopped'])} trained with train.early_stopping: holdout: their "
                  f"OOF AUC flatters them, here and in the choice by OOF AUC.", ""]
    lines += ["## Methods", ""]
    for c in methods:
        extras = "; ".join(f"{key}: {detail_text(value)}" for key, value in c.details.items())
        lines.append(f"- **{c.name}** ({c.seconds:.1f}s): {extras}")
    sub = metrics["submission"]
    lines += ["", f"Submission: `{sub['zip']}` ({sub['rows']:,} rows, column `{sub['column']}`).", ""]
    return "\n".join(lines + picture_lines(pictures))


def print_summary(metrics: dict, rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    print(f"\n=== blend of {len(metrics['runs'])} runs over {metrics['n_folds']} folds")
    for row in [HEADER] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"chosen: {metrics['chosen']}  OOF AUC {metrics['chosen_oof_auc']:.6f} "
          f"({metrics['oof_auc_gain_vs_best_single']:+.6f} vs best single run {metrics['best_single_run']}), "
          f"valid AUC {metrics['chosen_valid_auc']:.6f} ({metrics['valid_auc_gain_vs_best_single']:+.6f})")
    if metrics["oracle_oof_auc"] is not None:
        print(f"oracle: OOF {auc_text(metrics['oracle_oof_auc'])}, valid {auc_text(metrics['oracle_valid_auc'])}")
    sub = metrics["submission"]
    print(f"submission: {sub['zip']} ({sub['rows']:,} rows, column {sub['column']}); "
          f"blend outputs in {metrics['blend_dir']}; {metrics['seconds']:.0f}s")


def available_methods(settings: BlendConfig) -> BlendConfig:
    """The settings without the lightgbm candidate when lightgbm is not installed (one line says
    so); an error when it was the one asked for by blend.select."""
    if lightgbm is not None or "lightgbm" not in settings.methods:
        return settings
    if settings.select == "lightgbm":
        raise UserError("config: blend.select=lightgbm, but lightgbm is not installed "
                        "(pip install 'lightgbm>=4.5,<5', or choose another blend.select)")
    common.log("blend: lightgbm is not installed: the lightgbm candidate is skipped")
    return replace(settings, methods=[m for m in settings.methods if m != "lightgbm"])


def run_blend(cfg: dict) -> dict:
    """Blend the configured runs, write {work_dir}/blend/ and the submission; return the metrics."""
    started = time.time()
    settings = available_methods(checked_settings(cfg))
    data = load_blend_data(cfg, settings.runs, with_row_features="lightgbm" in settings.methods,
                           test_from=settings.test_from)
    # which test predictions were read: summary refuses to score a run retrained since against the
    # OOF and holdout AUCs of the blend's time
    runs_dir = common.data_paths(cfg)["runs"]
    test_read = {name: processed_data.content_hash(prediction_path(runs_dir / name, "test", settings.test_from))
                 for name in settings.runs}
    common.log(f"blend: {len(data.runs)} runs, {len(data.oof_label):,} OOF rows, "
               f"{len(np.unique(data.fold))} folds, methods: {', '.join(settings.methods) or 'none'}, "
               f"valid and test predictions from the {settings.test_from}")

    runs = single_runs(data)
    best_single = max(runs, key=lambda c: c.oof_auc)
    methods = fit_methods(data, settings)
    chosen = choose(best_single, methods, settings.select)
    if chosen.oof_auc < best_single.oof_auc:
        common.log(f"warning: blend.select={settings.select} scores {chosen.oof_auc:.6f} OOF, below the "
                   f"best single run {best_single.name} ({best_single.oof_auc:.6f}); select: auto would not")

    blend_dir = common.data_paths(cfg)["work"] / "blend"
    sub = settings.submission
    require_outside(sub.dir, blend_dir)
    common.require_writable_folder(sub.dir, "blend.submission.dir")
    oracle = oracle_probs(cfg, data)
    chosen_name = f"{BEST_SINGLE} ({best_single.name})" if chosen is best_single else chosen.name
    csv_path, zip_path = submission_paths(sub.dir, f"{sub.name}-blend")
    metrics = {
        "runs": {c.name: {"oof_auc": c.oof_auc, "valid_auc": c.valid_auc, "test_blake2b": test_read[c.name]}
                 for c in runs},
        "methods": {c.name: {"oof_auc": c.oof_auc, "valid_auc": c.valid_auc, "seconds": c.seconds, **c.details}
                    for c in methods},
        "n_folds": int(len(np.unique(data.fold))),
        "select": settings.select,
        "test_from": settings.test_from,
        "chosen": chosen_name,
        "chosen_is_one_run": chosen is best_single,
        "chosen_oof_auc": chosen.oof_auc,
        "chosen_valid_auc": chosen.valid_auc,
        "best_single_run": best_single.name,
        "best_single_oof_auc": best_single.oof_auc,
        "best_single_valid_auc": best_single.valid_auc,
        "oof_auc_gain_vs_best_single": chosen.oof_auc - best_single.oof_auc,
        "valid_auc_gain_vs_best_single": chosen.valid_auc - best_single.valid_auc,
        "oracle_oof_auc": oracle_auc(data.oof_label, oracle["oof"]),
        "oracle_valid_auc": oracle_auc(data.valid_label, oracle["valid"]),
        "blend_dir": str(blend_dir),
        "submission": {"csv": str(csv_path), "zip": str(zip_path), "rows": len(data.test_ids),
                       "column": sub.column},
        "gap_warnings": gap_warnings(runs + methods),
        "holdout_stopped": holdout_stopped(cfg, settings.runs),
    }
    for warning in metrics["gap_warnings"]:
        common.log(f"warning: {warning}: OOF much better than the holdout, a leak? (see report.md)")
    if metrics["holdout_stopped"]:
        common.log(f"warning: {', '.join(metrics['holdout_stopped'])}: trained with train.early_stopping: "
                   f"holdout, their OOF AUC flatters them in the choice (see report.md)")
    rows = table_rows(runs, methods, best_single, chosen)
    # every output goes into a staged folder that replaces blend/ whole once the submission is
    # written: a failure anywhere leaves the previous blend complete, never a mix; a previous blend
    # of other predictions is moved aside
    with common.staged_folder(blend_dir, result_files=("oof.parquet", "valid.parquet", "test.parquet")) as staged:
        common.write_parquet(staged / "oof.parquet", pd.DataFrame(
            {"row_id": np.arange(len(data.oof_label)), "fold": data.fold.astype(np.int8), "pred": chosen.preds["oof"]}))
        common.write_parquet(staged / "valid.parquet", pd.DataFrame(
            {"row_id": np.arange(len(data.valid_label)), "pred": chosen.preds["valid"]}))
        common.write_parquet(staged / "test.parquet", pd.DataFrame({"ID": data.test_ids, "pred": chosen.preds["test"]}))
        pictures = draw_pictures(staged, runs, methods, chosen, data, oracle)
        metrics["seconds"] = time.time() - started
        common.write_text(staged / "report.md", report_markdown(metrics, rows, methods, pictures))
        common.write_json(staged / "metrics.json", metrics)
        write_submission(data.test_ids, chosen.preds["test"], sub.dir, f"{sub.name}-blend", sub.column)
    print_summary(metrics, rows)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "blend.yaml")
    args = parser.parse_args(argv)
    cfg = common.config_from_args(args)
    experiments.record_blend(cfg, run_blend(cfg), args.config, args.overrides)


if __name__ == "__main__":
    common.run_main(main)
