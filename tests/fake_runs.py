"""Fake finished runs for blend tests: a run folder as src/train.py leaves it, with hand-made predictions."""
from pathlib import Path

import numpy as np

from mmctr import runs


def write_run(run_dir: Path, preds: dict[str, np.ndarray], arrays: dict, manifest: dict,
              refit: dict[str, np.ndarray] | None = None) -> None:
    """A finished run folder (docs/DESIGN.md "Run directory"), written by the run folder's owner;
    ``refit`` (valid and test predictions) adds a finished refit."""
    runs.write_finished_run(run_dir, preds, np.asarray(arrays["train_fold"]), np.asarray(arrays["test_ID"]),
                            manifest["fingerprint"], refit)
