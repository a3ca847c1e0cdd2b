"""preprocess.py: round trip, folds, cache, and one clear one-line error per kind of bad input.

Robustness, on the shared `pipeline` (conftest) and on small private disks: a damaged processed
folder is one line for every reader, a damaged manifest rebuilds the folder, and a full or
read-only disk is one line that leaves no scratch behind (a full disk is ENOSPC, not SIGBUS)."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr import blend
from mmctr import common
from mmctr import make_synthetic
from mmctr import preprocess
from mmctr import processed_data
from mmctr import submission
from mmctr import train
from helpers import (ONE_THREAD_ENV, as_matrix, assert_one_line_error, assert_user_error, data_fingerprint, outputs,
                     replace_column, restored, snapshot, truncate)
from conftest import make_data_cfg

SPLITS = ["train", "valid", "test"]
N_ITEMS = make_synthetic.PRESETS["tiny"].n_items


def fixed_list(matrix: np.ndarray, value_type=pa.int64()) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), value_type), matrix.shape[1])


def edit_ints(path: Path, column: str, row: int, value) -> None:
    values = pq.read_table(path, columns=[column])[column].to_numpy().copy()
    values[row] = value
    replace_column(path, column, pa.array(values))


def edit_list(path: Path, column: str, row: int, slot: int, value, value_type=pa.int64()) -> None:
    matrix = as_matrix(pq.read_table(path, columns=[column])[column]).copy()
    matrix[row, slot] = value
    replace_column(path, column, fixed_list(matrix, value_type))


# --- round trip ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_processed):
    return processed_data.load_processed(tiny_processed)


def test_arrays_equal_the_parquet_contents(loaded, tiny_raw):
    arrays, _ = loaded
    for split in SPLITS:
        table = pq.read_table(tiny_raw / f"{split}.parquet")
        for column in ["user_id", "item_id", "likes_level", "views_level"]:
            assert arrays[f"{split}_{column}"].dtype == np.int32
            assert np.array_equal(arrays[f"{split}_{column}"], table[column].to_numpy())
        assert arrays[f"{split}_item_seq"].dtype == np.int32
        assert np.array_equal(arrays[f"{split}_item_seq"], as_matrix(table["item_seq"]))
        if split == "test":
            assert arrays["test_ID"].dtype == np.int64
            assert np.array_equal(arrays["test_ID"], table["ID"].to_numpy())
        else:
            assert arrays[f"{split}_label"].dtype == np.float32
            assert np.array_equal(arrays[f"{split}_label"], table["label"].to_numpy())
    items = pq.read_table(tiny_raw / "item_info.parquet")
    assert arrays["item_tags"].dtype == np.int32
    assert np.array_equal(arrays["item_tags"], as_matrix(items["item_tags"]))
    assert arrays["item_emb"].dtype == np.float32
    assert np.allclose(arrays["item_emb"], as_matrix(items["item_emb_d128"]), atol=1e-6)
    assert all(isinstance(array, np.memmap) for array in arrays.values())


def test_per_item_levels_come_from_item_feature_when_it_is_there(loaded, tiny_raw):
    arrays, manifest = loaded
    feature = pd.read_parquet(tiny_raw / "item_feature.parquet")
    for level in ("likes_level", "views_level"):
        expected = np.zeros(manifest["vocab"]["item"], np.int32)
        expected[feature["item_id"]] = feature[level]
        assert arrays[f"item_{level}"].dtype == np.int32
        assert np.array_equal(arrays[f"item_{level}"], expected)
    assert manifest["item_levels"]["source"] == "item_feature"


def test_data_item_feature_reads_the_levels_where_the_download_keeps_them(copy_raw, tmp_path, loaded):
    """One folder above the four files, where a read-only input (Kaggle's) cannot be copied from:
    the same levels as the file beside them; the setting is one every later stage shares."""
    raw = copy_raw()
    (raw / "item_feature.parquet").rename(raw.parent / "item_feature.parquet")
    cfg = make_data_cfg(raw, tmp_path / "work")
    cfg["data"]["item_feature"] = "../item_feature.parquet"
    arrays, manifest = processed_data.load_processed(preprocess.run_preprocess(cfg))
    reference, reference_manifest = loaded
    for name in ("item_likes_level", "item_views_level"):
        assert np.array_equal(arrays[name], reference[name]), name
    assert manifest["item_levels"]["source"] == "item_feature" and manifest["item_feature"] == "../item_feature.parquet"
    assert manifest["item_levels"]["from"] == "../item_feature.parquet (the item's own levels)"
    assert manifest["raw_files"]["item_feature"]["blake2b"] == reference_manifest["raw_files"]["item_feature"]["blake2b"]
    processed_data.load_current(cfg)
    cfg["data"]["item_feature"] = None
    assert_user_error(lambda: processed_data.load_current(cfg), "built with data.item_feature=../item_feature.parquet",
                      "the config says null")
    cfg["data"]["item_feature"] = "../no_such.parquet"
    assert_user_error(lambda: preprocess.run_preprocess(cfg), "no_such.parquet", "data.item_feature")


def test_per_item_levels_fall_back_to_rounded_means_over_all_splits(copy_raw, tmp_path, capsys):
    raw = copy_raw()
    # where the real download keeps it: one folder up, not read, and the summary says so
    (raw / "item_feature.parquet").rename(raw.parent / "item_feature.parquet")
    arrays, manifest = processed_data.load_processed(preprocess.run_preprocess(make_data_cfg(raw, tmp_path / "work")))
    printed = capsys.readouterr().out
    assert f"item levels: {preprocess.LEVEL_SOURCES['rows']}" in printed
    assert f"{raw.parent / 'item_feature.parquet'} was not read: for the items' own levels set " \
           f"data.item_feature: ../item_feature.parquet" in printed
    rows = pd.concat([pd.read_parquet(raw / f"{split}.parquet", columns=["item_id", "likes_level", "views_level"])
                      for split in SPLITS])
    means = rows.groupby("item_id").mean()
    for level in ("likes_level", "views_level"):
        expected = np.zeros(manifest["vocab"]["item"], np.int32)
        expected[means.index] = np.floor(means[level].to_numpy() + 0.5)
        assert arrays[f"item_{level}"].dtype == np.int32
        assert np.array_equal(arrays[f"item_{level}"], expected)
    unseen = np.setdiff1d(np.arange(manifest["vocab"]["item"]), means.index)
    assert 0 in unseen and not arrays["item_likes_level"][unseen].any()
    assert manifest["item_levels"]["source"] == "rows"


def test_items_item_feature_lacks_get_level_zero_and_other_columns_are_ignored(copy_raw, tmp_path):
    """The authors' left join: items without a row get 0; the real file's embedding columns are
    never read."""
    raw = copy_raw()
    feature = pq.read_table(raw / "item_feature.parquet").slice(0, 50)  # items 1..50 only
    feature = feature.append_column("bert_emb", pa.array([[0.5] * 3] * 50, pa.list_(pa.float32())))
    pq.write_table(feature, raw / "item_feature.parquet")
    arrays, _ = processed_data.load_processed(preprocess.run_preprocess(make_data_cfg(raw, tmp_path / "work")))
    likes = arrays["item_likes_level"]
    assert np.array_equal(likes[1:51], feature["likes_level"].to_numpy()) and not likes[51:].any()


def test_folds_are_stratified_and_cover_every_train_row(loaded, tiny_cfg):
    arrays, manifest = loaded
    fold, label = arrays["train_fold"], arrays["train_label"]
    n_folds = tiny_cfg["data"]["n_folds"]
    assert fold.dtype == np.int8 and len(fold) == len(label)
    assert set(np.unique(fold)) == set(range(n_folds))
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 2
    for k in range(n_folds):
        assert abs(label[fold == k].mean() - label.mean()) < 0.005
    again = preprocess.stratified_folds(np.asarray(label), n_folds, tiny_cfg["data"]["fold_seed"])
    assert np.array_equal(again, fold), "folds depend on the seed only"
    other = preprocess.stratified_folds(np.asarray(label), n_folds, tiny_cfg["data"]["fold_seed"] + 1)
    assert not np.array_equal(other, fold)


def test_manifest_fields(loaded, tiny_cfg, tiny_raw):
    _, manifest = loaded
    data = tiny_cfg["data"]
    assert manifest["fingerprint"] == data_fingerprint(tiny_cfg)
    assert manifest["n_rows"] == {split: pq.ParquetFile(tiny_raw / f"{split}.parquet").metadata.num_rows
                                  for split in SPLITS}
    tags = as_matrix(pq.read_table(tiny_raw / "item_info.parquet")["item_tags"])
    max_user = max(pq.read_table(tiny_raw / f"{s}.parquet")["user_id"].to_numpy().max() for s in SPLITS)
    assert manifest["vocab"] == {"item": len(tags), "tag": int(tags.max()) + 1,
                                 "user": int(max_user) + 1, "level": 11}
    assert (manifest["seq_len"], manifest["n_tags"], manifest["emb_dim"]) == (64, 5, 128)
    assert (manifest["n_folds"], manifest["fold_seed"]) == (data["n_folds"], data["fold_seed"])


def test_variable_length_list_columns_are_accepted(copy_raw, tmp_path, tiny_processed):
    raw = copy_raw()
    seq = pq.read_table(raw / "train.parquet")["item_seq"].combine_chunks()
    replace_column(raw / "train.parquet", "item_seq", seq.cast(pa.list_(pa.int64())))
    processed = preprocess.run_preprocess(make_data_cfg(raw, tmp_path / "work"))
    mine, _ = processed_data.load_processed(processed)
    reference, _ = processed_data.load_processed(tiny_processed)
    assert np.array_equal(mine["train_item_seq"], reference["train_item_seq"])


def test_float16_embeddings(tiny_raw, tmp_path, loaded):
    cfg = make_data_cfg(tiny_raw, tmp_path / "work")
    cfg["data"]["emb_dtype"] = "float16"
    arrays, manifest = processed_data.load_processed(preprocess.run_preprocess(cfg))
    assert arrays["item_emb"].dtype == np.float16 and manifest["emb_dtype"] == "float16"
    assert np.allclose(arrays["item_emb"], loaded[0]["item_emb"], atol=2e-3)


def test_extra_columns_are_ignored(copy_raw, tmp_path):
    raw = copy_raw()
    table = pq.read_table(raw / "test.parquet")
    pq.write_table(table.append_column("label", pa.array(np.zeros(table.num_rows, np.int64))),
                   raw / "test.parquet")
    processed = preprocess.run_preprocess(make_data_cfg(raw, tmp_path / "work"))
    # a test label is no input of the model: it must not become one (nor a test label file)
    assert not (processed / "test_label.npy").exists()
    assert sorted(p.name for p in processed.glob("test_*")) == sorted(
        f"test_{name}.npy" for name in ("ID", "item_id", "item_seq", "likes_level", "user_id", "views_level"))


# --- cache -----------------------------------------------------------------------------------

def test_cache_is_reused_until_inputs_or_settings_change(copy_raw, tmp_path, capsys):
    raw = copy_raw()
    cfg = make_data_cfg(raw, tmp_path / "work")
    processed = preprocess.run_preprocess(cfg)
    built = (processed / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()

    assert preprocess.run_preprocess(cfg) == processed
    assert "reusing" in capsys.readouterr().out
    assert (processed / "manifest.json").stat().st_mtime_ns == built

    # a new mtime alone (a copy, a touch) is the same data: reused
    stat = (raw / "valid.parquet").stat()
    os.utime(raw / "valid.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert preprocess.run_preprocess(cfg) == processed and "reusing" in capsys.readouterr().out
    # new content of the same size, the mtime put back: seen, rebuilt
    stat = (raw / "valid.parquet").stat()
    edit_ints(raw / "valid.parquet", "label", 0, 1 - pq.read_table(raw / "valid.parquet")["label"][0].as_py())
    os.utime(raw / "valid.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (raw / "valid.parquet").stat().st_size == stat.st_size
    (processed / "stale_marker").write_text("from the old build")
    preprocess.run_preprocess(cfg)
    assert "rebuilding" in capsys.readouterr().out
    assert not (processed / "stale_marker").exists(), "the old folder was replaced as a whole"

    cfg["data"]["n_folds"] = 3
    preprocess.run_preprocess(cfg)
    assert "rebuilding" in capsys.readouterr().out
    arrays, manifest = processed_data.load_processed(processed)
    assert manifest["n_folds"] == 3 and set(np.unique(arrays["train_fold"])) == {0, 1, 2}

    (raw / "item_feature.parquet").unlink()  # the optional input gone: another source of levels
    preprocess.run_preprocess(cfg)
    assert "rebuilding" in capsys.readouterr().out
    assert processed_data.load_processed(processed)[1]["item_levels"]["source"] == "rows"

    preprocess.run_preprocess(cfg, force=True)
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in processed.parent.iterdir()) == ["processed"], "no temp folders left"


def test_a_moved_or_copied_data_and_work_folder_keeps_its_fingerprint(copy_raw, tmp_path):
    """No path in the fingerprint: a work folder moved with its raw files (a copied checkout, a
    Kaggle dataset attached elsewhere) is still current, so its runs stay valid."""
    raw = copy_raw()
    cfg = make_data_cfg(raw, tmp_path / "work")
    processed = preprocess.run_preprocess(cfg)
    built = processed_data.load_processed(processed)[1]["fingerprint"]
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved")  # new mtimes too
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    moved_cfg = make_data_cfg(moved / "raw", moved / "work")
    _, _, manifest = processed_data.load_current(moved_cfg)
    assert manifest["fingerprint"] == built == data_fingerprint(moved_cfg)
    # other files at the configured place are refused, even at the same path
    edit_ints(moved / "raw" / "test.parquet", "item_id", 0, 5)
    with pytest.raises(common.UserError, match=r"are not those it was built from \(test.parquet changed since"):
        processed_data.load_current(moved_cfg)


def test_scratch_folders_of_killed_runs_are_removed_and_a_live_runs_kept(copy_raw, tmp_path):
    cfg = make_data_cfg(copy_raw(), tmp_path / "work")
    processed = preprocess.run_preprocess(cfg)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid now names a process that is gone, like a SIGKILLed preprocess
    dead = [processed.parent / f".processed-{kind}-{finished.pid}-abc" for kind in ("tmp", "old")]
    live = processed.parent / f".processed-tmp-{os.getpid()}-xyz"  # a build still running
    for folder in (*dead, live):
        folder.mkdir()
        (folder / "train_item_seq.npy").write_bytes(b"half written")

    preprocess.run_preprocess(cfg)  # the finished folder is reused: the sweep runs all the same
    assert sorted(p.name for p in processed.parent.iterdir()) == sorted(["processed", live.name])


def test_arrays_load_as_copy_on_write_maps_that_never_change_the_files(tiny_cfg):
    processed = preprocess.run_preprocess(tiny_cfg)
    arrays, _ = processed_data.load_processed(processed)
    fold = arrays["train_fold"]
    assert isinstance(fold, np.memmap) and fold.flags.writeable  # torch wraps it without a copy
    before = (processed / "train_fold.npy").read_bytes()
    fold[:] = 7
    assert (processed / "train_fold.npy").read_bytes() == before


def test_outputs_get_the_permissions_of_any_new_file(tiny_processed):
    """Not tempfile's owner-only 0700 / 0600: the processed folder and atomically written files
    are readable by whoever may read the user's other files."""
    assert stat.S_IMODE(tiny_processed.stat().st_mode) == common.DIR_MODE
    assert stat.S_IMODE((tiny_processed / "manifest.json").stat().st_mode) == common.FILE_MODE
    assert stat.S_IMODE((tiny_processed / "train_item_seq.npy").stat().st_mode) == common.FILE_MODE


def test_load_processed_without_data_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="run src/preprocess.py first"):
        processed_data.load_processed(tmp_path)


# --- bad input: one case per kind, each a one-line error naming file and column -----------------

def corrupt_pages(path: Path) -> None:
    """Garbage in the middle of the data, the footer intact: fails while reading row batches."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(data))


def right_padded_history(path: Path) -> None:
    seq = as_matrix(pq.read_table(path, columns=["item_seq"])["item_seq"]).tolist()
    seq[20] = [5] * 10 + [0] * (len(seq[20]) - 10)
    replace_column(path, "item_seq", pa.array(seq, pa.list_(pa.int64())))


def empty(path: Path) -> None:
    pq.write_table(pq.read_table(path).slice(0, 0), path)


def short_history(path: Path) -> None:
    seq = as_matrix(pq.read_table(path, columns=["item_seq"])["item_seq"]).tolist()
    seq[17] = seq[17][1:]
    replace_column(path, "item_seq", pa.array(seq, pa.list_(pa.int64())))


def null_level(path: Path) -> None:
    values = pq.read_table(path, columns=["views_level"])["views_level"].to_pylist()
    values[8] = None
    replace_column(path, "views_level", pa.array(values, pa.int64()))


def float_ids_of(column: str):
    def corrupt(path: Path) -> None:
        values = pq.read_table(path, columns=[column])[column].to_numpy().astype(np.float64)
        replace_column(path, column, pa.array(values))
    return corrupt


def nan_id_of(column: str):
    def corrupt(path: Path) -> None:
        values = pq.read_table(path, columns=[column])[column].to_numpy().astype(np.float64)
        values[4] = np.nan
        replace_column(path, column, pa.array(values))
    return corrupt


def int_embeddings(path: Path) -> None:
    emb = as_matrix(pq.read_table(path, columns=["item_emb_d128"])["item_emb_d128"])
    replace_column(path, "item_emb_d128", fixed_list(np.round(emb).astype(np.int64)))


def swapped_items(path: Path) -> None:
    table = pq.read_table(path)
    order = np.arange(table.num_rows)
    order[[1, 2]] = [2, 1]
    pq.write_table(table.take(order), path)


def duplicate_test_id(path: Path) -> None:
    edit_ints(path, "ID", 9, 8)


def missing_test_id(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.filter(pa.array(np.arange(table.num_rows) != 30)), path)


BAD_INPUTS = {
    # kind: (file, how to break it, expected message fragments)
    "missing_file": ("valid.parquet", lambda p: p.unlink(), ["valid.parquet", "file not found"]),
    "folder_for_file": ("train.parquet", lambda p: (p.unlink(), p.mkdir()), ["train.parquet", "a folder, not a file"]),
    "corrupt": ("train.parquet", lambda p: p.write_bytes(b"not parquet at all" * 50),
                ["train.parquet", "not a readable parquet file"]),
    "truncated": ("test.parquet", truncate, ["test.parquet", "not a readable parquet file"]),
    "corrupt_pages": ("train.parquet", corrupt_pages, ["train.parquet", "corrupt data from row 0 on"]),
    "empty": ("valid.parquet", empty, ["valid.parquet", "no rows"]),
    "missing_column": ("valid.parquet", lambda p: replace_column(p, "likes_level", None),
                       ["valid.parquet", "column 'likes_level'", "missing"]),
    "missing_label": ("train.parquet", lambda p: replace_column(p, "label", None),
                      ["train.parquet", "column 'label'", "missing"]),
    "non_integer_ids": ("train.parquet", float_ids_of("user_id"),
                        ["train.parquet", "column 'user_id'", "expected integer ids"]),
    "nan_in_ids": ("valid.parquet", nan_id_of("user_id"),  # what pandas writes for a missing id
                   ["valid.parquet", "column 'user_id'", "expected integer ids, found double",
                    "a null or NaN makes an integer column float"]),
    "non_float_embeddings": ("item_info.parquet", int_embeddings,
                             ["item_info.parquet", "column 'item_emb_d128'", "expected a list of floats"]),
    "wrong_list_length": ("train.parquet", short_history,
                          ["train.parquet", "column 'item_seq'", "row 17 has 63 items, expected 64"]),
    "null_value": ("valid.parquet", null_level, ["valid.parquet", "column 'views_level'", "row 8", "null"]),
    "right_padded_history": ("train.parquet", right_padded_history,
                             ["train.parquet", "column 'item_seq'", "row 20 has padding 0 after an item id",
                              "left-padded"]),
    "history_item_out_of_vocab": ("valid.parquet", lambda p: edit_list(p, "item_seq", 5, 63, N_ITEMS),
                                  ["valid.parquet", "column 'item_seq'", f"row 5 has item id {N_ITEMS}"]),
    "negative_history_item": ("train.parquet", lambda p: edit_list(p, "item_seq", 6, 60, -2),
                              ["train.parquet", "column 'item_seq'", "row 6 has item id -2"]),
    "target_is_padding": ("test.parquet", lambda p: edit_ints(p, "item_id", 3, 0),
                          ["test.parquet", "column 'item_id'", "row 3 has target item id 0"]),
    "target_out_of_vocab": ("train.parquet", lambda p: edit_ints(p, "item_id", 11, N_ITEMS),
                            ["train.parquet", "column 'item_id'", f"row 11 has target item id {N_ITEMS}"]),
    "negative_tag": ("item_info.parquet", lambda p: edit_list(p, "item_tags", 7, 4, -1),
                     ["item_info.parquet", "column 'item_tags'", "row 7 has tag id -1"]),
    "negative_user": ("valid.parquet", lambda p: edit_ints(p, "user_id", 2, -5),
                      ["valid.parquet", "column 'user_id'", "row 2 has user id -5"]),
    "level_out_of_range": ("train.parquet", lambda p: edit_ints(p, "likes_level", 4, 11),
                           ["train.parquet", "column 'likes_level'", "row 4 has level 11, expected 0..10"]),
    "item_id_not_row_number": ("item_info.parquet", swapped_items,
                               ["item_info.parquet", "column 'item_id'", "row 1 has item_id 2"]),
    "padding_item_has_tags": ("item_info.parquet", lambda p: edit_list(p, "item_tags", 0, 4, 3),
                              ["item_info.parquet", "column 'item_tags'", "row 0", "all zero"]),
    "padding_item_has_embedding": ("item_info.parquet",
                                   lambda p: edit_list(p, "item_emb_d128", 0, 0, 0.5, pa.float64()),
                                   ["item_info.parquet", "column 'item_emb_d128'", "row 0", "all zero"]),
    "nan_embedding": ("item_info.parquet",
                      lambda p: edit_list(p, "item_emb_d128", 12, 3, np.nan, pa.float64()),
                      ["item_info.parquet", "column 'item_emb_d128'", "row 12 contains NaN or inf"]),
    "inf_embedding": ("item_info.parquet",
                      lambda p: edit_list(p, "item_emb_d128", 13, 3, np.inf, pa.float64()),
                      ["item_info.parquet", "column 'item_emb_d128'", "row 13 contains NaN or inf"]),
    "duplicate_test_id": ("test.parquet", duplicate_test_id,
                          ["test.parquet", "column 'ID'", "row 9 has ID 8, expected 9"]),
    "missing_test_id": ("test.parquet", missing_test_id,
                        ["test.parquet", "column 'ID'", "row 30 has ID 31, expected 30"]),
    "label_not_binary": ("train.parquet", lambda p: edit_ints(p, "label", 6, 2),
                         ["train.parquet", "column 'label'", "row 6 has label 2, expected 0 or 1"]),
    "negative_valid_label": ("valid.parquet", lambda p: edit_ints(p, "label", 1, -1),
                             ["valid.parquet", "column 'label'", "row 1 has label -1"]),
    # the optional item_feature.parquet, validated like the others when it is there
    "item_feature_corrupt": ("item_feature.parquet", lambda p: p.write_bytes(b"not parquet" * 50),
                             ["item_feature.parquet", "not a readable parquet file"]),
    "item_feature_missing_column": ("item_feature.parquet", lambda p: replace_column(p, "views_level", None),
                                    ["item_feature.parquet", "column 'views_level'", "missing"]),
    "item_feature_float_ids": ("item_feature.parquet", float_ids_of("item_id"),
                               ["item_feature.parquet", "column 'item_id'", "expected integer ids"]),
    "item_feature_unknown_item": ("item_feature.parquet", lambda p: edit_ints(p, "item_id", 7, N_ITEMS),
                                  ["item_feature.parquet", "column 'item_id'", f"row 7 has item id {N_ITEMS}"]),
    "item_feature_repeated_item": ("item_feature.parquet", lambda p: edit_ints(p, "item_id", 9, 3),
                                   ["item_feature.parquet", "column 'item_id'", "row 9 repeats item_id 3"]),
    "item_feature_level_out_of_range": ("item_feature.parquet", lambda p: edit_ints(p, "likes_level", 2, 12),
                                        ["item_feature.parquet", "column 'likes_level'",
                                         "row 2 has level 12, expected 0..10"]),
    "item_feature_null_level": ("item_feature.parquet", null_level,
                                ["item_feature.parquet", "column 'views_level'", "row 8", "null"]),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_leaves_nothing(kind, copy_raw, tmp_path):
    file, corrupt, fragments = BAD_INPUTS[kind]
    raw = copy_raw()
    corrupt(raw / file)
    cfg = make_data_cfg(raw, tmp_path / "work")
    with pytest.raises(common.UserError) as error:
        preprocess.run_preprocess(cfg)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    work = tmp_path / "work"
    assert not work.exists() or list(work.iterdir()) == [], "no processed or temporary folder left"


def test_a_failed_rebuild_leaves_the_good_folder_untouched(copy_raw, tmp_path):
    raw = copy_raw()
    cfg = make_data_cfg(raw, tmp_path / "work")
    processed = preprocess.run_preprocess(cfg)
    before = {p.name: p.read_bytes() for p in processed.iterdir()}
    edit_ints(raw / "train.parquet", "likes_level", 0, 99)
    with pytest.raises(common.UserError, match="likes_level"):
        preprocess.run_preprocess(cfg)
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before
    assert sorted(p.name for p in processed.parent.iterdir()) == ["processed"]


@pytest.mark.parametrize("key, value, message", [
    ("emb_dtype", "float64", "config: data.emb_dtype must be float32 or float16, got 'float64'"),
    ("n_folds", 1, "config: data.n_folds must be in [2, 127], got 1"),
    ("n_folds", 128, "config: data.n_folds must be in [2, 127], got 128"),  # train_fold.npy is int8
    ("n_folds", 2.5, "config: data.n_folds must be an integer, got 2.5"),
    ("fold_seed", -1, "config: data.fold_seed must be at least 0, got -1"),  # numpy refuses it
    ("fold_seed", True, "config: data.fold_seed must be an integer, got True"),
    ("raw_dir", None, "config: data.raw_dir must be a string, got None"),
    ("nfolds", 3, "config: unknown key data.nfolds (known: raw_dir, work_dir, n_folds, fold_seed, emb_dtype, "
                  "item_emb, item_feature)"),
    ("item_feature", "", "config: data.item_feature must not be empty, got ''"),
    ("item_emb", "item_emb_d128_v3", "config: data.item_emb must be a mapping of keys, got 'item_emb_d128_v3'"),
    ("item_emb", {"colum": "item_emb_d128_v3"}, "config: unknown key data.item_emb.colum (known: file, column)"),
    ("item_emb", {"file": "item_emb.parquet"}, "config: missing key data.item_emb.column (a string, no default)"),
    ("item_emb", {"column": ""}, "config: data.item_emb.column must not be empty, got ''"),
])
def test_bad_settings_are_user_errors(tiny_raw, tmp_path, key, value, message):
    cfg = make_data_cfg(tiny_raw, tmp_path / "work")
    cfg["data"][key] = value
    with pytest.raises(common.UserError) as error:
        preprocess.run_preprocess(cfg)
    assert str(error.value) == message
    assert not (tmp_path / "work").exists()


def test_the_data_section_is_typed_with_the_defaults_in_python():
    data = processed_data.checked_data({"data": {"raw_dir": "r", "work_dir": "w", "n_folds": 4.0}})
    assert data == {"raw_dir": "r", "work_dir": "w", "n_folds": 4, "fold_seed": processed_data.DataConfig.fold_seed,
                    "emb_dtype": "float32", "item_emb": None, "item_feature": None}
    assert type(data["n_folds"]) is int
    with pytest.raises(common.UserError, match="config: missing key data.work_dir"):
        processed_data.checked_data({"data": {"raw_dir": "r"}})


def test_cli_reports_a_bad_input_as_one_error_line(copy_raw, tmp_path):
    raw = copy_raw()
    edit_ints(raw / "valid.parquet", "label", 3, 7)
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({"base": str(common.CONFIG_DIR / "data.yaml"),
                                  "data": {"raw_dir": str(raw), "work_dir": str(tmp_path / "work")}}))
    result = subprocess.run([sys.executable, str(common.REPO_ROOT / "src" / "preprocess.py"), "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "valid.parquet: column 'label': row 3 has label 7" in lines[0]


# --- data.item_emb: the multimodal vectors from another column (item_emb.parquet's) -----------

V3 = {"file": "item_emb.parquet", "column": "item_emb_d128_v3"}


def item_emb_cfg(raw: Path, work: Path, item_emb: dict | None = V3) -> dict:
    cfg = make_data_cfg(raw, work)
    cfg["data"]["item_emb"] = item_emb
    return cfg


def test_item_emb_replaces_the_vectors_by_item_id_and_zero_fills_missing_items(copy_raw, tmp_path, loaded):
    """The solutions' left join (Gavin113/WWW2025_MMCTR combine_item.py): by item_id, whatever the
    file's row order; items the file lacks get zero vectors, counted in the manifest."""
    raw = copy_raw()
    table = pq.read_table(raw / "item_emb.parquet")
    kept = np.random.default_rng(0).permutation(table.num_rows)[:300]  # 99 of 399 items dropped, rows shuffled
    pq.write_table(table.take(kept), raw / "item_emb.parquet")
    processed = preprocess.run_preprocess(item_emb_cfg(raw, tmp_path / "work"))
    arrays, manifest = processed_data.load_processed(processed)

    ids = table["item_id"].to_numpy()[kept]
    expected = np.zeros((N_ITEMS, 128), np.float32)
    expected[ids] = as_matrix(table["item_emb_d128_v3"])[kept]
    assert arrays["item_emb"].dtype == np.float32 and np.array_equal(arrays["item_emb"], expected)
    assert not arrays["item_emb"][0].any() and not arrays["item_emb"][np.setdiff1d(np.arange(1, N_ITEMS), ids)].any()
    reference, reference_manifest = loaded
    for name in ("item_tags", "item_likes_level", "train_item_seq", "train_fold", "test_ID"):
        assert np.array_equal(arrays[name], reference[name]), name  # only the vectors change
    assert manifest["item_emb"] == V3
    assert manifest["item_emb_source"] == {
        "file": "item_emb.parquet", "column": "item_emb_d128_v3", "items": 300, "missing_items": 99,
        "blake2b": processed_data.content_hash(raw / "item_emb.parquet")}
    assert manifest["raw_files"]["item_emb"]["blake2b"] == manifest["item_emb_source"]["blake2b"]
    assert manifest["fingerprint"] != reference_manifest["fingerprint"]


def test_an_item_emb_file_re_saved_with_a_zero_row_for_the_padding_item_builds_the_same(copy_raw, tmp_path):
    """The download has no row for item 0; a file re-saved from a table with the padding row (np.vstack of
    a zero vector, as some solutions build it) joins to the same vectors and counts."""
    raw = copy_raw()
    plain = processed_data.load_processed(preprocess.run_preprocess(item_emb_cfg(raw, tmp_path / "plain")))
    table = pq.read_table(raw / "item_emb.parquet")
    padding = {name: [0] if name == "item_id" else [[0.0] * 128] for name in table.column_names}
    pq.write_table(pa.concat_tables([pa.table(padding, schema=table.schema), table]), raw / "item_emb.parquet")
    padded = processed_data.load_processed(preprocess.run_preprocess(item_emb_cfg(raw, tmp_path / "padded")))
    assert np.array_equal(padded[0]["item_emb"], plain[0]["item_emb"])
    assert {k: v for k, v in padded[1]["item_emb_source"].items() if k != "blake2b"} == \
        {k: v for k, v in plain[1]["item_emb_source"].items() if k != "blake2b"}


def test_item_emb_is_a_build_setting_whose_column_and_file_content_change_the_fingerprint(copy_raw, tmp_path,
                                                                                        capsys):
    raw = copy_raw()
    cfg = item_emb_cfg(raw, tmp_path / "work")
    processed = preprocess.run_preprocess(cfg)
    v3 = processed_data.load_processed(processed)[1]["fingerprint"]
    assert data_fingerprint(cfg) == v3
    _, _, manifest = processed_data.load_current(cfg)  # current with the same setting
    # every later stage must be given the setting the folder was built with, like data.n_folds
    assert_user_error(lambda: processed_data.load_current(item_emb_cfg(raw, tmp_path / "work", None)),
                      "built with data.item_emb={column: item_emb_d128_v3, file: item_emb.parquet}",
                      "the config says null")
    v1_cfg = item_emb_cfg(raw, tmp_path / "work", {"column": "item_emb_d128_v1"})  # file: the default
    assert processed_data.checked_data(v1_cfg)["item_emb"] == {"file": "item_emb.parquet", "column": "item_emb_d128_v1"}
    v1 = data_fingerprint(v1_cfg)
    unset = data_fingerprint(item_emb_cfg(raw, tmp_path / "work", None))
    assert len({v3, v1, unset}) == 3
    capsys.readouterr()
    preprocess.run_preprocess(v1_cfg)
    assert "rebuilding" in capsys.readouterr().out
    assert processed_data.load_processed(processed)[1]["item_emb_source"]["column"] == "item_emb_d128_v1"
    # other content in the file: the folder no longer describes the raw files
    edit_list(raw / "item_emb.parquet", "item_emb_d128_v1", 5, 0, 9.0, pa.float32())
    assert_user_error(lambda: processed_data.load_current(v1_cfg), "are not those it was built from")
    assert data_fingerprint(v1_cfg) != v1
    preprocess.run_preprocess(v1_cfg)
    assert "rebuilding" in capsys.readouterr().out
    assert processed_data.load_processed(processed)[0]["item_emb"][6, 0] == 9.0  # row 5 is item 6


def test_unset_item_emb_builds_what_was_built_before_the_setting(tiny_processed, tiny_cfg, copy_raw, tmp_path, capsys):
    """Null (the default): the fingerprint's formula, the manifest's keys and the arrays of a folder
    built before data.item_emb existed, so it and its runs stay current; item_emb.parquet, though
    beside the others, is not an input then."""
    manifest = processed_data.load_processed(tiny_processed)[1]
    assert "item_emb" not in manifest and "item_emb_source" not in manifest
    assert sorted(manifest["raw_files"]) == ["item_feature", "item_info", "test", "train", "valid"]
    files = {name: [r["size"], r["blake2b"]] for name, r in sorted(manifest["raw_files"].items())}
    data = tiny_cfg["data"]
    assert manifest["fingerprint"] == common.config_hash({
        "format_version": processed_data.FORMAT_VERSION, "files": files,
        "n_folds": data["n_folds"], "fold_seed": data["fold_seed"], "emb_dtype": data["emb_dtype"]})
    assert data_fingerprint({"data": {k: v for k, v in data.items() if k != "item_emb"}}) == \
        manifest["fingerprint"]
    raw = copy_raw()
    cfg = make_data_cfg(raw, tmp_path / "work")
    processed = preprocess.run_preprocess(cfg)
    (raw / "item_emb.parquet").unlink()
    capsys.readouterr()
    assert preprocess.run_preprocess(cfg) == processed and "reusing" in capsys.readouterr().out


def item_emb_of_width(width: int):
    def corrupt(path: Path) -> None:
        emb = as_matrix(pq.read_table(path, columns=["item_emb_d128_v3"])["item_emb_d128_v3"])
        replace_column(path, "item_emb_d128_v3", fixed_list(emb[:, :width], pa.float32()))
    return corrupt


BAD_ITEM_EMB = {
    # kind: (how to break item_emb.parquet, data.item_emb, expected message fragments)
    "missing_file": (lambda p: p.unlink(), V3,
                     ["item_emb.parquet: file not found", "data.item_emb.file", "relative to data.raw_dir"]),
    "in_the_downloads_place": (lambda p: p.rename(p.parent.parent / p.name), V3,
                               ["item_emb.parquet: file not found", "is there: ../item_emb.parquet"]),
    "missing_column": (lambda p: None, {"column": "item_emb_d128_v9"},
                       ["item_emb.parquet: column 'item_emb_d128_v9': missing (found: item_id, item_emb_d128_v1"]),
    "not_float_vectors": (lambda p: None, {"column": "item_id"},
                          ["item_emb.parquet: column 'item_id': expected a list of floats"]),
    "float_ids": (float_ids_of("item_id"), V3, ["item_emb.parquet: column 'item_id': expected integer ids"]),
    "duplicate_item": (lambda p: edit_ints(p, "item_id", 9, 3), V3,
                       ["item_emb.parquet: column 'item_id': row 9 repeats item_id 3 (one row per item)"]),
    "item_out_of_range": (lambda p: edit_ints(p, "item_id", 7, N_ITEMS), V3,
                          ["item_emb.parquet: column 'item_id'", f"row 7 has item id {N_ITEMS}",
                           f"expected 0..{N_ITEMS - 1}"]),
    "padding_item_with_a_vector": (lambda p: edit_ints(p, "item_id", 0, 0), V3,
                                   ["item_emb.parquet: column 'item_emb_d128_v3': item 0 (the padding item) must "
                                    "have an all-zero vector"]),
    "wrong_width": (item_emb_of_width(64), V3,
                    ["item_emb.parquet: column 'item_emb_d128_v3': row 0 has 64 items, expected 128"]),
    "nan": (lambda p: edit_list(p, "item_emb_d128_v3", 12, 3, np.nan, pa.float32()), V3,
            ["item_emb.parquet: column 'item_emb_d128_v3': row 12 contains NaN or inf"]),
    "inf": (lambda p: edit_list(p, "item_emb_d128_v3", 4, 0, -np.inf, pa.float32()), V3,
            ["item_emb.parquet: column 'item_emb_d128_v3': row 4 contains NaN or inf"]),
    "null": (lambda p: replace_column(p, "item_emb_d128_v3", pa.array(
        [None] + pq.read_table(p)["item_emb_d128_v3"].to_pylist()[1:], pa.list_(pa.float32()))), V3,
             ["item_emb.parquet: column 'item_emb_d128_v3': row 0 is empty (null)"]),
}


@pytest.mark.parametrize("kind", list(BAD_ITEM_EMB))
def test_a_bad_item_emb_file_is_one_line_naming_file_and_column(kind, copy_raw, tmp_path):
    corrupt, item_emb, fragments = BAD_ITEM_EMB[kind]
    raw = copy_raw()
    corrupt(raw / "item_emb.parquet")
    assert_user_error(lambda: preprocess.run_preprocess(item_emb_cfg(raw, tmp_path / "work", item_emb)), *fragments)
    work = tmp_path / "work"
    assert not work.exists() or list(work.iterdir()) == [], "no processed or temporary folder left"


# --- a damaged processed folder, a damaged manifest, a full or read-only disk -----------------

def shorter_npy(path: Path) -> None:
    np.save(path, np.load(path)[:-1])


PROCESSED_DAMAGE = {
    "truncated array": ("train_fold.npy", truncate, ["train_fold.npy", "not a readable .npy file"]),
    "garbage array": ("test_ID.npy", lambda path: path.write_bytes(b"\x93NUMPY garbage"),
                      ["test_ID.npy", "not a readable .npy file", "--force"]),
    "missing array": ("valid_label.npy", lambda path: path.unlink(), ["valid_label.npy", "missing"]),
    "array of the wrong length": ("valid_item_seq.npy", shorter_npy,
                                  ["valid_item_seq.npy", "shape (599, 64)", "600 rows"]),
    "manifest not a mapping": ("manifest.json", lambda path: path.write_text("[1, 2]"),
                               ["manifest.json", "not a manifest"]),
}


@pytest.mark.parametrize("case", list(PROCESSED_DAMAGE))
def test_a_damaged_processed_folder_is_one_line_for_every_reader(pipeline, case, one_thread):
    """train, blend, bench and validate all read the processed folder through load_processed (or
    test_ID.npy); each names the damaged file and changes nothing."""
    p = pipeline
    name, damage, fragments = PROCESSED_DAMAGE[case]
    with restored(p.raw, *outputs(p)):
        damage(p.processed / name)
        before = snapshot(*outputs(p))
        assert_user_error(lambda: processed_data.load_processed(p.processed), *fragments)
        assert_user_error(lambda: blend.run_blend(p.blend_cfg), *fragments)
        if name != "manifest.json":  # a damaged manifest is rebuilt: tested below
            assert_user_error(lambda: train.run_training(p.model_cfg, device="cpu"), *fragments)
        if name == "test_ID.npy":  # validate reads it when the raw test file is not there
            without_raw = common.load_config(p.blend_yaml, ["data.raw_dir=/nonexistent/raw"])
            assert_user_error(lambda: submission.expected_test_ids(without_raw), *fragments)
        assert snapshot(*outputs(p)) == before


def test_a_damaged_manifest_rebuilds_the_processed_folder(pipeline, capsys, one_thread):
    p = pipeline
    with restored(p.raw, *outputs(p)):
        (p.processed / "manifest.json").write_text('{"fingerprint": ')
        before = {name: (p.processed / name).read_bytes() for name in ("train_fold.npy", "test_ID.npy")}
        preprocess.run_preprocess(common.load_config(p.data_yaml))
        assert "rebuilding" in capsys.readouterr().out
        assert common.read_json(p.processed / "manifest.json")["fingerprint"] == data_fingerprint(
            common.load_config(p.data_yaml))
        assert {name: (p.processed / name).read_bytes() for name in before} == before


def in_small_mount(script: str, size: str, options: str = "") -> subprocess.CompletedProcess:
    """Run ``script`` (bash) where /mnt/small is a fresh tmpfs of ``size``, in a private mount
    namespace (unshare -rm: no root needed, nothing outside sees it); skip where that is refused."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("this machine refuses a private tmpfs mount (unshare -rm), needed for a small disk")
    mount = f"mount -t tmpfs -o size={size}{',' + options if options else ''} tmpfs /mnt"
    return subprocess.run(["unshare", "-rm", "bash", "-c", f"{mount} && {script}"], capture_output=True,
                          text=True, timeout=300, env=ONE_THREAD_ENV, cwd=common.REPO_ROOT)


def test_preprocess_on_a_full_or_read_only_disk_is_one_line_and_leaves_no_scratch(tiny_raw):
    command = (f"{sys.executable} src/preprocess.py --set data.raw_dir={tiny_raw} --set data.work_dir=/mnt/work"
               f"; echo rc=$?; ls -A /mnt/work 2>/dev/null | tr '\\n' ' '")
    full = in_small_mount(command, "256k")
    assert "rc=2" in full.stdout and "Traceback" not in full.stderr, full.stderr
    assert_one_line_error(SimpleNamespace(returncode=2, stderr=full.stderr), "/mnt/work", "needs about",
                          "MiB free")
    assert full.stdout.strip().endswith("rc=2"), "nothing left in the work folder"
    read_only = in_small_mount(command, "1m", "ro")
    assert "rc=2" in read_only.stdout, read_only.stderr
    assert_one_line_error(SimpleNamespace(returncode=2, stderr=read_only.stderr), "/mnt/work", "cannot be written",
                          "Read-only file system")


def test_an_array_that_does_not_fit_is_enospc_naming_it_not_sigbus(tmp_path):
    """The memory-mapped arrays are sparse files: without a reservation a full disk kills the
    process with SIGBUS at the first write, with no message."""
    script = (f"{sys.executable} -c \"from mmctr import common, preprocess; import numpy as np, pathlib; "
              f"common.run_main(lambda: preprocess._new_array(pathlib.Path('/mnt'), "
              f"'item_emb', np.float32, (100_000, 128))[:] .fill(1))\"; echo rc=$?")
    result = in_small_mount(script, "1m")
    assert result.stdout.strip().endswith("rc=2"), (result.stdout, result.stderr)
    assert_one_line_error(SimpleNamespace(returncode=2, stderr=result.stderr), "/mnt/item_emb.npy",
                          "No space left on device", "free space")
