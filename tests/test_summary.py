"""Scoring and the summary against the synthetic oracle, on the shared `pipeline` (conftest): a
damaged oracle is named by both, damaged or stale blend and run outputs are one-line errors, and
raw data newer than the runs is refused. Every case damages the pipeline inside helpers.restored()."""
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mmctr import score
from mmctr import summary
from helpers import RUN, assert_user_error, edit_value, outputs, replace_column, restored, snapshot, truncate


LABEL_DAMAGE = {
    "truncated": (truncate, ["test_labels.parquet", "not a readable parquet file"]),
    "empty file": (lambda path: path.write_bytes(b""), ["test_labels.parquet", "not a readable parquet file"]),
    "missing column": (lambda path: replace_column(path, "label", None),
                       ["test_labels.parquet", "column 'label': missing"]),
    "NaN label": (lambda path: edit_value(path, "label", 3, np.nan),
                  ["test_labels.parquet", "column 'label'", "ID 3 has label nan"]),
    "label outside 0/1": (lambda path: edit_value(path, "label", 4, 2),
                          ["test_labels.parquet", "column 'label'", "ID 4 has label 2"]),
    "ID outside the test set": (lambda path: edit_value(path, "ID", 0, 10**6),
                                ["test_labels.parquet", "column 'ID'", "IDs must be 0..599"]),
}


@pytest.mark.parametrize("case", list(LABEL_DAMAGE))
def test_score_and_summary_name_a_damaged_oracle(pipeline, case, one_thread):
    p = pipeline
    damage, fragments = LABEL_DAMAGE[case]
    with restored(p.raw, *outputs(p)):
        damage(p.raw / "oracle" / "test_labels.parquet")
        before = snapshot(*outputs(p))
        assert_user_error(lambda: score.score_submission(p.submission, p.blend_cfg, "Task2"), *fragments)
        assert_user_error(lambda: summary.summary_rows(p.blend_cfg), *fragments)
        assert snapshot(*outputs(p)) == before


def nan_prediction(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame.loc[2, "pred"] = np.nan
    frame.to_parquet(path)


def retrained(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame["pred"] = frame["pred"].iloc[::-1].to_numpy()
    frame.to_parquet(path)


SUMMARY_CASES = {
    "corrupt metrics": ("blend/metrics.json", lambda path: path.write_text("{"),
                        ["metrics.json", "not a readable JSON file"]),
    "metrics of something else": ("blend/metrics.json", lambda path: path.write_text("{}"),
                                  ["metrics.json", "key 'runs' missing"]),
    "missing run predictions": (f"runs/{RUN}/test.parquet", lambda path: path.unlink(),
                                ["test.parquet", "changed after the blend", "src/train.py"]),
    "NaN prediction": ("blend/test.parquet", nan_prediction, ["blend/test.parquet", "NaN or infinite"]),
    "predictions for other rows": ("blend/test.parquet",
                                   lambda path: pq.write_table(pq.read_table(path).slice(0, 10), path),
                                   ["blend/test.parquet", "column 'ID'", "10 rows"]),
    # its test AUC would sit beside the OOF and holdout AUCs of the predictions the blend read
    "run trained again after the blend": (f"runs/{RUN}/test.parquet", retrained,
                                          [f"runs/{RUN}/test.parquet", f"run '{RUN}' changed after the blend",
                                           "rerun src/blend.py"]),
}


@pytest.mark.parametrize("case", list(SUMMARY_CASES))
def test_summary_user_errors(pipeline, case, one_thread):
    p = pipeline
    target, damage, fragments = SUMMARY_CASES[case]
    with restored(p.raw, *outputs(p)):
        damage(p.work / target)
        assert_user_error(lambda: summary.summary_rows(p.blend_cfg), *fragments)


def test_summary_refuses_raw_data_newer_than_its_runs(pipeline, one_thread):
    """Regenerated raw files (new labels) would be scored against the old runs' predictions."""
    p = pipeline
    with restored(p.raw, *outputs(p)):
        edit_value(p.raw / "test.parquet", "item_id", 0, 7)
        assert_user_error(lambda: summary.summary_rows(p.blend_cfg), "changed since", "retrain")
