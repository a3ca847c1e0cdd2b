"""The blend methods: each fits on the runs' out-of-fold predictions and predicts every split.

A method is a function ``fit(data, params) -> (predictions per split, details for the report)``
and one entry in METHODS. ``data`` is a BlendData (the runs' predictions side by side, rows in
processed order); ``params`` is the method's own settings dataclass, read from the ``blend.<name>:``
section of the config, or None for a method without settings.

* rank_mean    mean of the runs' normalised ranks (a run's OOF predictions define its rank scale)
* logit_mean   mean of the runs' logits
* auc_weights  non-negative weights on the logits that maximise the exact OOF AUC (Nelder-Mead from
               every one-hot start and from equal weights; the best result is kept), cross-fitted
* logistic     logistic regression on the logits, cross-fitted over the training folds
* lightgbm     LightGBM on the logits plus history length and likes/views levels, cross-fitted

To add a method: its function (and its settings dataclass, if it has any) and its METHODS entry
here; a settings field of the same name in blend.BlendConfig and configs/blend.yaml. The tests in
tests/test_blend.py run over every entry of METHODS.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Callable

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

from mmctr.common import UserError, first_line
from mmctr.runs import SPLITS
from mmctr.models.metrics import roc_auc

ROW_FEATURES = ("history_len", "likes_level", "views_level")  # the lightgbm stacker's row columns
PROB_EPS = 1e-7           # probabilities are clipped to [eps, 1-eps] before the logit: float32
                          # predictions of 0 or 1 would otherwise become infinite logits
SIMPLEX_STEP = 0.5        # Nelder-Mead's first moves away from a start, in normalised-weight units

Predictions = dict[str, np.ndarray]  # oof/valid/test -> float64 [N] click probabilities


# ---------------------------------------------------------------------------------------------
# what a method fits on, and its settings
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


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------

def normalised_rank(sorted_reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fraction of the reference below each value (ties count half): the OOF rank, in [0, 1]."""
    # sorted queries make the binary searches walk the reference in order: ~6x faster on 3.6M rows
    order = np.argsort(values)
    below = np.searchsorted(sorted_reference, values[order], side="left")
    not_above = np.searchsorted(sorted_reference, values[order], side="right")
    ranks = np.empty(len(values))
    ranks[order] = (below + not_above) / (2.0 * len(sorted_reference))
    return ranks


def rank_mean(data: BlendData, params: None) -> tuple[Predictions, dict]:
    # valid and test rows are ranked against the OOF predictions, not among themselves, so a row's
    # blended score does not depend on which other rows happen to share its split
    references = [np.sort(data.probs["oof"][:, r]) for r in range(len(data.runs))]
    preds = {split: np.mean([normalised_rank(ref, probs[:, r]) for r, ref in enumerate(references)], axis=0)
             for split, probs in data.probs.items()}
    return preds, {"fitted": "nothing to fit"}


def logit_mean(data: BlendData, params: None) -> tuple[Predictions, dict]:
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


def fit_auc_weights(logits: np.ndarray, labels: np.ndarray, params: AucWeightsConfig) -> np.ndarray:
    """Non-negative weights [R] summing to 1 on the logits [N, R] that maximise the AUC on (a
    stratified sample of at most params.max_rows of) these rows."""
    rows = stratified_sample(labels, params.max_rows, params.seed)
    logits, labels = logits[rows], labels[rows]
    n_runs = logits.shape[1]

    def negative_auc(theta: np.ndarray) -> float:
        return -roc_auc(labels, logits @ weights_from(theta))

    # AUC is a step function of the weights, so a gradient-free simplex search; one start per run
    # (it can only improve on that run) and one from equal weights, since the surface has plateaus
    starts = [np.eye(n_runs)[r] for r in range(n_runs)] + [np.full(n_runs, 1.0 / n_runs)]
    best = None
    for start in starts:
        simplex = np.vstack([start] + [start + SIMPLEX_STEP * np.eye(n_runs)[j] for j in range(n_runs)])
        result = minimize(negative_auc, start, method="Nelder-Mead",
                          options={"initial_simplex": simplex, "maxfev": params.max_evals,
                                   "xatol": 1e-3, "fatol": 1e-6})
        if best is None or result.fun < best.fun:
            best = result
    return weights_from(best.x)


def auc_weights(data: BlendData, params: AucWeightsConfig) -> tuple[Predictions, dict]:
    logits, labels = data.logits, data.oof_label
    # cross-fitted like the stackers: weights fitted in sample always score at least the best run
    # on those rows, so their OOF AUC would win the selection on optimism alone
    oof = np.empty(len(labels))
    for fit_rows, held_rows in fold_splits(data, "auc_weights folds"):
        oof[held_rows] = logits["oof"][held_rows] @ fit_auc_weights(logits["oof"][fit_rows], labels[fit_rows], params)
    weights = fit_auc_weights(logits["oof"], labels, params)
    preds = {"oof": expit(oof), **{split: expit(logits[split] @ weights) for split in ("valid", "test")}}
    return preds, {"fitted": f"cross-fitted over the training folds; valid/test from weights fitted on all OOF "
                             f"rows (at most {params.max_rows:,} sampled, {len(data.runs) - 1} free weights)",
                   "weights": {run: float(w) for run, w in zip(data.runs, weights)}}


def fold_splits(data: BlendData, desc: str):
    """(rows to fit on, rows to predict) for every training fold, with a progress bar."""
    for k in tqdm(np.unique(data.fold), desc=desc, leave=False):
        yield np.flatnonzero(data.fold != k), np.flatnonzero(data.fold == k)


def logistic(data: BlendData, params: LogisticConfig) -> tuple[Predictions, dict]:
    features, labels = data.logits, data.oof_label

    def fit(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=params.C, max_iter=1000).fit(features["oof"][rows], labels[rows])

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


def lightgbm_stacker(data: BlendData, params: LightGBMConfig) -> tuple[Predictions, dict]:
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
        model = lightgbm.LGBMClassifier(**asdict(params), verbose=-1)
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
    """One entry of the registry: how the method is fitted, the dataclass of its settings (the
    config's ``blend.<name>:`` section; None: it has none), and what the report says it puts on
    each run (``weights``: what its numbers are and their key in its details; else an equal weight
    on the ``equal_on`` scale)."""
    fit: Callable[[BlendData, object], tuple[Predictions, dict]]
    settings: type | None = None
    weights: tuple[str, str] | None = None
    equal_on: str = "logit"


# The blend methods, one entry each: blend.methods, blend.select, the report and the tests take
# their names from here
METHODS: dict[str, BlendMethod] = {
    "rank_mean": BlendMethod(rank_mean, equal_on="rank"),
    "logit_mean": BlendMethod(logit_mean),
    "auc_weights": BlendMethod(auc_weights, AucWeightsConfig, weights=("weight on the logit", "weights")),
    "logistic": BlendMethod(logistic, LogisticConfig, weights=("coefficient on the logit", "coefficients")),
    "lightgbm": BlendMethod(lightgbm_stacker, LightGBMConfig, weights=("share of the split gain", "gain_share")),
}
