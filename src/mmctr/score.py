"""Score a submission locally the way the leaderboard does: ROC AUC against the hidden test labels.

    python src/score.py submissions/submission-blend.zip [--config configs/blend.yaml] [--column Task2]

Only synthetic data has the hidden labels (raw_dir/oracle/test_labels.parquet); next to the
submission's AUC it prints the oracle AUC, that of the true click probabilities on the same rows,
which no model can beat on average. The submission is validated first. On real data there are no
labels: the script says so and exits 0 after the validation, without a score.
"""
from __future__ import annotations

import argparse
import os


from mmctr import common
from mmctr.common import UserError
from mmctr.submission import check_target, checked_predictions, expected_test_ids, read_submission
from mmctr.models.metrics import roc_auc


def score_submission(path: str | os.PathLike, cfg: dict, column: str) -> dict:
    """Validate ``path``; return rows, test AUC and oracle AUC (both None on real data)."""
    expected_ids = expected_test_ids(cfg)
    frame, where = read_submission(path)
    preds = checked_predictions(frame, expected_ids, column, where=where, from_file=True)
    raw_dir = common.data_paths(cfg)["raw"]
    labels = common.read_test_labels(raw_dir)
    if labels is None:
        return {"rows": len(preds), "auc": None, "oracle_auc": None}
    if len(labels) != len(preds):
        raise UserError(f"{raw_dir}/oracle/test_labels.parquet: {len(labels)} labels for {len(preds)} "
                        f"test rows: the oracle belongs to other data")
    oracle_prob = common.read_oracle_prob(raw_dir, "test")
    return {"rows": len(preds), "auc": float(roc_auc(labels, preds)),
            "oracle_auc": None if oracle_prob is None else float(roc_auc(labels, oracle_prob))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submission", help="submission .zip (prediction.csv inside) or .csv")
    common.add_config_args(parser, "blend.yaml")
    parser.add_argument("--column", default=None,
                        help="prediction column (default: blend.submission.column, else Task2)")
    args = parser.parse_args(argv)
    cfg, column = check_target(common.config_from_args(args), args.column)
    result = score_submission(args.submission, cfg, column)
    print(f"{args.submission}: valid submission, {result['rows']:,} rows")
    if result["auc"] is None:
        print(f"no labels: {common.data_paths(cfg)['oracle']}/test_labels.parquet does not exist (real "
              f"data), so there is no local score; the leaderboard scores the upload")
        return
    print(f"test AUC    {result['auc']:.6f}  (hidden synthetic labels, scored as the leaderboard does)")
    if result["oracle_auc"] is not None:
        print(f"oracle AUC  {result['oracle_auc']:.6f}  (true click probabilities, same rows: the ceiling)")
        print(f"gap         {result['oracle_auc'] - result['auc']:.6f}")


if __name__ == "__main__":
    common.run_main(main)
