"""The closing table of run.sh: every run's, the blend's and the single network's OOF, holdout and
test AUC beside the oracle, and the two submissions, each named for what it is.

Reads what the stages already wrote ({work_dir}/runs/<run>/, {work_dir}/blend/ and
{work_dir}/single/ when src/single.py ran); the test AUC needs the hidden labels that only
synthetic data has.

    python src/summary.py --config configs/blend.yaml [--set data.work_dir=...]
"""
from __future__ import annotations

import argparse

from mmctr import common
from mmctr import experiments
from mmctr import processed_data
from mmctr import runs
from mmctr.models.metrics import roc_auc


def summary_rows(cfg: dict) -> tuple[list[tuple], dict]:
    paths = common.data_paths(cfg)
    blend_metrics_path = paths["work"] / "blend" / "metrics.json"
    if not blend_metrics_path.is_file():
        raise common.UserError(f"{blend_metrics_path}: no blend yet (run src/blend.py first)")
    blend = common.read_json(blend_metrics_path)
    keys = ("runs", "chosen", "chosen_oof_auc", "chosen_valid_auc", "oracle_oof_auc", "oracle_valid_auc",
            "submission", "oof_auc_gain_vs_best_single", "best_single_run")
    missing = [key for key in keys if key not in blend] if isinstance(blend, dict) else ["runs"]
    if missing:
        raise common.UserError(f"{blend_metrics_path}: key '{missing[0]}' missing: not a blend's "
                               f"metrics.json (rerun src/blend.py)")
    # the runs and the blend were made from the processed data: new raw files (and labels) would
    # be scored against old predictions
    processed_data.load_current(cfg)
    labels = common.read_test_labels(paths["raw"])
    rows = [(name, m["oof_auc"], m["valid_auc"], runs.hidden_test_auc(blended_test_file(cfg, name, m, blend), labels))
            for name, m in blend["runs"].items()]
    rows.append((f"blend ({blend['chosen']})", blend["chosen_oof_auc"], blend["chosen_valid_auc"],
                 runs.hidden_test_auc(paths["work"] / "blend" / "test.parquet", labels)))
    single = single_metrics(paths["work"] / "single")
    if single is not None:  # a refit has no held-out train rows: no OOF AUC of its own
        rows.append((f"single: {single['run']} refit", None, single["refit_valid_auc"],
                     runs.hidden_test_auc(paths["work"] / "single" / "test.parquet", labels)))
    oracle_test = common.read_oracle_prob(paths["raw"], "test")
    rows.append(("oracle (true click prob.)", blend["oracle_oof_auc"], blend["oracle_valid_auc"],
                 None if labels is None or oracle_test is None else roc_auc(labels, oracle_test)))
    return rows, blend


def blended_test_file(cfg: dict, name: str, run_metrics: dict, blend: dict):
    """The run's test predictions the blend used (fold mean or refit), refused when the run was retrained
    since: its test AUC would sit beside the OOF and holdout AUCs of the old predictions."""
    path = runs.prediction_path(runs.run_dir(cfg, name), "test", blend.get("test_from", "folds"))
    read = run_metrics.get("test_blake2b")  # absent from the blends of older versions
    if read is not None and path.is_file() and processed_data.content_hash(path) != read:
        raise common.UserError(f"{path}: run '{name}' changed after the blend (trained again?): rerun src/blend.py")
    return path


def probe_text(blend: dict) -> str:
    """What the blend's submission is: a mix of runs or a mean of fold models is an ensemble; the best
    run alone from its refit (blend.test_from: refit) is one network."""
    if blend.get("chosen_is_one_run"):  # absent from the blends of older versions
        if blend.get("test_from") == runs.REFIT:
            return f"the blend chose {blend['best_single_run']} alone, its refit: one network"
        return (f"the blend chose {blend['best_single_run']} alone, the mean of its fold models: an ensemble, "
                f"so not eligible for a prize")
    return (f"the blend, {blend['oof_auc_gain_vs_best_single']:+.4f} OOF AUC over {blend['best_single_run']}; an "
            f"ensemble, so not eligible for a prize")


def single_metrics(folder) -> dict | None:
    """src/single.py's metrics, or None when it did not run."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = common.read_json(path)
    if not isinstance(metrics, dict) or not {"run", "refit_valid_auc", "submission"} <= set(metrics):
        raise common.UserError(f"{path}: not the metrics.json of src/single.py (rerun it)")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "blend.yaml")
    cfg = common.config_from_args(parser.parse_args(argv))
    rows, blend = summary_rows(cfg)
    cell = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    table = [("model", "OOF AUC", "holdout AUC", "test AUC")] + [(r[0], *map(cell, r[1:])) for r in rows]
    width = max(len(r[0]) for r in table)
    print()
    for r in table:
        print(f"{r[0]:<{width}}  " + "  ".join(f"{c:>11}" for c in r[1:]))
    print(f"\nleaderboard probe: {blend['submission']['zip']} ({blend['submission']['rows']:,} rows): "
          f"{probe_text(blend)}")
    single = single_metrics(common.data_paths(cfg)["work"] / "single")
    if single is not None:
        print(f"prize-eligible:    {single['submission']['zip']} ({single['submission']['rows']:,} rows): one "
              f"network, {single['run']} refit on every train row")
    if blend.get("test_from") == runs.REFIT:
        print("the runs' holdout and test AUC: their refits' (blend.test_from: refit); OOF AUC: their folds'")
    if rows[-1][3] is None:
        print("test AUC n/a: real data has no public test labels")
    log = experiments.log_path(cfg)
    if log.is_file():
        print(f"experiment log: {log} (every run and blend; python src/experiments.py {log} ranks them)")


if __name__ == "__main__":
    common.run_main(main)
