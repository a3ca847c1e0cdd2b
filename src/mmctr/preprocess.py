"""Validate the competition parquet files and turn them into memory-mappable numpy arrays.

    python src/preprocess.py --config configs/data.yaml [--set data.raw_dir=...] [--force]

Reads ``data.raw_dir`` (real or synthetic data, same format: train/valid/test/item_info.parquet,
item_feature.parquet when it is there or the file data.item_feature names, and the file data.item_emb
names when it is set: the
multimodal vectors from another column, e.g. item_emb.parquet's item_emb_d128_v3) and writes
``{work_dir}/processed/`` as described in docs/DESIGN.md: int32 ids and levels, float32 labels,
the item tables, stratified train folds and a manifest. Parquet is read in record batches straight
into preallocated .npy files, so the full 3.6M-row train set needs well under 8 GB. The folder is
built under a temporary name and renamed into place, so it is either complete or absent; a second
run with the same inputs and settings reuses it.

Every problem with the input is reported as one line naming the file and column, e.g.
``train.parquet: column 'item_seq': row 17 has 63 items, expected 64``.
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from mmctr import common
from mmctr.models.schema import EMB_DIM, FEATURES, LIST_FEATURES, N_LEVELS, SEQ_LEN, SPLITS, TAG_SLOTS
from mmctr.processed_data import (EMB_DTYPES, FORMAT_VERSION, ITEM_FEATURE_FILE, ITEM_FILE, checked_data, fingerprint_of,
                             input_files, raw_records)

BATCH_ROWS = 65_536
INT32_MAX = np.iinfo(np.int32).max

# Expected columns and the kind of values they hold; other columns are ignored.
ROW_COLUMNS = {name: "int_list" if name in LIST_FEATURES else "int" for name in FEATURES}
SPLIT_COLUMNS = {
    "train": {**ROW_COLUMNS, "label": "number"},
    "valid": {**ROW_COLUMNS, "label": "number"},
    "test": {"ID": "int", **ROW_COLUMNS},
}
ITEM_COLUMNS = {"item_id": "int", "item_tags": "int_list", "item_emb_d128": "float_list"}
# Optional, from the same download: per-item likes/views levels (the real file also holds BERT and
# CLIP vectors, never read). Without it every item gets the rounded mean level of its rows.
ITEM_FEATURE_COLUMNS = {"item_id": "int", "likes_level": "int", "views_level": "int"}
LEVEL_SOURCES = {"item_feature": "{file} (the item's own levels)",  # the file as data.item_feature names it
                 "rows": "the rounded mean level of the item's train/valid/test rows"}


# ---------------------------------------------------------------------------------------------
# reading and checking parquet columns
# ---------------------------------------------------------------------------------------------

def open_parquet(path: Path, columns: dict[str, str]) -> pq.ParquetFile:
    """Open ``path`` and check it has rows and every expected column with a usable type."""
    common.require_file(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise common.UserError(f"{path}: not a readable parquet file ({common.first_line(exc)})") from None
    if parquet.metadata.num_rows == 0:
        raise common.UserError(f"{path}: file has no rows")
    schema = parquet.schema_arrow
    for name, kind in columns.items():
        if name not in schema.names:
            found = ", ".join(schema.names)
            raise common.UserError(f"{path}: column '{name}': missing (found: {found})")
        if schema.names.count(name) > 1:
            raise common.UserError(f"{path}: column '{name}': appears {schema.names.count(name)} times")
        problem = _type_problem(schema.field(name).type, kind)
        if problem:
            raise common.UserError(f"{path}: column '{name}': {problem}")
    return parquet


def _type_problem(arrow_type: pa.DataType, kind: str) -> str | None:
    is_list = (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
               or pa.types.is_fixed_size_list(arrow_type))
    if kind == "int" and not pa.types.is_integer(arrow_type):
        floats = " (a null or NaN makes an integer column float)" if pa.types.is_floating(arrow_type) else ""
        return f"expected integer ids, found {arrow_type}{floats}"
    if kind == "number" and not (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
                                 or pa.types.is_boolean(arrow_type)):
        return f"expected 0/1 numbers, found {arrow_type}"
    if kind == "int_list" and not (is_list and pa.types.is_integer(arrow_type.value_type)):
        return f"expected a list of integer ids, found {arrow_type}"
    if kind == "float_list" and not (is_list and pa.types.is_floating(arrow_type.value_type)):
        return f"expected a list of floats, found {arrow_type}"
    return None


def iter_batches(parquet: pq.ParquetFile, path: Path, columns: list[str], desc: str):
    """Yield (first row number, record batch); a corrupt page becomes a one-line UserError."""
    start = 0
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    n_batches = -(-parquet.metadata.num_rows // BATCH_ROWS)
    with tqdm(total=n_batches, desc=desc, unit="batch", leave=False, disable=n_batches < 8) as bar:
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                reason = common.first_line(exc)
                raise common.UserError(f"{path}: corrupt data from row {start} on ({reason})") from None
            if batch is None:
                return
            yield start, batch
            start += batch.num_rows
            bar.update()


def _fail(path: Path, column: str, message: str):
    raise common.UserError(f"{path}: column '{column}': {message}")


def _check_no_nulls(array: pa.Array, path: Path, column: str, start: int) -> None:
    if array.null_count:
        row = start + int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        _fail(path, column, f"row {row} is empty (null)")


def scalar_column(batch: pa.RecordBatch, column: str, path: Path, start: int) -> np.ndarray:
    array = batch.column(column)
    _check_no_nulls(array, path, column, start)
    return array.to_numpy(zero_copy_only=False)


def list_column(batch: pa.RecordBatch, column: str, width: int, path: Path, start: int) -> np.ndarray:
    """A list column (fixed-size or variable list type) as an [n, width] array; every list must
    hold exactly ``width`` values."""
    array = batch.column(column)
    _check_no_nulls(array, path, column, start)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != width)
    if len(wrong):
        _fail(path, column, f"row {start + wrong[0]} has {lengths[wrong[0]]} items, expected {width}")
    values = array.flatten()  # unlike .values, flatten() honours the batch's slice offset
    if values.null_count:
        flat = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        _fail(path, column, f"row {start + flat // width} contains a null value")
    return values.to_numpy(zero_copy_only=False).reshape(len(array), width)


def check_range(values: np.ndarray, low: int, high: int, path: Path, column: str, start: int,
                what: str, expected: str | None = None) -> None:
    """Every value must lie in [low, high]; the message names the first offending row."""
    bad = (values < low) | (values > high)
    if bad.any():
        flat = int(np.flatnonzero(bad.reshape(-1))[0])
        row = flat // (values.size // len(values))
        value = values.reshape(-1)[flat]
        expected = expected or f"{low}..{high}"
        _fail(path, column, f"row {start + row} has {what} {value}, expected {expected}")


# ---------------------------------------------------------------------------------------------
# building the processed directory (its format and reading it back: src/mmctr/processed_data.py)
# ---------------------------------------------------------------------------------------------

def _new_array(folder: Path, name: str, dtype, shape) -> np.ndarray:
    path = folder / f"{name}.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    # the map's file is sparse: on a full disk a write into it would kill the process with SIGBUS.
    # Reserving its blocks now turns that into an ENOSPC error naming the file, before any work.
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, path.stat().st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve
                raise OSError(exc.errno, exc.strerror, str(path)) from None
    return array


def write_items(path: Path, out: Path, emb_dtype) -> tuple[int, int]:
    """item_tags.npy and item_emb.npy; returns (item vocabulary, tag vocabulary)."""
    parquet = open_parquet(path, ITEM_COLUMNS)
    n_items = parquet.metadata.num_rows
    tags = _new_array(out, "item_tags", np.int32, (n_items, TAG_SLOTS))
    emb = _new_array(out, "item_emb", emb_dtype, (n_items, EMB_DIM))
    max_tag = 0
    for start, batch in iter_batches(parquet, path, list(ITEM_COLUMNS), "item_info"):
        n = batch.num_rows
        item_id = scalar_column(batch, "item_id", path, start)
        wrong = np.flatnonzero(item_id != np.arange(start, start + n))
        if len(wrong):
            _fail(path, "item_id", f"row {start + wrong[0]} has item_id {item_id[wrong[0]]}, "
                                   f"expected {start + wrong[0]} (item_id must equal the row number)")
        batch_tags = list_column(batch, "item_tags", TAG_SLOTS, path, start)
        check_range(batch_tags, 0, INT32_MAX, path, "item_tags", start, "tag id",
                    "0 (padding) or a tag id")
        batch_emb = list_column(batch, "item_emb_d128", EMB_DIM, path, start)
        check_vectors(batch_emb, path, "item_emb_d128", start, emb_dtype)
        tags[start:start + n] = batch_tags
        emb[start:start + n] = batch_emb
        max_tag = max(max_tag, int(batch_tags.max()))
    if tags[0].any():
        _fail(path, "item_tags", "row 0 (the padding item) must be all zero")
    if emb[0].any():
        _fail(path, "item_emb_d128", "row 0 (the padding item) must be all zero")
    tags.flush()
    emb.flush()
    return n_items, max_tag + 1


def check_vectors(vectors: np.ndarray, path: Path, column: str, start: int, emb_dtype) -> None:
    """Every value finite and within ``emb_dtype``'s range; the message names the first bad row."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        _fail(path, column, f"row {start + np.flatnonzero(bad)[0]} contains NaN or inf")
    too_big = (np.abs(vectors) > np.finfo(emb_dtype).max).any(axis=1)
    if too_big.any():
        _fail(path, column, f"row {start + np.flatnonzero(too_big)[0]} has a value too large for "
                            f"data.emb_dtype {np.dtype(emb_dtype).name}")


def replace_item_emb(path: Path, column: str, out: Path, n_items: int, emb_dtype) -> dict:
    """data.item_emb: item_emb.npy's rows become ``column`` of ``path``, joined on item_id the way the
    solutions join item_emb.parquet onto item_info (a left join, missing vectors zero-filled): the
    file's ids must be items of item_info (each once; the download has no row for the padding item 0,
    a re-saved file may have one, all zero) and its vectors item_emb_d128's width, finite. Returns the
    manifest's record of the source, with the count of items the file lacks (zero vectors)."""
    parquet = open_parquet(path, {"item_id": "int", column: "float_list"})
    emb = np.load(out / "item_emb.npy", mmap_mode="r+")
    emb[:] = 0
    seen = np.zeros(n_items, bool)
    for start, batch in iter_batches(parquet, path, ["item_id", column], path.name):
        item = scalar_column(batch, "item_id", path, start)
        check_range(item, 0, n_items - 1, path, "item_id", start, "item id",
                    f"0..{n_items - 1} (the items of {ITEM_FILE})")
        mark_once(item, seen, path, start)
        vectors = list_column(batch, column, EMB_DIM, path, start)
        check_vectors(vectors, path, column, start, emb_dtype)
        emb[item] = vectors
    if emb[0].any():
        _fail(path, column, "item 0 (the padding item) must have an all-zero vector")
    emb.flush()
    missing = int(n_items - 1 - np.count_nonzero(seen[1:]))
    if missing:
        common.log(f"preprocess: {missing} of {n_items - 1} items have no row in {path}: their "
                   f"'{column}' vectors are zero")
    return {"items": n_items - 1 - missing, "missing_items": missing}


def write_split(split: str, path: Path, out: Path, n_items: int, level_sums: np.ndarray,
                level_counts: np.ndarray) -> tuple[int, int, float | None]:
    """The split's row arrays; adds its target levels to the per-item sums.

    Returns (rows, largest user id, positive rate or None for test).
    """
    columns = SPLIT_COLUMNS[split]
    parquet = open_parquet(path, columns)
    n_rows = parquet.metadata.num_rows
    arrays = {name: _new_array(out, f"{split}_{name}", np.int32, (n_rows,))
              for name in ("user_id", "item_id", "likes_level", "views_level")}
    arrays["item_seq"] = _new_array(out, f"{split}_item_seq", np.int32, (n_rows, SEQ_LEN))
    if "label" in columns:
        arrays["label"] = _new_array(out, f"{split}_label", np.float32, (n_rows,))
    if "ID" in columns:
        arrays["ID"] = _new_array(out, "test_ID", np.int64, (n_rows,))
    max_user, n_positive = 0, 0
    for start, batch in iter_batches(parquet, path, list(columns), split):
        end = start + batch.num_rows
        if "ID" in columns:
            ids = scalar_column(batch, "ID", path, start)
            wrong = np.flatnonzero(ids != np.arange(start, end))
            if len(wrong):
                _fail(path, "ID", f"row {start + wrong[0]} has ID {ids[wrong[0]]}, expected "
                                  f"{start + wrong[0]} (IDs must be 0..N-1 in row order, each once)")
            arrays["ID"][start:end] = ids
        user = scalar_column(batch, "user_id", path, start)
        check_range(user, 0, INT32_MAX - 1, path, "user_id", start, "user id", "a non-negative int32 id")
        item = scalar_column(batch, "item_id", path, start)
        vocab = f"(item_info.parquet has {n_items} items, 0 = padding)"
        check_range(item, 1, n_items - 1, path, "item_id", start, "target item id",
                    f"1..{n_items - 1} {vocab}")
        seq = list_column(batch, "item_seq", SEQ_LEN, path, start)
        check_range(seq, 0, n_items - 1, path, "item_seq", start, "item id", f"0..{n_items - 1} {vocab}")
        # left-padded: once an item appears, no padding follows (a right-padded history would put
        # the padding where the models look for the most recent items)
        gap = np.flatnonzero(((seq[:, 1:] == 0) & (np.maximum.accumulate(seq, axis=1)[:, :-1] > 0)).any(axis=1))
        if len(gap):
            _fail(path, "item_seq", f"row {start + gap[0]} has padding 0 after an item id: the history "
                                    f"must be left-padded (0s first, the most recent item last)")
        levels = []
        for name in ("likes_level", "views_level"):
            levels.append(scalar_column(batch, name, path, start))
            check_range(levels[-1], 0, N_LEVELS - 1, path, name, start, "level")
            arrays[name][start:end] = levels[-1]
        if "label" in columns:
            label = scalar_column(batch, "label", path, start)
            not_binary = np.flatnonzero((label != 0) & (label != 1))
            if len(not_binary):
                _fail(path, "label", f"row {start + not_binary[0]} has label "
                                     f"{label[not_binary[0]]}, expected 0 or 1")
            arrays["label"][start:end] = label
            n_positive += int(np.count_nonzero(label))
        arrays["user_id"][start:end] = user
        arrays["item_id"][start:end] = item
        arrays["item_seq"][start:end] = seq
        max_user = max(max_user, int(user.max()))
        level_counts += np.bincount(item, minlength=n_items)
        for sums, level in zip(level_sums, levels):
            sums += np.bincount(item, weights=level, minlength=n_items)
    for array in arrays.values():
        array.flush()
    return n_rows, max_user, (n_positive / n_rows if "label" in columns else None)


def levels_from_rows(level_sums: np.ndarray, level_counts: np.ndarray) -> np.ndarray:
    """[2, V] likes/views level per item: the rounded mean of the levels its rows carry; items no
    row shows (and the padding item) get 0."""
    mean_levels = np.floor(level_sums / np.maximum(level_counts, 1) + 0.5)
    mean_levels[:, level_counts == 0] = 0
    return mean_levels.astype(np.int32)


def levels_from_item_feature(path: Path, n_items: int) -> np.ndarray:
    """[2, V] likes/views level per item from item_feature.parquet, as the QIN authors join it onto
    item_info (salmon1802/QIN data/combine_item.py): by item_id, items the file lacks get 0."""
    parquet = open_parquet(path, ITEM_FEATURE_COLUMNS)
    levels = np.zeros((2, n_items), np.int32)
    seen = np.zeros(n_items, bool)
    for start, batch in iter_batches(parquet, path, list(ITEM_FEATURE_COLUMNS), "item_feature"):
        item = scalar_column(batch, "item_id", path, start)
        check_range(item, 0, n_items - 1, path, "item_id", start, "item id",
                    f"0..{n_items - 1} (the items of {ITEM_FILE})")
        mark_once(item, seen, path, start)
        for k, name in enumerate(("likes_level", "views_level")):
            value = scalar_column(batch, name, path, start)
            check_range(value, 0, N_LEVELS - 1, path, name, start, "level")
            levels[k, item] = value
    if levels[:, 0].any():
        _fail(path, "likes_level" if levels[0, 0] else "views_level",
              "item 0 (the padding item) must have level 0")
    return levels


def mark_once(item: np.ndarray, seen: np.ndarray, path: Path, start: int) -> None:
    """Mark the item ids of one batch of an item-keyed file as seen; one row per item, or an error
    naming the first row that repeats one (here or in an earlier batch)."""
    repeated = np.flatnonzero(seen[item] | _repeats(item))
    if len(repeated):
        _fail(path, "item_id", f"row {start + repeated[0]} repeats item_id {item[repeated[0]]} (one row per item)")
    seen[item] = True


def _repeats(values: np.ndarray) -> np.ndarray:
    """True where a value already appeared earlier in the same array."""
    first = np.zeros(len(values), bool)
    first[np.unique(values, return_index=True)[1]] = True
    return ~first


def stratified_folds(label: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Each class is shuffled and dealt round-robin, so every fold gets the same positive rate."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(label), np.int8)
    for cls in (0, 1):
        rows = rng.permutation(np.flatnonzero(label == cls))
        fold[rows] = np.arange(len(rows)) % n_folds
    return fold


def build(cfg: dict, out: Path, fingerprint_value: str, records: dict[str, dict]) -> dict:
    """Write every processed array and the manifest (last) into the empty folder ``out``."""
    data = cfg["data"]
    files = input_files(Path(data["raw_dir"]), data["item_emb"], data["item_feature"])
    emb_dtype = EMB_DTYPES[data["emb_dtype"]]
    n_items, n_tags = write_items(files["item_info"], out, emb_dtype)
    item_emb_source = None
    if data["item_emb"] is not None:  # another column of vectors instead of item_emb_d128
        file, column = data["item_emb"]["file"], data["item_emb"]["column"]
        item_emb_source = {"file": file, "column": column, "blake2b": records["item_emb"]["blake2b"],
                           **replace_item_emb(files["item_emb"], column, out, n_items, emb_dtype)}

    level_sums = np.zeros((2, n_items))
    level_counts = np.zeros(n_items, np.int64)
    n_rows, positive_rate, max_user = {}, {}, 0
    for split in SPLITS:
        rows, split_max_user, rate = write_split(split, files[split], out, n_items, level_sums,
                                                 level_counts)
        n_rows[split], max_user = rows, max(max_user, split_max_user)
        if rate is not None:
            positive_rate[split] = rate
    # every fold's held-out rows and the valid holdout need both classes, or their AUC is undefined
    for split, label_file in (("train", "train_label.npy"), ("valid", "valid_label.npy")):
        label = np.load(out / label_file, mmap_mode="r")
        n_positive = int(np.count_nonzero(label))
        n_negative = len(label) - n_positive
        needed = data["n_folds"] if split == "train" else 1
        if min(n_positive, n_negative) < needed:
            where = f"each of data.n_folds={needed} folds" if split == "train" else "the holdout"
            raise common.UserError(f"{files[split]}: column 'label': {n_positive} positive and "
                                   f"{n_negative} negative rows cannot give {where} both classes "
                                   f"(AUC needs both)")

    # Per-item levels let a model attach likes/views to history items (qin_plus)
    level_source = "item_feature" if "item_feature" in files else "rows"
    item_levels = (levels_from_item_feature(files["item_feature"], n_items) if level_source == "item_feature"
                   else levels_from_rows(level_sums, level_counts))
    np.save(out / "item_likes_level.npy", item_levels[0])
    np.save(out / "item_views_level.npy", item_levels[1])
    train_label = np.load(out / "train_label.npy", mmap_mode="r")
    np.save(out / "train_fold.npy", stratified_folds(train_label, data["n_folds"], data["fold_seed"]))

    manifest = {
        "fingerprint": fingerprint_value,
        "format_version": FORMAT_VERSION,
        "raw_dir": str(Path(data["raw_dir"]).resolve()),  # where it was built from (not compared)
        "raw_files": records,
        "n_rows": n_rows,
        "positive_rate": positive_rate,
        "vocab": {"item": n_items, "tag": n_tags, "user": max_user + 1, "level": N_LEVELS},
        "seq_len": SEQ_LEN,
        "n_tags": TAG_SLOTS,
        "emb_dim": EMB_DIM,
        "emb_dtype": data["emb_dtype"],
        "n_folds": data["n_folds"],
        "fold_seed": data["fold_seed"],
        "item_levels": {"source": level_source,
                        "from": LEVEL_SOURCES[level_source].format(file=data["item_feature"] or ITEM_FEATURE_FILE)},
    }
    if item_emb_source is not None:  # unset: no key, the manifest of a build before the setting existed
        manifest["item_emb"] = data["item_emb"]  # the setting, compared by load_current
        manifest["item_emb_source"] = item_emb_source
    if data["item_feature"] is not None:  # the same
        manifest["item_feature"] = data["item_feature"]
    common.write_json(out / "manifest.json", manifest)
    return manifest


def require_room(folder: Path, raw_dir: Path, emb_dtype) -> None:
    """Refuse to start a build that cannot fit on ``folder``'s disk (the arrays' sizes follow from
    the inputs' row counts): better one line now than ENOSPC half-way."""
    files = input_files(raw_dir)
    n_items = open_parquet(files["item_info"], ITEM_COLUMNS).metadata.num_rows
    n_rows = sum(open_parquet(files[split], SPLIT_COLUMNS[split]).metadata.num_rows for split in SPLITS)
    item_bytes = EMB_DIM * np.dtype(emb_dtype).itemsize + TAG_SLOTS * 4 + 2 * 8
    row_bytes = SEQ_LEN * 4 + 4 * 4 + 8  # item_seq, four int32 columns, label (float32) or ID (int64)
    needed = n_items * item_bytes + n_rows * (row_bytes + 1)  # + the train rows' fold number
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise common.UserError(f"{folder}: the processed data needs about {needed / 2**20:,.0f} MiB and the "
                               f"disk has {free / 2**20:,.0f} MiB free; free space or set data.work_dir elsewhere")


def run_preprocess(cfg: dict, force: bool = False) -> Path:
    """Build (or reuse) the processed directory for ``cfg``; return its path."""
    cfg = {**cfg, "data": checked_data(cfg)}
    processed = common.data_paths(cfg)["processed"]
    # a killed build's scratch folder holds gigabytes at full size: gone before the room is checked,
    # and also when the finished folder is reused
    common.sweep_staged_left_overs(processed)
    records = raw_records(Path(cfg["data"]["raw_dir"]), item_emb=cfg["data"]["item_emb"],
                          item_feature=cfg["data"]["item_feature"])
    fingerprint_value = fingerprint_of(records, cfg["data"])
    manifest_path = processed / "manifest.json"
    if not force and manifest_path.is_file():
        try:
            built = common.read_json(manifest_path)
        except common.UserError as exc:  # a damaged manifest describes nothing: rebuild
            common.log(f"preprocess: {exc}")
            built = None
        if isinstance(built, dict) and built.get("fingerprint") == fingerprint_value:
            common.log(f"preprocess: {processed} is up to date (fingerprint {fingerprint_value}), "
                       f"reusing it; --force rebuilds")
            return processed
        common.log(f"preprocess: inputs or settings changed since {processed} was built, rebuilding")

    started = time.time()
    common.require_writable_folder(processed.parent, "the processed data's folder (data.work_dir)")
    require_room(processed.parent, Path(cfg["data"]["raw_dir"]), EMB_DTYPES[cfg["data"]["emb_dtype"]])
    with common.staged_folder(processed) as staging:  # a failed build leaves the previous one whole
        manifest = build(cfg, staging, fingerprint_value, records)

    rows = ", ".join(f"{split} {n:,d}" for split, n in manifest["n_rows"].items())
    vocab = ", ".join(f"{name} {n:,d}" for name, n in manifest["vocab"].items())
    rates = ", ".join(f"{split} {rate:.3f}" for split, rate in manifest["positive_rate"].items())
    common.log(f"preprocess: wrote {processed} in {time.time() - started:.1f} s")
    print(f"  rows: {rows}\n  vocab: {vocab}\n  positive rate: {rates}\n"
          f"  folds: {manifest['n_folds']} (seed {manifest['fold_seed']}), "
          f"item_emb {manifest['emb_dtype']}{item_emb_text(manifest)}\n"
          f"  item levels: {manifest['item_levels']['from']}", flush=True)
    raw_dir = Path(cfg["data"]["raw_dir"])
    if manifest["item_levels"]["source"] == "rows" and (raw_dir.parent / ITEM_FEATURE_FILE).is_file():
        # the real download keeps item_feature.parquet one folder above MicroLens_1M_x1/
        common.log(f"preprocess: note: {raw_dir.parent / ITEM_FEATURE_FILE} was not read: for the items' own "
                   f"levels set data.item_feature: ../{ITEM_FEATURE_FILE} (in every stage's config, as "
                   f"configs/data.yaml) and rerun preprocess.py")
    return processed


def item_emb_text(manifest: dict) -> str:
    """Where item_emb.npy's vectors came from, when not item_info's item_emb_d128."""
    source = manifest.get("item_emb_source")
    if not source:
        return ""
    return (f" from {source['file']} column '{source['column']}' ({source['items']} items there, "
            f"{source['missing_items']} missing: zero vectors)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(parser, "data.yaml")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    args = parser.parse_args(argv)
    run_preprocess(common.config_from_args(args), force=args.force)


if __name__ == "__main__":
    common.run_main(main)
