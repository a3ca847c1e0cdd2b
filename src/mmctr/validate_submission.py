"""Check a submission (csv or zip) the way the leaderboard reads it, before it is uploaded.

    python src/validate_submission.py submissions/submission-blend.zip [--config configs/blend.yaml] [--column Task2]

The format (src/mmctr/submission.py): a zip holding exactly one file, prediction.csv, at its root (a
bare csv is checked the same way), columns ID then Task2 (or the configured column), one row per
test row in test order, each prediction a probability in [0, 1]. Prints 'OK: N rows', or one line
'error: ...' and exits with code 2.
"""
from __future__ import annotations

import argparse

from mmctr import common
from mmctr.submission import DEFAULT_COLUMN, check_target, expected_test_ids, validate_submission


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="submission .zip (prediction.csv inside) or .csv")
    common.add_config_args(parser, "blend.yaml")
    parser.add_argument("--column", default=None,
                        help=f"prediction column (default: blend.submission.column, else {DEFAULT_COLUMN})")
    args = parser.parse_args(argv)
    cfg, column = check_target(common.config_from_args(args), args.column)
    expected_ids = expected_test_ids(cfg)
    validate_submission(args.file, expected_ids, column)
    print(f"OK: {len(expected_ids)} rows")


if __name__ == "__main__":
    common.run_main(main)
