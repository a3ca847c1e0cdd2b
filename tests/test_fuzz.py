"""Fuzzing preprocess's input validation with hypothesis.

Tiny tables in the competition schema are built in memory, broken at random (columns dropped,
renamed or retyped, lists of the wrong length, ids outside the vocabulary, NaN/inf embeddings,
nulls, duplicate test IDs, labels outside 0/1, empty or damaged files, ...) and written with
pyarrow to a temporary folder. Whatever the damage, preprocess either accepts the data, and then
the processed arrays hold exactly the table's values, or raises common.UserError with one line
naming the file or setting, and then no processed (or temporary) folder is left behind. Anything
else (a traceback, a half-written folder, silently wrong arrays) is a bug.
"""
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmctr import common
from mmctr import preprocess
from mmctr import processed_data
from mmctr.models.schema import EMB_DIM, SEQ_LEN, TAG_SLOTS
from helpers import as_matrix
from conftest import make_data_cfg

N_ITEMS = 6                      # item vocabulary, 0 = padding
ROWS = {"train": 6, "valid": 3, "test": 3}
FILES = ("train", "valid", "test", "item_info")


def fixed(matrix: np.ndarray, value_type) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), value_type), matrix.shape[1])


def valid_tables(seed: int) -> dict[str, pa.Table]:
    """A small, valid data set in the competition schema (int64 ids, fixed-size lists)."""
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, 4, (N_ITEMS, TAG_SLOTS))
    emb = rng.normal(size=(N_ITEMS, EMB_DIM)).astype(np.float32)
    tags[0], emb[0] = 0, 0
    tables = {"item_info": pa.table({"item_id": pa.array(np.arange(N_ITEMS)),
                                     "item_tags": fixed(tags, pa.int64()),
                                     "item_emb_d128": fixed(emb, pa.float32())})}
    for split, n in ROWS.items():
        seq = rng.integers(1, N_ITEMS, (n, SEQ_LEN))
        seq[np.arange(SEQ_LEN) < rng.integers(0, SEQ_LEN + 1, (n, 1))] = 0  # left-padded histories
        columns = {"user_id": pa.array(rng.integers(0, 50, n)), "item_seq": fixed(seq, pa.int64()),
                   "item_id": pa.array(rng.integers(1, N_ITEMS, n)),
                   "likes_level": pa.array(rng.integers(0, 11, n)),
                   "views_level": pa.array(rng.integers(0, 11, n))}
        if split == "test":
            columns = {"ID": pa.array(np.arange(n)), **columns}
        else:
            columns["label"] = pa.array(np.arange(n) % 2)  # both classes in every split
        tables[split] = pa.table(columns)
    return tables


# ---------------------------------------------------------------------------------------------
# damage: each takes (table, column, row, draw) and returns the new table, or bytes for the file
# ---------------------------------------------------------------------------------------------

def set_column(table: pa.Table, column: str, array) -> pa.Table:
    return table.set_column(table.column_names.index(column), column, array)


def column_values(table: pa.Table, column: str) -> list:
    return table.column(column).to_pylist()


def drop(table, column, row, draw):
    return table.drop_columns([column])


def rename(table, column, row, draw):
    # to a fresh name, or onto another column's name (a duplicated column)
    new = draw(st.sampled_from(["renamed", column.upper(), *table.column_names]))
    return table.rename_columns([new if name == column else name for name in table.column_names])


RETYPES = ["float64", "float32", "int32", "int8", "uint64", "string", "bool", "null", "dictionary",
           "large_list", "list", "list_float", "list_of_lists"]


def retype(table, column, row, draw):
    kind = draw(st.sampled_from(RETYPES))
    values = table.column(column).combine_chunks()
    is_list = pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type)
    if kind == "null":
        return set_column(table, column, pa.nulls(len(values)))
    if kind == "string":
        return set_column(table, column, pa.array([str(v) for v in values.to_pylist()]))
    if kind == "dictionary" and not is_list:
        return set_column(table, column, values.dictionary_encode())
    if kind == "list_of_lists":
        return set_column(table, column, pa.array([[v] for v in values.to_pylist()]))
    if is_list:
        inner = {"large_list": pa.large_list, "list": pa.list_}.get(kind)
        if inner is not None:
            return set_column(table, column, values.cast(inner(values.type.value_type)))
        target = pa.float64() if kind in ("list_float", "float64") else pa.int64()
        return set_column(table, column, values.cast(pa.list_(target), safe=False))
    target = {"float64": pa.float64(), "float32": pa.float32(), "int32": pa.int32(), "int8": pa.int8(),
              "uint64": pa.uint64(), "bool": pa.bool_()}.get(kind, pa.float64())
    return set_column(table, column, values.cast(target, safe=False))


def set_value(table, column, row, draw):
    """A scalar or one list slot set to a value out of range, NaN, inf or null."""
    value = draw(st.sampled_from([-1, 0, 1, 2, 10, 11, N_ITEMS - 1, N_ITEMS, 2**31, -2**40,
                                  0.5, math.nan, math.inf, -math.inf, None]))
    values = column_values(table, column)
    typ = table.schema.field(column).type
    if isinstance(values[row], list):
        slot = draw(st.integers(0, len(values[row]) - 1))
        values[row] = list(values[row])
        values[row][slot] = value
        inner = typ.value_type
        if isinstance(value, float) and not pa.types.is_floating(inner):
            inner = pa.float64()
        if isinstance(value, int) and pa.types.is_floating(inner) is False and abs(value) >= 2**63:
            inner = pa.float64()
        return set_column(table, column, pa.array(values, pa.list_(inner)))
    values[row] = value
    if isinstance(value, float) and not pa.types.is_floating(typ):
        typ = pa.float64()
    return set_column(table, column, pa.array(values, typ if not pa.types.is_boolean(typ) else None))


def list_length(table, column, row, draw):
    values = column_values(table, column)
    if not isinstance(values[row], list):
        return None
    values[row] = draw(st.sampled_from([values[row][1:], values[row] + values[row][:1], []]))
    return set_column(table, column, pa.array(values, pa.list_(table.schema.field(column).type.value_type)))


def null_list(table, column, row, draw):
    values = column_values(table, column)
    values[row] = None
    return set_column(table, column, pa.array(values, table.schema.field(column).type))


def duplicate_row(table, column, row, draw):
    """The row repeated: duplicate test IDs, item ids out of order."""
    order = list(range(table.num_rows))
    order.insert(row, row)
    return table.take(pa.array(order))


def swap_rows(table, column, row, draw):
    other = draw(st.integers(0, table.num_rows - 1))
    order = list(range(table.num_rows))
    order[row], order[other] = order[other], order[row]
    return table.take(pa.array(order))


def keep_rows(table, column, row, draw):
    return table.slice(0, row)  # row 0 gives an empty table


def extra_column(table, column, row, draw):
    return table.append_column("extra", pa.array(np.zeros(table.num_rows)))


def garbage(table, column, row, draw):
    return draw(st.sampled_from([b"", b"PAR1", b"not parquet at all" * 20]))


def truncated(table, column, row, draw):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    return data[: draw(st.integers(0, len(data) - 1))]


def aimed(damage, name: str, *targets: tuple[str, str]):
    """``damage`` aimed at one of the (file, column) ``targets`` instead of a random column."""
    def aimed_damage(table, column, row, draw):
        return damage(table, column, row, draw)
    aimed_damage.__name__, aimed_damage.targets = name, targets
    return aimed_damage


SPLITS = ("train", "valid", "test")
DAMAGE = [
    drop, rename, retype, set_value, list_length, null_list, duplicate_row, swap_rows, keep_rows,
    extra_column, garbage, truncated,
    aimed(set_value, "bad_embedding", ("item_info", "item_emb_d128")),
    aimed(set_value, "bad_label", ("train", "label"), ("valid", "label")),
    aimed(set_value, "bad_id", ("item_info", "item_tags"),
          *[(split, column) for split in SPLITS for column in ("user_id", "item_id", "item_seq")]),
    aimed(set_value, "bad_level", *[(split, column) for split in SPLITS
                                    for column in ("likes_level", "views_level")]),
    aimed(list_length, "wrong_list_length", ("item_info", "item_tags"), ("item_info", "item_emb_d128"),
          *[(split, "item_seq") for split in SPLITS]),
    aimed(duplicate_row, "duplicate_test_id", ("test", "ID")),
]


@st.composite
def broken_data_sets(draw, first=None):
    """(tables or file bytes by name, n_folds, what was done): the damage ``first`` (if given),
    then up to two more drawn at random."""
    tables: dict[str, pa.Table | bytes] = dict(valid_tables(draw(st.integers(0, 3))))
    applied = []
    damages = ([first] if first else []) + draw(st.lists(st.sampled_from(DAMAGE), max_size=2))
    for damage in damages:
        if hasattr(damage, "targets"):
            file, column = draw(st.sampled_from(damage.targets))
        else:
            file, column = draw(st.sampled_from(FILES)), None
        table = tables[file]
        if isinstance(table, bytes) or table.num_rows == 0 or column not in (None, *table.column_names):
            continue
        column = column or draw(st.sampled_from(table.column_names))
        row = draw(st.integers(0, table.num_rows - 1))
        try:
            result = damage(table, column, row, draw)
        except (pa.ArrowException, KeyError, TypeError, ValueError, OverflowError):
            continue  # this damage cannot be expressed in that column's type
        if result is not None:
            tables[file] = result
            applied.append(f"{file}: {damage.__name__}({column}, row {row})")
    n_folds = draw(st.sampled_from([2, 2, 3, ROWS["train"] + 1]))
    return tables, n_folds, applied


def write_tables(tables: dict, raw: Path) -> None:
    raw.mkdir()
    for name, table in tables.items():
        path = raw / f"{name}.parquet"
        if isinstance(table, bytes):
            path.write_bytes(table)
        else:
            pq.write_table(table, path)


def assert_arrays_hold_the_tables(processed: Path, tables: dict) -> None:
    """Accepted data must come through unchanged: every processed array equals its column."""
    arrays, manifest = processed_data.load_processed(processed)
    items = tables["item_info"]
    assert manifest["vocab"]["item"] == items.num_rows
    np.testing.assert_array_equal(arrays["item_tags"], as_matrix(items["item_tags"]))
    np.testing.assert_array_equal(arrays["item_emb"], as_matrix(items["item_emb_d128"]).astype(np.float32))
    for split in ("train", "valid", "test"):
        table = tables[split]
        assert manifest["n_rows"][split] == table.num_rows
        for column in ("user_id", "item_id", "likes_level", "views_level"):
            np.testing.assert_array_equal(arrays[f"{split}_{column}"], table[column].to_pylist())
        np.testing.assert_array_equal(arrays[f"{split}_item_seq"], as_matrix(table["item_seq"]))
        assert arrays[f"{split}_item_seq"].max() < items.num_rows
        assert arrays[f"{split}_item_id"].min() >= 1
        if split == "test":
            np.testing.assert_array_equal(arrays["test_ID"], np.arange(table.num_rows))
        else:
            np.testing.assert_array_equal(arrays[f"{split}_label"], table["label"].to_pylist())
            assert set(np.unique(arrays[f"{split}_label"])) <= {0.0, 1.0}
    assert set(np.unique(arrays["train_fold"])) == set(range(manifest["n_folds"]))


def test_the_unbroken_tables_are_accepted(tmp_path):
    tables = valid_tables(0)
    write_tables(tables, tmp_path / "raw")
    processed = preprocess.run_preprocess(make_data_cfg(tmp_path / "raw", tmp_path / "work"))
    assert_arrays_hold_the_tables(processed, tables)


def check_preprocess(case) -> None:
    tables, n_folds, applied = case
    with tempfile.TemporaryDirectory() as tmp:
        raw, work = Path(tmp) / "raw", Path(tmp) / "work"
        write_tables(tables, raw)
        cfg = make_data_cfg(raw, work, n_folds=n_folds)
        try:
            processed = preprocess.run_preprocess(cfg)
        except common.UserError as error:
            message = str(error)
            assert "\n" not in message, (applied, message)
            assert ".parquet" in message or "data." in message, (applied, message)
            leftovers = sorted(p.name for p in work.iterdir()) if work.exists() else []
            assert leftovers == [], f"{applied}: failed with {message!r} but left {leftovers}"
            return
        # accepted: only valid data may pass, and it must come through unchanged
        assert_arrays_hold_the_tables(processed, tables)
        assert sorted(p.name for p in work.iterdir()) == ["processed"]


FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.__name__)
@settings(FUZZ, max_examples=6)
@given(data=st.data())
def test_each_kind_of_damage_is_accepted_or_a_user_error(damage, data):
    check_preprocess(data.draw(broken_data_sets(first=damage)))


@settings(FUZZ, max_examples=40)
@given(broken_data_sets())
def test_random_damage_is_accepted_or_a_user_error(case):
    check_preprocess(case)
