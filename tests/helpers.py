"""What several test files share: parquet edits, running a stage script, one torch thread, small
model tables and batches, hand-made finished runs, and the robustness checks' tools: one-line
errors, snapshots of outputs restored after a test damaged them, and the shared pipeline's names."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mmctr import common, processed_data, runs
from mmctr.common import UserError

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

TOOL_SCRIPTS = ("bench", "ablation")  # in tools/, every other script in src/


def run_script(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """``python src/<script>.py ARGS`` (``bench``, ``ablation``: tools/) with one thread, as a user runs it."""
    path = TOOLS / f"{script}.py" if script in TOOL_SCRIPTS else SRC / (script if script.endswith(".py") else f"{script}.py")
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


# ---------------------------------------------------------------------------------------------
# robustness: one-line errors, outputs left untouched or restored, configs written on a base
# ---------------------------------------------------------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_user_error(call, *fragments: str) -> str:
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``roots``: what 'untouched' means."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                     and not p.name.startswith(runs.LOCK_FILE))  # bookkeeping
        for path in paths:
            files[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


@contextlib.contextmanager
def restored(*roots: Path):
    """Let a test damage files under ``roots``; afterwards every file is back, bytes and mtime
    (so fingerprints built from size and mtime match again) and new files are gone."""
    before = snapshot(*roots)
    try:
        yield
    finally:
        for root in roots:
            if root.is_dir():
                for path in sorted(root.rglob("*"), reverse=True):
                    if path.is_file() and str(path) not in before:
                        path.unlink()
                    elif path.is_dir() and not any(k.startswith(f"{path}/") for k in before):
                        shutil.rmtree(path, ignore_errors=True)
        for name, (data, mtime) in before.items():
            path = Path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)
            os.utime(path, ns=(mtime, mtime))


def edit_value(path: Path, column: str, row: int, value) -> None:
    values = pq.read_table(path, columns=[column])[column].to_numpy().copy()
    if isinstance(value, float):
        values = values.astype(np.float64)
    values[row] = value
    replace_column(path, column, pa.array(values))


def write_config(path: Path, base: str, sections: dict) -> Path:
    path.write_text(yaml.safe_dump({"base": str(common.CONFIG_DIR / base), **sections}))
    return path


# ---------------------------------------------------------------------------------------------
# the shared pipeline (conftest's `pipeline`): its run, its outputs, damage done to it
# ---------------------------------------------------------------------------------------------

RUN = "tiny_run"
# small enough for a few seconds per fold on 2 CPU cores
TINY_TRAIN = {"max_epochs": 2, "batch_size": 512, "eval_batch_size": 2048, "log_every": 2}


def outputs(p) -> list[Path]:
    """Every earlier output of the pipeline (not the raw data)."""
    return [p.processed, p.run_dir, p.blend_dir, p.subs]


def inf_prediction(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame.loc[7, "pred"] = np.inf
    frame.to_parquet(path)


def typo_config(p) -> Path:
    return write_config(p.root / "typo.yaml", "dcnv2_tf_small.yaml", {
        "data": {"raw_dir": str(p.raw), "work_dir": str(p.work), "n_folds": 2},
        "run": {"name": RUN}, "train": {"learning_rate": 1e-3}})



def data_fingerprint(cfg: dict) -> str:
    """The processed-data fingerprint of the config's raw files, every one hashed (what preprocess computes)."""
    data = processed_data.checked_data(cfg)
    return processed_data.fingerprint_of(processed_data.raw_records(
        Path(data["raw_dir"]), item_emb=data["item_emb"], item_feature=data["item_feature"]), data)
