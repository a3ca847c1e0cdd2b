"""The prize-eligible submission: one network's refit, predicting the test split alone.

    python src/single.py --config configs/blend.yaml [--set single.run=qin_small] [--choose]

Task 2's prizes go only to a single neural network trained end to end, with no ensemble for
training or testing (docs/spec/competition.md, "Rules"): not the blend of several models, not the
mean of a run's k fold models. This stage picks one run of blend.runs (single.run: auto = the best
OOF AUC over its folds, or the run named), takes its refit (src/train.py --refit: one model on every
train row, early stopping as its config says) and writes that one model's test predictions as
<submission.dir>/<submission.name>-single-<run>.csv and .zip, validated. --choose only prints the
run it would pick (run.sh trains that run's refit first).

Writes {work_dir}/single/test.parquet (ID, pred) and metrics.json (staged and swapped in whole: the
folder is complete once it exists).
"""
from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mmctr import blend
from mmctr import common
from mmctr import processed_data
from mmctr import runs
from mmctr.common import UserError
from mmctr.submission import require_outside, submission_paths, write_submission
from mmctr.models.metrics import roc_auc

AUTO = "auto"
RULE = ("one neural network trained end to end on the train rows, predicting the test split alone "
        "(no blend, no fold mean): the kind of submission Task 2's prizes accept")


@dataclass
class SingleConfig:
    """The single: section (configs/blend.yaml)."""
    run: str = field(default=AUTO, metadata={"nonempty": True})  # auto | a run of blend.runs


def checked_settings(cfg: dict) -> tuple[SingleConfig, blend.BlendConfig]:
    settings = common.typed_section(SingleConfig, cfg.get("single") or {}, "single")
    blend_settings = blend.checked_settings(cfg)
    if settings.run != AUTO and settings.run not in blend_settings.runs:
        raise UserError(f"config: single.run must be auto or one of blend.runs ({', '.join(blend_settings.runs)}), "
                        f"got {settings.run!r}")
    return settings, blend_settings


def fold_oof_aucs(cfg: dict, run_names: list[str]) -> dict[str, float]:
    """OOF AUC over the folds of each finished run, from its predictions checked as the blend
    checks them."""
    data = blend.load_blend_data(cfg, run_names, with_row_features=False)
    return {c.name: c.oof_auc for c in blend.single_runs(data)}


def choose(settings: SingleConfig, oof_aucs: dict[str, float]) -> str:
    """The named run, or the one with the best OOF AUC (the first of blend.runs on a tie)."""
    if settings.run != AUTO:
        return settings.run
    return max(oof_aucs, key=lambda name: oof_aucs[name])


def refit_predictions(cfg: dict, name: str, arrays: dict) -> dict[str, np.ndarray]:
    """The refit's valid and test predictions, checked against the processed data."""
    run = runs.run_dir(cfg, name)
    if not runs.fold_done(run, runs.REFIT):
        # the run's config.yaml holds the data folders of its last train.py: the ones here may
        # differ (the work folder moved since), so the command names them
        folders = processed_data.data_set_args(cfg["data"], ("raw_dir", "work_dir"))
        raise UserError(f"{run}: run '{name}' has no finished refit ({runs.REFIT}/done.json missing): train "
                        f"it with `python src/train.py --config {shlex.quote(str(run / 'config.yaml'))} "
                        f"{folders} --refit` (the run's own config, its --set values included; run.sh does)")
    expected = {"valid": np.arange(len(arrays["valid_label"])), "test": np.asarray(arrays["test_ID"], np.int64)}
    preds = {}
    for split, ids in expected.items():
        path = runs.fold_dir(run, runs.REFIT) / f"{split}.parquet"
        preds[split] = runs.aligned_predictions(path, runs.read_run_file(path, split, name), split, ids, None, split)
    return preds


def run_single(cfg: dict) -> dict:
    """Write the single network's submission and {work_dir}/single/; return the metrics."""
    started = time.time()
    settings, blend_settings = checked_settings(cfg)
    _, arrays, _ = processed_data.load_current(cfg)
    oof_aucs = fold_oof_aucs(cfg, blend_settings.runs)
    name = choose(settings, oof_aucs)
    preds = refit_predictions(cfg, name, arrays)
    test_ids = np.asarray(arrays["test_ID"], np.int64)
    sub = blend_settings.submission
    out = common.data_paths(cfg)["work"] / "single"
    require_outside(sub.dir, out)
    common.require_writable_folder(sub.dir, "blend.submission.dir")
    csv_path, zip_path = submission_paths(sub.dir, f"{sub.name}-single-{name}")
    refit = runs.fold_metrics(runs.run_dir(cfg, name), runs.REFIT)
    valid_label = np.asarray(arrays["valid_label"], np.float64)
    labels = common.read_test_labels(common.data_paths(cfg)["raw"])
    metrics = {
        "run": name,
        "chosen_by": "single.run" if settings.run != AUTO else "the best OOF AUC of blend.runs",
        "what": RULE,
        "candidates_oof_auc": oof_aucs,
        "folds_oof_auc": oof_aucs[name],
        "refit_valid_auc": roc_auc(valid_label, preds["valid"]),
        "refit": {key: refit.get(key) for key in ("epochs", "best_epoch", "early_stopping", "seconds")},
        "submission": {"csv": str(csv_path), "zip": str(zip_path), "rows": len(test_ids), "column": sub.column},
    }
    # a failure leaves the previous single/ whole; one of other predictions is moved aside
    with common.staged_folder(out, result_files=("test.parquet",)) as staged:
        common.write_parquet(staged / "test.parquet", pd.DataFrame({"ID": test_ids, "pred": preds["test"]}))
        metrics["test_auc"] = runs.hidden_test_auc(staged / "test.parquet", labels)
        metrics["seconds"] = time.time() - started
        common.write_json(staged / "metrics.json", metrics)
        write_submission(test_ids, preds["test"], sub.dir, f"{sub.name}-single-{name}", sub.column)
    test = "" if metrics["test_auc"] is None else f", test AUC {metrics['test_auc']:.6f}"
    print(f"single network: {name}'s refit (chosen by {metrics['chosen_by']}: folds OOF AUC "
          f"{oof_aucs[name]:.6f}), valid AUC {metrics['refit_valid_auc']:.6f}{test}\n"
          f"submission: {zip_path} ({len(test_ids):,} rows, column {sub.column}): {RULE}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "blend.yaml")
    parser.add_argument("--choose", action="store_true",
                        help="only print the run the submission would use (its refit must exist for the rest)")
    args = parser.parse_args(argv)
    cfg = common.config_from_args(args)
    if args.choose:
        settings, blend_settings = checked_settings(cfg)
        print(choose(settings, fold_oof_aucs(cfg, blend_settings.runs)))
        return
    run_single(cfg)


if __name__ == "__main__":
    common.run_main(main)
