"""What several test files share: parquet edits, running a stage script, one torch thread, small
model tables and batches, and hand-made finished runs."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmctr import common, runs

SRC = common.REPO_ROOT / "src"
TOOLS = common.REPO_ROOT / "tools"
# subprocesses of tests train tiny models: one thread each is faster than two busy ones
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# parquet files
# ---------------------------------------------------------------------------------------------

def as_matrix(column) -> np.ndarray:
    """A list column (pyarrow) as a 2-D array."""
    return np.stack(column.to_numpy(zero_copy_only=False)) if len(column) else np.empty((0, 0))


def replace_column(path: Path, column: str, array: pa.Array | None, new_name: str | None = None) -> None:
    """Rewrite one column of a parquet file in place (None drops it; new_name renames it)."""
    table = pq.read_table(path)
    index = table.column_names.index(column)
    table = table.remove_column(index) if array is None else table.set_column(index, new_name or column, array)
    pq.write_table(table, path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------
# processes and threads
# ---------------------------------------------------------------------------------------------

def run_script(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """``python src/<script>.py ARGS`` (``bench``: tools/bench.py) with one thread, as a user runs it."""
    path = TOOLS / "bench.py" if script == "bench" else SRC / (script if script.endswith(".py") else f"{script}.py")
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD_ENV)


@contextlib.contextmanager
def single_thread():
    """One torch thread in this process (its fold workers take its count), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# small model inputs: the kit's tables and batches, and small model configs
# ---------------------------------------------------------------------------------------------

V, T, U, LEVELS, L = 60, 30, 40, 11, 64


def make_tables(n_items=V, n_tags=T, n_users=U, seed=0):
    g = torch.Generator().manual_seed(seed)
    item_tags = torch.randint(1, n_tags, (n_items, 5), generator=g, dtype=torch.int32)
    item_tags[:, :2] = 0  # left padding, as in item_info
    item_tags[1] = 0  # an item without tags
    item_emb = torch.randn(n_items, 128, generator=g)
    levels = [torch.randint(0, LEVELS, (n_items,), generator=g, dtype=torch.int32) for _ in range(2)]
    for table in (item_tags, item_emb, *levels):
        table[0] = 0  # the padding item
    return dict(item_tags=item_tags, item_emb=item_emb, item_likes_level=levels[0],
                item_views_level=levels[1], n_items=n_items, n_tags=n_tags, n_users=n_users,
                n_levels=LEVELS)


def make_batch(b=16, n_items=V, dtype=torch.int32, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, n_items, (b, L), generator=g)
    lengths = torch.randint(0, L + 1, (b,), generator=g)
    lengths[0], lengths[1] = 0, L  # an all-padding history and a full one
    seq[torch.arange(L) < (L - lengths).unsqueeze(1)] = 0  # left padding
    batch = dict(user_id=torch.randint(0, U, (b,), generator=g),
                 item_id=torch.randint(1, n_items, (b,), generator=g), item_seq=seq,
                 likes_level=torch.randint(0, LEVELS, (b,), generator=g),
                 views_level=torch.randint(0, LEVELS, (b,), generator=g))
    return {k: v.to(dtype) for k, v in batch.items()}


def make_label(b=16, seed=2):
    return torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(seed)).float()


M = 12  # the multimodal width: not E, so that a mix-up of the two shows in the shapes and the counts
QIN = dict(name="qin", emb_dim=8, mm_dim=M, qnn_layers=2, qnn_m=2, mlp_hidden=[32, 16])
DCN = dict(name="dcnv2", emb_dim=8, mm_dim=M, cross_layers=2, cross_rank=4, cross_experts=2, mlp_hidden=[32, 16])
DIN = dict(name="din", emb_dim=8, mm_dim=M, attention_hidden=[16, 8], mlp_hidden=[32, 16])


# ---------------------------------------------------------------------------------------------
# quick configs
# ---------------------------------------------------------------------------------------------

FASTEST = "dcnv2_tf_small"  # the quickest model to train on the tiny data
TINY = ["train.max_epochs=2", "train.batch_size=512", "train.eval_batch_size=2048", "train.log_every=2"]
FAST_LIGHTGBM = ["blend.lightgbm.n_estimators=60"]


def make_cfg(tiny_cfg, model: str, run_name: str, *overrides: str) -> dict:
    """configs/<model>.yaml sized for the tiny data, on ``tiny_cfg``'s data, as run ``run_name``."""
    cfg = common.load_config(common.CONFIG_DIR / f"{model}.yaml", [*TINY, *overrides])
    cfg["data"] = dict(tiny_cfg["data"])
    cfg["run"]["name"] = run_name
    return cfg


# ---------------------------------------------------------------------------------------------
# finished runs without a model behind them (blend, single, summary tests)
# ---------------------------------------------------------------------------------------------

def write_run(run_dir: Path, preds: dict[str, np.ndarray], arrays: dict, manifest: dict,
              refit: dict[str, np.ndarray] | None = None) -> None:
    """A finished run folder (docs/DESIGN.md "Run directory") holding the given predictions in row
    order, written through the run folder's owner; ``refit`` (valid and test predictions) adds a
    finished refit."""
    fold, test_ids = np.asarray(arrays["train_fold"]), np.asarray(arrays["test_ID"])
    common.write_json(run_dir / "fingerprint.json", {"config_hash": "handmade", "data_fingerprint": manifest["fingerprint"]})
    for k in range(int(fold.max()) + 1):
        common.write_json(runs.fold_dir(run_dir, k) / "done.json", {"fold": k})
    runs.write_predictions(run_dir, {
        "oof": runs.prediction_frame("oof", np.arange(len(fold)), preds["oof"], fold),
        "valid": runs.prediction_frame("valid", np.arange(len(preds["valid"])), preds["valid"]),
        "test": runs.prediction_frame("test", test_ids, preds["test"])})
    if refit is not None:
        folder = runs.fold_dir(run_dir, runs.REFIT)
        common.write_parquet(folder / "valid.parquet",
                             runs.prediction_frame("valid", np.arange(len(refit["valid"])), refit["valid"]))
        common.write_parquet(folder / "test.parquet", runs.prediction_frame("test", test_ids, refit["test"]))
        common.write_json(folder / "done.json", {"fold": runs.REFIT})
