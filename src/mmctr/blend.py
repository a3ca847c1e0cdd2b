"""Blend k-fold runs into one test prediction and write the submission.

    python src/blend.py --config configs/blend.yaml [--set blend.select=logistic]

Reads the aggregate predictions of every run in blend.runs ({work_dir}/runs/<name>/oof.parquet,
valid.parquet, test.parquet), checks that they come from the same processed data and line up row by
row, and fits each method on the out-of-fold (OOF) predictions only:

* rank_mean    mean of the runs' normalised ranks (a run's OOF predictions define its rank scale)
* logit_mean   mean of the runs' logits
* auc_weights  non-negative weights on the logits that maximise the exact OOF AUC (Nelder-Mead from
               every one-hot start and from equal weights; the best result is kept)
* logistic     logistic regression on the logits, cross-fitted over the training folds
* lightgbm     LightGBM on the logits plus history length and likes/views levels, cross-fitted

A cross-fitted method predicts each fold's rows with a model that never saw that fold, so its OOF
AUC is an honest estimate (auc_weights fits its few weights in sample). The best single run competes
as a candidate too, so the blend chosen by OOF AUC (select: auto) never scores below it out of fold.
The official valid holdout is scored for every candidate and used for nothing else: it shows
whether the OOF choice carries over. A run's valid and test predictions average its fold models, so
they are a little smoother than its OOF ones; the holdout column is where that would show.

Writes {work_dir}/blend/ (oof/valid/test.parquet, report.md with its pictures candidates.png and,
on synthetic data, calibration.png, then metrics.json last: the folder is complete once it exists)
and <submission.dir>/<name>.csv and .zip, each validated before it is renamed into place. The
command line (not run_blend) appends the blend's row to the experiment log (src/experiments.py).
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal, get_args

try:  # optional (requirements.txt): without it the lightgbm candidate is skipped
    import lightgbm
except ImportError:
    lightgbm = None
import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from mmctr import common
from mmctr import experiments
from mmctr import plots
from mmctr import processed_data
from mmctr.common import UserError, first_line
from mmctr.reports import auc_text, markdown_table, picture_lines
from mmctr.runs import PROCESSED_SPLIT, SPLITS, read_predictions
from mmctr.submission import ID_COLUMN, submission_paths, write_submission
from mmctr.models.metrics import roc_auc

ROW_FEATURES = ("history_len", "likes_level", "views_level")
PROB_EPS = 1e-7           # probabilities are clipped to [eps, 1-eps] before the logit: float32
                          # predictions of 0 or 1 would otherwise become infinite logits
SIMPLEX_STEP = 0.5        # Nelder-Mead's first moves away from a start, in normalised-weight units
BEST_SINGLE = "best_single"
# An OOF AUC above the holdout AUC by more than this is flagged: OOF predictions that saw their own
# rows (a leak) look excellent out of fold and ordinary on the holdout
GAP_WARNING = 0.05
CANDIDATES_PNG, CALIBRATION_PNG = "candidates.png", "calibration.png"  # report.md's pictures


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------



@dataclass
class AucWeightsConfig:
    """blend.auc_weights: the AUC-maximising weights."""
    max_rows: int = field(default=250_000, metadata={"min": 1})  # stratified OOF sample scored per evaluation
    max_evals: int = field(default=200, metadata={"min": 1})     # Nelder-Mead evaluations per start
    seed: int = field(default=20242025, metadata={"min": 0})     # draws the sample


@dataclass
class LogisticConfig:
    """blend.logistic: the logistic regression on the logits."""
    C: float = field(default=1.0, metadata={"positive": True})   # inverse L2 strength (sklearn)


@dataclass
class LightGBMConfig:
    """blend.lightgbm: the LGBMClassifier keyword arguments of the stacker."""
    n_estimators: int = field(default=200, metadata={"min": 1})
    learning_rate: float = field(default=0.05, metadata={"positive": True})
    num_leaves: int = field(default=15, metadata={"min": 2})
    min_child_samples: int = field(default=100, metadata={"min": 0})
    seed: int = 20242025
    n_jobs: int = 1


@dataclass
class SubmissionConfig:
    """blend.submission: <dir>/<name>.csv and .zip, predictions in column <column>."""
    dir: str = field(default="submissions", metadata={"nonempty": True})
    name: str = "submission"
    column: str = field(default="Task2", metadata={"nonempty": True})


@dataclass
class BlendConfig:
    """The blend: section (configs/blend.yaml)."""
    runs: list[str]                                       # run folders under {work_dir}/runs/
    methods: list[Method] = field(default_factory=lambda: list(get_args(Method)))
    select: str = "auto"                                  # auto | best_single | one of methods
    # whose valid and test predictions the fitted blend is applied to: each run's fold mean, or its
    # refit (one model on every train row, src/train.py --refit)
    test_from: Literal["folds", "refit"] = "folds"
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
    if settings.submission.column == ID_COLUMN:
        raise UserError(f"config: blend.submission.column cannot be '{ID_COLUMN}' (that column holds the IDs)")
    return settings


# ---------------------------------------------------------------------------------------------
# the runs' predictions, side by side
# ---------------------------------------------------------------------------------------------

@dataclass
class BlendData:
    """Everything a method may fit on or predict: rows in processed order, one column per run."""
    runs: list[str]
    probs: dict[str, np.ndarray]         # oof/valid/test -> float64 [N, R] probabilities
    oof_label: np.ndarray                # float64 [N_train] 0/1
    valid_label: np.ndarray              # float64 [N_valid] 0/1, for reporting only
    fold: np.ndarray                     # int [N_train] the fold whose model made each OOF row
    test_ids: np.ndarray                 # int64 [N_test]
    row_features: dict[str, np.ndarray] | None = None  # oof/valid/test -> float32 [N, 3], see ROW_FEATURES

    @cached_property
    def logits(self) -> dict[str, np.ndarray]:
        return {split: logit(np.clip(p, PROB_EPS, 1 - PROB_EPS)) for split, p in self.probs.items()}


def history_length(item_seq: np.ndarray, chunk_rows: int = 262_144) -> np.ndarray:
    # chunked, so that the full train split's [3.6M, 64] memory map is never read whole into RAM
    return np.concatenate([(item_seq[i:i + chunk_rows] > 0).sum(axis=1)
                           for i in range(0, len(item_seq), chunk_rows)])


def row_features_of(arrays: dict) -> dict[str, np.ndarray]:
    return {split: np.column_stack([history_length(arrays[f"{name}_item_seq"]),
                                    np.asarray(arrays[f"{name}_likes_level"]),
                                    np.asarray(arrays[f"{name}_views_level"])]).astype(np.float32)
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
# blending methods: each returns (predictions per split, details for the report)
# ---------------------------------------------------------------------------------------------

Predictions = dict[str, np.ndarray]


def normalised_rank(sorted_reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fraction of the reference below each value (ties count half): the OOF rank, in [0, 1]."""
    # sorted queries make the binary searches walk the reference in order: ~6x faster on 3.6M rows
    order = np.argsort(values)
    below = np.searchsorted(sorted_reference, values[order], side="left")
    not_above = np.searchsorted(sorted_reference, values[order], side="right")
    ranks = np.empty(len(values))
    ranks[order] = (below + not_above) / (2.0 * len(sorted_reference))
    return ranks


def rank_mean(data: BlendData, settings: BlendConfig) -> tuple[Predictions, dict]:
    # valid and test rows are ranked against the OOF predictions, not among themselves, so a row's
    # blended score does not depend on which other rows happen to share its split
    references = [np.sort(data.probs["oof"][:, r]) for r in range(len(data.runs))]
    preds = {split: np.mean([normalised_rank(ref, probs[:, r]) for r, ref in enumerate(references)], axis=0)
             for split, probs in data.probs.items()}
    return preds, {"fitted": "nothing to fit"}


def logit_mean(data: BlendData, settings: BlendConfig) -> tuple[Predictions, dict]:
    return ({split: expit(logits.mean(axis=1)) for split, logits in data.logits.items()},
            {"fitted": "nothing to fit"})


def stratified_sample(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Row indices, at most ``max_rows``, with the positive rate of ``labels`` kept (up to rounding)."""
    if len(labels) <= max_rows:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for cls in (0, 1):
        rows = np.flatnonzero((labels > 0.5) == cls)
        keep.append(rng.choice(rows, size=round(max_rows * len(rows) / len(labels)), replace=False))
    return np.sort(np.concatenate(keep))


def weights_from(theta: np.ndarray) -> np.ndarray:
    """Unconstrained parameters -> non-negative weights summing to 1."""
    magnitude = np.abs(theta)
    total = magnitude.sum()
    return magnitude / total if total > 0 else np.full(len(theta), 1.0 / len(theta))


def auc_weights(data: BlendData, settings: BlendConfig) -> tuple[Predictions, dict]:
    params = settings.auc_weights
    rows = stratified_sample(data.oof_label, params.max_rows, params.seed)
    logits, labels = data.logits["oof"][rows], data.oof_label[rows]
    n_runs = len(data.runs)

    def negative_auc(theta: np.ndarray) -> float:
        return -roc_auc(labels, logits @ weights_from(theta))

    # AUC is a step function of the weights, so a gradient-free simplex search; one start per run
    # (it can only improve on that run) and one from equal weights, since the surface has plateaus
    starts = [np.eye(n_runs)[r] for r in range(n_runs)] + [np.full(n_runs, 1.0 / n_runs)]
    best = None
    for start in tqdm(starts, desc="auc_weights starts", leave=False, disable=n_runs < 2):
        simplex = np.vstack([start] + [start + SIMPLEX_STEP * np.eye(n_runs)[j] for j in range(n_runs)])
        result = minimize(negative_auc, start, method="Nelder-Mead",
                          options={"initial_simplex": simplex, "maxfev": params.max_evals,
                                   "xatol": 1e-3, "fatol": 1e-6})
        if best is None or result.fun < best.fun:
            best = result
    weights = weights_from(best.x)
    preds = {split: expit(split_logits @ weights) for split, split_logits in data.logits.items()}
    return preds, {"fitted": f"in sample on {len(rows):,} OOF rows ({n_runs - 1} free weights)",
                   "weights": {run: float(w) for run, w in zip(data.runs, weights)}}


def fold_splits(data: BlendData, desc: str):
    """(rows to fit on, rows to predict) for every training fold, with a progress bar."""
    for k in tqdm(np.unique(data.fold), desc=desc, leave=False):
        yield np.flatnonzero(data.fold != k), np.flatnonzero(data.fold == k)


def logistic(data: BlendData, settings: BlendConfig) -> tuple[Predictions, dict]:
    features, labels = data.logits, data.oof_label

    def fit(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=settings.logistic.C, max_iter=1000).fit(features["oof"][rows], labels[rows])

    oof = np.empty(len(labels))
    for fit_rows, held_rows in fold_splits(data, "logistic folds"):
        oof[held_rows] = fit(fit_rows).predict_proba(features["oof"][held_rows])[:, 1]
    # the honest OOF estimate comes from the cross-fitted models; valid and test get one model
    # refitted on every OOF row: a few coefficients, so it differs from the fold models only by noise
    final = fit(np.arange(len(labels)))
    preds = {"oof": oof, **{split: final.predict_proba(features[split])[:, 1] for split in ("valid", "test")}}
    return preds, {"fitted": "cross-fitted over the training folds; valid/test from a refit on all OOF rows",
                   "coefficients": {run: float(c) for run, c in zip(data.runs, final.coef_[0])},
                   "intercept": float(final.intercept_[0])}


def click_prob(model, features: np.ndarray, names: list[str]) -> np.ndarray:
    return model.predict_proba(pd.DataFrame(features, columns=names))[:, 1]


def lightgbm_stacker(data: BlendData, settings: BlendConfig) -> tuple[Predictions, dict]:
    names = [f"logit_{run}" for run in data.runs] + list(ROW_FEATURES)
    features = {split: np.column_stack([data.logits[split], data.row_features[split]]) for split in SPLITS}
    labels = data.oof_label.astype(np.int64)
    oof = np.empty(len(labels))
    valid, test = np.zeros(len(features["valid"])), np.zeros(len(features["test"]))
    importance = np.zeros(len(names))
    n_folds = len(np.unique(data.fold))
    for fit_rows, held_rows in fold_splits(data, "lightgbm folds"):
        # a fixed number of trees, no early stopping: stopping on the held-out fold would let it
        # shape the model whose predictions on it are the honest OOF estimate
        model = lightgbm.LGBMClassifier(**asdict(settings.lightgbm), verbose=-1)
        try:
            model.fit(pd.DataFrame(features["oof"][fit_rows], columns=names), labels[fit_rows])
        except (lightgbm.basic.LightGBMError, TypeError, ValueError) as exc:
            raise UserError(f"config: blend.lightgbm: LightGBM rejects the parameters ({first_line(exc)})") from None
        oof[held_rows] = click_prob(model, features["oof"][held_rows], names)
        valid += click_prob(model, features["valid"], names) / n_folds
        test += click_prob(model, features["test"], names) / n_folds
        importance += model.booster_.feature_importance("gain")
    share = importance / importance.sum() if importance.sum() > 0 else importance
    return ({"oof": oof, "valid": valid, "test": test},
            {"fitted": "cross-fitted over the training folds; valid/test = mean of the fold models",
             "gain_share": {name: float(s) for name, s in zip(names, share)}})


@dataclass(frozen=True)
class BlendMethod:
    """One entry of the registry: how the method is fitted, and what the report says it puts on
    each run (``weights``: what its numbers are and their key in its details; else an equal weight
    on the ``equal_on`` scale)."""
    fit: Callable[[BlendData, BlendConfig], tuple[Predictions, dict]]
    weights: tuple[str, str] | None = None
    equal_on: str = "logit"


# The blend methods, one entry each: blend.methods, blend.select, the report and the tests take
# their names from here
METHODS: dict[str, BlendMethod] = {
    "rank_mean": BlendMethod(rank_mean, equal_on="rank"),
    "logit_mean": BlendMethod(logit_mean),
    "auc_weights": BlendMethod(auc_weights, weights=("weight on the logit", "weights")),
    "logistic": BlendMethod(logistic, weights=("coefficient on the logit", "coefficients")),
    "lightgbm": BlendMethod(lightgbm_stacker, weights=("share of the split gain", "gain_share")),
}
Method = Literal[tuple(METHODS)]  # blend.methods' type: a name of the registry


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


def fit_methods(data: BlendData, settings: BlendConfig) -> list[Candidate]:
    candidates = []
    for method in settings.methods:
        started = time.time()
        preds, details = METHODS[method].fit(data, settings)
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
    common.require_writable_folder(sub.dir, "blend.submission.dir")
    oracle = oracle_probs(cfg, data)
    chosen_name = f"{BEST_SINGLE} ({best_single.name})" if chosen is best_single else chosen.name
    csv_path, zip_path = submission_paths(sub.dir, f"{sub.name}-blend")
    metrics = {
        "runs": {c.name: {"oof_auc": c.oof_auc, "valid_auc": c.valid_auc} for c in runs},
        "methods": {c.name: {"oof_auc": c.oof_auc, "valid_auc": c.valid_auc, "seconds": c.seconds, **c.details}
                    for c in methods},
        "n_folds": int(len(np.unique(data.fold))),
        "select": settings.select,
        "test_from": settings.test_from,
        "chosen": chosen_name,
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
    }
    for warning in metrics["gap_warnings"]:
        common.log(f"warning: {warning}: OOF much better than the holdout, a leak? (see report.md)")
    rows = table_rows(runs, methods, best_single, chosen)
    # every output goes into a staged folder that replaces blend/ whole once the submission is
    # written: a failure anywhere leaves the previous blend complete, never a mix
    with common.staged_folder(blend_dir) as staged:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "blend.yaml")
    args = parser.parse_args()
    cfg = common.config_from_args(args)
    experiments.record_blend(cfg, run_blend(cfg), args.config, args.overrides)


if __name__ == "__main__":
    common.run_main(main)
