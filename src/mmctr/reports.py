"""The text of the reports (a run's and the blend's report.md, the stages' summaries): how an AUC,
a table and a picture are written. The numbers come from the run folder (src/mmctr/runs.py) and the
blend; nothing here reads or writes files."""
from __future__ import annotations

EARLY_STOPPING_NOTE = {
    "valid": "on the valid split's AUC (as QIN was released), which chose each fold's epoch, so the "
             "holdout AUC flatters a little; the OOF AUC is untouched",
    "holdout": "on each fold's held-out train rows, which chose each fold's epoch and its learning-rate "
               "decays, so the OOF AUC flatters (a blend, single.py and tune rank runs by it: compare runs "
               "with the same early_stopping); the valid holdout AUC is an untouched check",
}


def auc_text(value: float | None, digits: int = 6) -> str:
    """An AUC as every report prints it; None (no labels: real data's oracle or test) as n/a."""
    return "n/a (real data)" if value is None else f"{value:.{digits}f}"


def markdown_table(header: tuple, rows: list[tuple], align: str | None = None) -> list[str]:
    """Lines of a markdown table; align holds one of l/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(map(str, header)) + " |", rule] + ["| " + " | ".join(map(str, r)) + " |"
                                                                for r in rows]


def picture_lines(pictures: list[tuple[str, str]]) -> list[str]:
    """Markdown that embeds each (caption, file name) picture of the report's folder."""
    return [line for caption, name in pictures for line in (f"![{caption}]({name})", "")]


def run_report(run_name: str, metrics: dict, pictures: list[tuple[str, str]] = ()) -> str:
    """A finished run's report.md: per fold, the OOF and holdout totals next to the oracle's."""
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
    return "\n".join(lines + picture_lines(pictures))
