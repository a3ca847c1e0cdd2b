"""The pictures next to the reports: PNG files drawn with matplotlib's Agg renderer (no display).

    draw(path, training_curves, "qin_small", folds)           # a run: loss and AUC per epoch, per fold
    draw(path, calibration, "qin_small", {"OOF": (pred, true_prob)})   # synthetic data only
    draw(path, blend_candidates, candidates, "lightgbm", weights)       # a blend

draw() writes the file atomically and returns whether it did: a picture is a view of results
already written, so any error while drawing (matplotlib missing, odd values) is one warning line
and the run goes on. matplotlib is imported when a picture is drawn, never at import time.
Figures are built on matplotlib.figure.Figure, not pyplot: no global state, no backend to select.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mmctr import common

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CALIBRATION_BINS = 20


def draw(path: Path, plot: Callable, *args) -> bool:
    """``plot(*args)`` -> a Figure, saved as a PNG at ``path``; False (and a warning) on any error."""
    try:
        figure = plot(*args)
        with common.atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
        return True
    except Exception as exc:  # noqa: BLE001: a picture must never fail the run that made the results
        common.log(f"warning: {path}: picture not drawn ({type(exc).__name__}: {common.first_line(exc)}); "
                   f"the results are unaffected")
        return False


def new_figure(width: float, height: float, columns: int = 1):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def training_curves(run_name: str, folds: dict) -> Figure:
    """Train loss (left) and AUC (right) per epoch for every fold; the best epoch, chosen by the
    monitored AUC, is a star on that curve. ``folds``: fold -> {"history": history.json's records,
    "best_epoch": int, "monitor": "fold" or "valid"}."""
    figure, (loss_ax, auc_ax) = new_figure(11, 4, columns=2)
    deciders = set()
    for index, (fold, info) in enumerate(sorted(folds.items())):
        color = f"C{index}"
        epochs = [r["epoch"] for r in info["history"]]
        loss_ax.plot(epochs, [r["train_loss"] for r in info["history"]], "o-", color=color, label=f"fold {fold}")
        for key, style, label in (("fold_auc", "o-", "held-out rows"), ("valid_auc", "s--", "valid")):
            values = [r.get(key) for r in info["history"]]
            if any(v is not None for v in values):
                auc_ax.plot(epochs, values, style, color=color, markersize=4, label=f"fold {fold} {label}")
        best = next(r for r in info["history"] if r["epoch"] == info["best_epoch"])
        deciders.add({"fold": "held-out", "valid": "valid"}[info["monitor"]])
        auc_ax.plot(best["epoch"], best[f"{info['monitor']}_auc"], "*", color=color, markersize=16,
                    markeredgecolor="black", zorder=5)
    loss_ax.set(title=f"{run_name}: train loss", xlabel="epoch", ylabel="mean training objective")
    auc_ax.set(title=f"AUC per epoch (star: best epoch, by {'/'.join(sorted(deciders))} AUC)", xlabel="epoch",
               ylabel="AUC")
    for ax in (loss_ax, auc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def binned(pred: np.ndarray, truth: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Mean prediction and mean truth in ``bins`` equal-count bins of the prediction."""
    order = np.argsort(pred, kind="stable")
    groups = np.array_split(order, min(bins, len(order)))
    return (np.array([pred[g].mean() for g in groups]), np.array([truth[g].mean() for g in groups]))


def calibration(title: str, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Predicted vs true click probability (synthetic data, where the truth is known): rows in
    equal-count bins of the prediction, mean prediction against mean true probability. On the
    diagonal a model is calibrated; a model can rank well (high AUC) and still sit off it."""
    figure, (ax,) = new_figure(5.5, 5)
    top = 0.0
    for label, (pred, truth) in series.items():
        pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        x, y = binned(pred, truth)
        gap = np.abs(pred - truth).mean()
        ax.plot(x, y, "o-", markersize=4, label=f"{label}: mean |pred - true| {gap:.4f} ({len(pred):,} rows)")
        top = max(top, x.max(), y.max())
    top = min(1.0, top * 1.05)
    ax.plot([0, top], [0, top], ":", color="gray", label="calibrated")
    ax.set(title=f"{title}: calibration", xlabel=f"predicted click probability (mean of {CALIBRATION_BINS} "
           f"equal-count bins)", ylabel="true click probability (mean)", xlim=(0, top), ylim=(0, top))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return figure


def blend_candidates(candidates: list[tuple[str, float, float]], chosen: str,
                     weights: tuple[str, dict[str, float]]) -> Figure:
    """Left: every candidate's OOF and valid-holdout AUC, the chosen one in bold. Right: what the
    chosen candidate puts on each input (``weights``: (what the numbers are, input -> number))."""
    figure, (auc_ax, weight_ax) = new_figure(11, 0.9 + 0.45 * max(len(candidates), len(weights[1])), columns=2)
    names = [name for name, _, _ in candidates]
    rows = np.arange(len(candidates))[::-1]  # the first candidate on top
    auc_ax.plot([oof for _, oof, _ in candidates], rows, "o", label="OOF (chooses)")
    auc_ax.plot([valid for _, _, valid in candidates], rows, "s", markerfacecolor="none", label="valid holdout")
    auc_ax.set_yticks(rows, names)
    for label in auc_ax.get_yticklabels():
        if label.get_text() == chosen:
            label.set_fontweight("bold")
    auc_ax.set(title=f"candidates (bold: chosen, {chosen})", xlabel="AUC")
    auc_ax.grid(alpha=0.3)
    auc_ax.legend(fontsize=7)
    what, values = weights
    inputs = list(values)[::-1]
    weight_ax.barh(inputs, [values[name] for name in inputs], color="C2")
    weight_ax.axvline(0, color="black", linewidth=0.8)
    weight_ax.set(title=f"{chosen}: {what}", xlabel=what)
    weight_ax.grid(alpha=0.3, axis="x")
    return figure
