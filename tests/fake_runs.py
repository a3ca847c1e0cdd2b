"""Fake finished runs for blend tests: a run folder as src/train.py leaves it, with hand-made predictions."""
from pathlib import Path

import numpy as np
import pandas as pd

import common


def write_run(run_dir: Path, preds: dict[str, np.ndarray], arrays: dict, manifest: dict) -> None:
    """A finished run folder as src/train.py leaves it (docs/DESIGN.md "Run directory")."""
    fold = np.asarray(arrays["train_fold"])
    common.write_json(run_dir / "fingerprint.json",
                      {"config_hash": "handmade", "data_fingerprint": manifest["fingerprint"]})
    for k in range(manifest["n_folds"]):
        common.write_json(run_dir / f"fold{k}" / "done.json", {"fold": k})
    common.write_parquet(run_dir / "oof.parquet", pd.DataFrame(
        {"row_id": np.arange(len(fold)), "fold": fold, "pred": preds["oof"].astype(np.float32)}))
    common.write_parquet(run_dir / "valid.parquet", pd.DataFrame(
        {"row_id": np.arange(len(preds["valid"])), "pred": preds["valid"].astype(np.float32)}))
    common.write_parquet(run_dir / "test.parquet", pd.DataFrame(
        {"ID": np.asarray(arrays["test_ID"]), "pred": preds["test"].astype(np.float32)}))
