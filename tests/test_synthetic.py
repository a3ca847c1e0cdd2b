"""The synthetic generator: exact competition schema, padding rules, determinism, oracle files, the
properties of the click process that make the data worth modelling (see data/README.md), and user
errors that write nothing."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr import common
from mmctr.models.metrics import roc_auc
from mmctr import make_synthetic
from helpers import as_matrix, assert_user_error

TINY = make_synthetic.PRESETS["tiny"]
MAIN_FILES = ["train", "valid", "test", "item_info", "item_feature", "item_emb"]
ITEM_EMB_COLUMNS = ["item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_v3", "item_emb_d128_e4"]
ORACLE_FILES = ["oracle/click_prob", "oracle/test_labels"]

# Written out here, from docs/spec/competition.md, rather than taken from the generator.
ROW_FIELDS = [("user_id", pa.int64()), ("item_seq", pa.list_(pa.int64(), 64)), ("item_id", pa.int64()),
              ("likes_level", pa.int64()), ("views_level", pa.int64())]
EXPECTED_FIELDS = {
    "train": ROW_FIELDS + [("label", pa.int64())],
    "valid": ROW_FIELDS + [("label", pa.int64())],
    "test": [("ID", pa.int64())] + ROW_FIELDS,
    "item_info": [("item_id", pa.int64()), ("item_tags", pa.list_(pa.int64(), 5)),
                  ("item_emb_d128", pa.list_(pa.float64(), 128))],
    # the level columns of the real item_feature.parquet (which also holds BERT and CLIP vectors)
    "item_feature": [("item_id", pa.int64()), ("likes_level", pa.int64()), ("views_level", pa.int64())],
    # the real item_emb.parquet's columns (reczoo/WWW2025_MMCTR_Challenge README; docs/spec/competition.md);
    # the element type is undocumented (float32 here, preprocess takes any float)
    "item_emb": [("item_id", pa.int64())] + [(name, pa.list_(pa.float32(), 128)) for name in ITEM_EMB_COLUMNS],
    "oracle/click_prob": [("split", pa.string()), ("row_id", pa.int64()), ("prob", pa.float64())],
    "oracle/test_labels": [("ID", pa.int64()), ("label", pa.int64())],
}


def read(raw: Path, name: str) -> pa.Table:
    return pq.read_table(raw / f"{name}.parquet")


def is_left_padded(matrix: np.ndarray) -> bool:
    """Zeros only before the first non-zero value of each row."""
    nonzero = matrix != 0
    return bool((np.diff(nonzero.astype(np.int8), axis=1) >= 0).all())


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def tables(tiny_raw) -> dict[str, pa.Table]:
    return {name: read(tiny_raw, name) for name in MAIN_FILES + ORACLE_FILES}


@pytest.mark.parametrize("name", MAIN_FILES + ORACLE_FILES)
def test_schema_matches_the_competition_field_by_field(tiny_raw, name):
    schema = pq.read_schema(tiny_raw / f"{name}.parquet")
    assert schema.names == [field for field, _ in EXPECTED_FIELDS[name]]
    for field, expected_type in EXPECTED_FIELDS[name]:
        assert schema.field(field).type == expected_type, field


def test_sizes_follow_the_preset(tables):
    assert tables["train"].num_rows == TINY.n_train
    assert tables["valid"].num_rows == TINY.n_valid
    assert tables["test"].num_rows == TINY.n_test
    assert tables["item_info"].num_rows == TINY.n_items


def test_item_table_padding_and_ids(tables):
    items = tables["item_info"]
    assert np.array_equal(items["item_id"].to_numpy(), np.arange(TINY.n_items))
    tags, emb = as_matrix(items["item_tags"]), as_matrix(items["item_emb_d128"])
    assert not tags[0].any() and not emb[0].any()
    assert is_left_padded(tags)
    assert (tags[1:] > 0).any(axis=1).all(), "every real item has at least one tag"
    assert tags.max() < TINY.n_tags and tags.min() >= 0
    nonzero = np.where(tags > 0, tags, -np.arange(tags.size).reshape(tags.shape))
    assert all(len(np.unique(row)) == 5 for row in nonzero), "an item's tags are distinct"
    assert np.isfinite(emb).all() and (np.linalg.norm(emb[1:], axis=1) > 0).all()


def check_rows(table: pa.Table, split: str, n_users: int) -> None:
    """A split's rows: left-padded histories, ids and levels in their vocabularies, test IDs 0..n-1."""
    seq = as_matrix(table["item_seq"])
    assert is_left_padded(seq)
    assert (seq[:, -1] > 0).all(), "the most recent history slot is always filled"
    assert seq.max() < TINY.n_items and seq.min() >= 0
    lengths = (seq != 0).sum(axis=1)
    assert lengths.min() < 64 and lengths.max() == 64, "some histories are short, some full"
    item = table["item_id"].to_numpy()
    assert item.min() >= 1 and item.max() < TINY.n_items
    user = table["user_id"].to_numpy()
    assert user.min() >= 1 and user.max() <= n_users
    for level in ("likes_level", "views_level"):
        values = table[level].to_numpy()
        assert values.min() >= 0 and values.max() <= 10
    if split == "test":
        assert np.array_equal(table["ID"].to_numpy(), np.arange(table.num_rows))
        assert "label" not in table.column_names
    else:
        assert set(np.unique(table["label"].to_numpy())) == {0, 1}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_rows_padding_and_vocabularies(tables, split):
    check_rows(tables[split], split, TINY.n_users)


def test_item_feature_levels_are_what_the_rows_levels_jitter_around(tables):
    """One row per real item; a row's target levels are the item's own +-1 (the click process
    jitters 10% of them), so the file is consistent with the rows."""
    feature = tables["item_feature"]
    item = feature["item_id"].to_numpy()
    assert np.array_equal(item, np.arange(1, TINY.n_items))
    levels = {name: np.zeros(TINY.n_items, np.int64) for name in ("likes_level", "views_level")}
    for name in levels:
        levels[name][item] = feature[name].to_numpy()
        assert levels[name].min() >= 0 and levels[name].max() <= 10
    for split in ("train", "valid", "test"):
        rows = tables[split]
        target = rows["item_id"].to_numpy()
        for name, per_item in levels.items():
            diff = rows[name].to_numpy() - per_item[target]
            assert np.abs(diff).max() <= 1 and 0.8 < (diff == 0).mean() < 0.99, (split, name)


def test_item_emb_has_one_row_per_real_item_and_no_padding_row(tables):
    """As the solutions read it (a left join on item_id, or a zero row put before it): items 1..V-1."""
    item_emb = tables["item_emb"]
    assert np.array_equal(item_emb["item_id"].to_numpy(), np.arange(1, TINY.n_items))
    for name in ITEM_EMB_COLUMNS:
        vectors = as_matrix(item_emb[name])
        assert vectors.shape == (TINY.n_items - 1, 128) and np.isfinite(vectors).all(), name
        assert (np.linalg.norm(vectors, axis=1) > 0).all(), name


def test_item_emb_views_carry_the_items_semantics_with_more_or_less_noise(tables):
    """Each column is the latent semantics item_emb_d128 is made from, through its own projection and
    noise: a linear map fitted on two thirds of the items recovers the others' semantics better from
    v3 than from item_emb_d128, and worst from e4, so the column data.item_emb picks makes a model
    better or worse."""
    items = make_synthetic.make_items(TINY, np.random.default_rng([0, 0]))  # seed 0's items (tiny_raw)
    assert np.array_equal(as_matrix(tables["item_info"]["item_emb_d128"]), items.emb)
    semantic = items.semantic[1:].astype(np.float64)
    fit, held_out = slice(0, 266), slice(266, None)

    def held_out_r2(vectors: np.ndarray) -> float:
        weights = np.linalg.lstsq(vectors[fit], semantic[fit], rcond=None)[0]
        residual = semantic[held_out] - vectors[held_out] @ weights
        return float(1 - (residual ** 2).sum() / ((semantic[held_out] - semantic[held_out].mean(0)) ** 2).sum())
    r2 = {name: held_out_r2(as_matrix(tables["item_emb"][name]).astype(np.float64)) for name in ITEM_EMB_COLUMNS}
    r2["item_emb_d128"] = held_out_r2(items.emb[1:])
    order = ["item_emb_d128_v3", "item_emb_d128", "item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_e4"]
    assert sorted(r2, key=r2.get, reverse=True) == order, r2
    assert r2["item_emb_d128_v3"] > 0.99 and r2["item_emb_d128_e4"] < 0.5, r2


def test_item_emb_draws_change_no_other_file(tiny_raw, tmp_path, monkeypatch):
    """Its generator is a stream of its own: other views (here two) leave every other file's bytes."""
    monkeypatch.setattr(make_synthetic, "ITEM_EMB_VIEWS", {"item_emb_d128_v3": 0.05, "item_emb_d128_e4": 2.0})
    monkeypatch.setattr(make_synthetic, "ITEM_EMB_SCHEMA", pa.schema(
        [("item_id", pa.int64())] + [(name, pa.list_(pa.float32(), 128)) for name in ("item_emb_d128_v3",
                                                                                      "item_emb_d128_e4")]))
    make_synthetic.generate("tiny", tmp_path / "two_views", seed=0)
    assert read(tmp_path / "two_views", "item_emb").column_names == ["item_id", "item_emb_d128_v3", "item_emb_d128_e4"]
    for name in MAIN_FILES + ORACLE_FILES:
        if name != "item_emb":
            path = f"{name}.parquet"
            assert (tmp_path / "two_views" / path).read_bytes() == (tiny_raw / path).read_bytes(), name


def test_positive_rate_is_about_a_quarter(tables):
    for split in ("train", "valid"):
        assert 0.18 < tables[split]["label"].to_numpy().mean() < 0.32, split
    assert 0.18 < tables["oracle/test_labels"]["label"].to_numpy().mean() < 0.32


def test_popularity_is_skewed(tables):
    counts = np.bincount(tables["train"]["item_id"].to_numpy(), minlength=TINY.n_items)[1:]
    top_tenth = np.sort(counts)[::-1][: len(counts) // 10].sum()
    assert top_tenth > 0.35 * counts.sum(), "a few popular items get a large share of impressions"
    assert (counts < 5).mean() > 0.3, "many items are rare"


def test_oracle_files_align_with_the_splits(tables):
    oracle = tables["oracle/click_prob"]
    split_names = oracle["split"].to_numpy(zero_copy_only=False)
    for split in ("train", "valid", "test"):
        rows = oracle.filter(pa.array(split_names == split))
        assert np.array_equal(rows["row_id"].to_numpy(), np.arange(tables[split].num_rows))
        prob = rows["prob"].to_numpy()
        assert ((prob > 0) & (prob < 1)).all()
    labels = tables["oracle/test_labels"]
    assert np.array_equal(labels["ID"].to_numpy(), tables["test"]["ID"].to_numpy())


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_oracle_auc_is_high_but_not_perfect(tiny_raw, tables, split):
    from mmctr import common
    prob = common.read_oracle_prob(tiny_raw, split)
    label = (common.read_test_labels(tiny_raw) if split == "test"
             else tables[split]["label"].to_numpy())
    assert 0.78 < roc_auc(label, prob) < 0.96


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny_raw, tmp_path):
    make_synthetic.generate("tiny", tmp_path / "again", seed=0)
    for name in MAIN_FILES + ORACLE_FILES:
        path = f"{name}.parquet"
        assert (tmp_path / "again" / path).read_bytes() == (tiny_raw / path).read_bytes(), name
    make_synthetic.generate("tiny", tmp_path / "other", seed=1)
    assert not read(tmp_path / "other", "train").equals(read(tiny_raw, "train"))


def test_any_number_of_workers_writes_the_same_bytes(tiny_raw, tmp_path, monkeypatch):
    """Chunks of 1,000 rows: 4 train chunks, 1 valid and 1 test, drawn by a pool of 3 processes,
    give the files one process writes with the same chunking (row groups included)."""
    monkeypatch.setattr(make_synthetic, "CHUNK_ROWS", 1_000)
    for workers in (1, 3):
        make_synthetic.generate("tiny", tmp_path / f"w{workers}", seed=0, workers=workers)
    for name in MAIN_FILES + ORACLE_FILES:
        path = f"{name}.parquet"
        assert (tmp_path / "w3" / path).read_bytes() == (tmp_path / "w1" / path).read_bytes(), name
    assert pq.ParquetFile(tmp_path / "w3" / "train.parquet").num_row_groups == 4
    # a chunk's rows depend on the seed and the chunk alone: the 1,000-row chunks are new draws
    assert not read(tmp_path / "w3", "train").equals(read(tiny_raw, "train"))


def test_no_staging_folder_is_left_and_a_failure_writes_nothing(tiny_raw, tmp_path, monkeypatch):
    assert sorted(p.name for p in tiny_raw.iterdir()) == sorted(
        [f"{name}.parquet" for name in MAIN_FILES] + ["oracle"])

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-way")
    monkeypatch.setattr(make_synthetic, "write_splits", crash)
    with pytest.raises(RuntimeError):
        make_synthetic.generate("tiny", tmp_path / "broken", seed=0)
    assert list((tmp_path / "broken").iterdir()) == []


def test_a_killed_generations_staging_is_swept_and_a_set_mid_move_is_not_complete(tmp_path, monkeypatch):
    """A killed process leaves its staging folder (its pid gone): the next generation removes it. A
    regeneration stopped while it moves its files into place leaves no item_info.parquet, the mark
    of a complete set, so run.sh generates again instead of using a mix of two seeds."""
    out = tmp_path / "set"
    make_synthetic.generate("tiny", out, seed=0)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    left = out / f".make_synthetic-tmp-{gone}-x1y2"
    left.mkdir()
    (left / "train.parquet").write_bytes(b"half")
    moves = []

    def replace_then_die(self, target):
        moves.append(target)
        if len(moves) == 3:
            raise KeyboardInterrupt  # killed between two moves
        return Path.rename(self, target)
    monkeypatch.setattr(Path, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic.generate("tiny", out, seed=1)
    assert not left.exists() and not (out / "item_info.parquet").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_the_pool_of_a_killed_generation_dies_with_it(tmp_path):
    """Its forked workers would wait forever on a queue nobody reads."""
    import signal
    import time
    parent = subprocess.Popen([sys.executable, "src/make_synthetic.py", "--preset", "demo", "--out",
                               str(tmp_path / "demo"), "--workers", "2"], cwd=common.REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(children(parent.pid)) < 2:
            assert parent.poll() is None and time.time() < deadline, "no pool started"
            time.sleep(0.05)
        pool = children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while any(common.process_alive(pid) for pid in pool) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(common.process_alive(pid) for pid in pool)
    finally:
        parent.kill()


# --- the click process rewards what the real task rewards ------------------------------------

@pytest.fixture(scope="module")
def train_view(tiny_raw, tables):
    """Cosines between each train target and its history items in the multimodal space."""
    from mmctr import common
    emb = as_matrix(tables["item_info"]["item_emb_d128"])
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    train = tables["train"]
    seq, target = as_matrix(train["item_seq"]), train["item_id"].to_numpy()
    cos = np.einsum("nld,nd->nl", unit[seq], unit[target])
    cos[seq == 0] = -1.0
    filled = (seq != 0)[..., None]
    mean_history = (unit[seq] * filled).sum(axis=1) / filled.sum(axis=1)
    return {"cos": cos, "mean_pool": np.einsum("nd,nd->n", mean_history, unit[target]),
            "label": train["label"].to_numpy(), "likes": train["likes_level"].to_numpy(),
            "logit": logit(common.read_oracle_prob(tiny_raw, "train"))}


def test_a_few_close_history_items_beat_mean_pooling(train_view):
    top3 = np.sort(train_view["cos"], axis=1)[:, -3:].mean(axis=1)
    auc_top3 = roc_auc(train_view["label"], top3)
    auc_mean = roc_auc(train_view["label"], train_view["mean_pool"])
    assert auc_top3 > auc_mean + 0.02
    close = (train_view["cos"] > 0.8).sum(axis=1)
    assert np.median(close) <= 8, "only a few history items are near the target"


def test_likes_level_matters_more_when_the_history_matches(train_view):
    match = np.sort(train_view["cos"], axis=1)[:, -3:].mean(axis=1)
    strong, weak = match > np.quantile(match, 0.75), match < np.quantile(match, 0.5)
    slope = {name: np.polyfit(train_view["likes"][rows], train_view["logit"][rows], 1)[0]
             for name, rows in [("strong", strong), ("weak", weak)]}
    assert slope["strong"] > slope["weak"] + 0.2, slope


def test_multimodal_vectors_carry_item_semantics(tables):
    emb = as_matrix(tables["item_info"]["item_emb_d128"])[1:]
    tags = as_matrix(tables["item_info"]["item_tags"])[1:]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    shares_tag = (tags[:, None, :, None] == tags[None, :, None, :]) & (tags[:, None, :, None] > 0)
    shares_tag = shares_tag.any(axis=(2, 3)) & ~np.eye(len(tags), dtype=bool)
    others = ~shares_tag & ~np.eye(len(tags), dtype=bool)
    assert cos[shares_tag].mean() > cos[others].mean() + 0.2


def test_cli_help_runs():
    script = common.REPO_ROOT / "src" / "make_synthetic.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--preset" in result.stdout


def test_the_broad_click_process_is_another_dataset_of_the_same_format(tiny_raw, tmp_path):
    summary = make_synthetic.generate("tiny", tmp_path / "broad", seed=0, process="broad")
    assert summary["process"] == "broad"
    for name in MAIN_FILES:
        assert read(tmp_path / "broad", name).schema == read(tiny_raw, name).schema, name
    # same items and users (the process changes the click logit only, and the biases' scale)
    assert read(tmp_path / "broad", "item_info").equals(read(tiny_raw, "item_info"))
    assert not read(tmp_path / "broad", "train")["label"].equals(read(tiny_raw, "train")["label"])
    for split, info in summary["splits"].items():
        assert 0.18 < info["positive_rate"] < 0.32 and 0.75 < info["oracle_auc"] < 0.97, (split, info)
    with pytest.raises(common.UserError, match="--process 'sharp': unknown click process"):
        make_synthetic.generate("tiny", tmp_path / "x", seed=0, process="sharp")


@pytest.mark.parametrize("args, fragments", [
    (("huge", "out", 0), ["--preset 'huge'", "unknown preset"]),
    (("tiny", "out", -1), ["--seed -1", "must be >= 0"]),
    (("tiny", "a_file/below", 0), ["a_file/below", "cannot create the folder"]),
])
def test_make_synthetic_user_errors_write_nothing(tmp_path, args, fragments):
    (tmp_path / "a_file").write_text("keep")
    preset, out, seed = args
    assert_user_error(lambda: make_synthetic.generate(preset, tmp_path / out, seed), *fragments)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "keep"


def test_a_generated_set_is_written_again_but_other_data_is_left_alone(tiny_raw, tmp_path):
    """--out onto a folder make_synthetic wrote (its oracle/ there) writes the set again; onto the
    competition's files without an oracle (the real data) it refuses, one line, before any work."""
    import shutil
    shutil.copytree(tiny_raw, tmp_path / "generated")
    make_synthetic.generate("tiny", tmp_path / "generated", seed=0)
    assert (tmp_path / "generated" / "train.parquet").read_bytes() == (tiny_raw / "train.parquet").read_bytes()
    (tmp_path / "real").mkdir()
    shutil.copy(tiny_raw / "item_feature.parquet", tmp_path / "real")
    before = (tmp_path / "real" / "item_feature.parquet").read_bytes()
    assert_user_error(lambda: make_synthetic.generate("tiny", tmp_path / "real", seed=1),
                      "real", "holds item_feature.parquet but no oracle/test_labels.parquet", "left alone")
    assert [q.name for q in (tmp_path / "real").iterdir()] == ["item_feature.parquet"]
    assert (tmp_path / "real" / "item_feature.parquet").read_bytes() == before


# --- the heavy process: users with ~100 rows each and a taste that a user table can learn ---------

HEAVY_USERS = 40  # tiny's 4,000 train rows / 100


@pytest.fixture(scope="module")
def heavy_raw(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("heavy_raw")
    return out, make_synthetic.generate("tiny", out, seed=0, process="heavy")


def test_the_heavy_process_has_about_100_train_rows_per_user_and_the_same_users_in_every_split(heavy_raw):
    raw, summary = heavy_raw
    assert summary["users"] == HEAVY_USERS == make_synthetic.process_preset(
        TINY, make_synthetic.PROCESSES["heavy"]).n_users
    train_users = read(raw, "train")["user_id"].to_numpy()
    counts = np.bincount(train_users, minlength=HEAVY_USERS + 1)[1:]
    assert len(train_users) == TINY.n_train and (counts > 0).all()
    assert 70 <= counts.min() and counts.max() <= 130 and counts.mean() == 100, counts
    for split in ("valid", "test"):  # so that a user table learnt on train applies to them
        assert set(read(raw, split)["user_id"].to_numpy()) <= set(train_users), split
    # the preset's row counts and items are the default's; only the users are fewer
    assert (summary["splits"]["valid"]["rows"], summary["splits"]["test"]["rows"]) == (TINY.n_valid, TINY.n_test)


def test_the_heavy_process_writes_the_competition_format(heavy_raw, tiny_raw):
    raw, summary = heavy_raw
    for name in MAIN_FILES + ORACLE_FILES:
        schema = pq.read_schema(raw / f"{name}.parquet")
        assert [(f.name, f.type) for f in schema] == EXPECTED_FIELDS[name], name
    for name in ("item_info", "item_feature", "item_emb"):  # the same items as the other processes
        assert (raw / f"{name}.parquet").read_bytes() == (tiny_raw / f"{name}.parquet").read_bytes(), name
    for split in ("train", "valid", "test"):
        table = read(raw, split)
        check_rows(table, split, HEAVY_USERS)
        prob = common.read_oracle_prob(raw, split)
        assert len(prob) == table.num_rows and ((prob > 0) & (prob < 1)).all()
        info = summary["splits"][split]
        assert 0.18 < info["positive_rate"] < 0.32 and 0.78 < info["oracle_auc"] < 0.96, (split, info)
    assert np.array_equal(read(raw, "oracle/test_labels")["ID"].to_numpy(), np.arange(TINY.n_test))


def test_the_heavy_process_same_seed_gives_identical_bytes(heavy_raw, tmp_path):
    raw, _ = heavy_raw
    make_synthetic.generate("tiny", tmp_path / "again", seed=0, process="heavy")
    for name in MAIN_FILES + ORACLE_FILES:
        path = f"{name}.parquet"
        assert (tmp_path / "again" / path).read_bytes() == (raw / path).read_bytes(), name


def hidden_user_term(process: str, raw: Path) -> tuple[dict, np.ndarray]:
    """Per split: (user ids, the logit's part that only the user id explains, the rest, labels), from
    the world of seed 0 rebuilt, and the basis of the affinities (empty where there are none)."""
    click = make_synthetic.PROCESSES[process]
    preset = make_synthetic.process_preset(TINY, click)
    items = make_synthetic.make_items(preset, np.random.default_rng([0, 0]), click)
    users = make_synthetic.make_users(preset, items, np.random.default_rng([0, 1]), click)
    assert np.array_equal(as_matrix(read(raw, "item_info")["item_emb_d128"]), items.emb)
    basis = (np.linalg.svd(users.affinity[1:], full_matrices=False)[2][:click.user_affinity_rank]
             if click.user_affinity_weight else np.zeros((0, make_synthetic.LATENT_DIM)))
    splits = {}
    for split in ("train", "valid", "test"):
        table = read(raw, split)
        user, target = table["user_id"].to_numpy(), table["item_id"].to_numpy()
        term = users.bias[user].copy()
        if click.user_affinity_weight:
            term += click.user_affinity_weight * np.einsum("nd,nd->n", users.affinity[user],
                                                           items.semantic[target])
        label = common.read_test_labels(raw) if split == "test" else table["label"].to_numpy()
        features = np.concatenate([np.ones((len(user), 1)), items.semantic[target] @ basis.T], axis=1)
        splits[split] = user, term, logit(common.read_oracle_prob(raw, split)) - term, label, features
    return splits, basis


def user_table_fit(splits: dict, n_users: int) -> dict:
    """A user table at its best: per user, a bias and (heavy) the affinity's coordinates, fitted by
    ridge logistic regression on the train rows with everything else known (the true logit minus the
    user's part as an offset); scored on the valid and test rows against that offset alone."""
    user, _, offset, label, x = splits["train"]
    theta = np.zeros((n_users + 1, x.shape[1]))
    eye = np.eye(x.shape[1])
    for _ in range(15):  # Newton steps, all users at once
        prob = 1 / (1 + np.exp(-(offset + (x * theta[user]).sum(axis=1))))
        grad = np.zeros_like(theta)
        np.add.at(grad, user, x * (prob - label)[:, None])
        hess = np.zeros((len(theta), x.shape[1], x.shape[1]))
        np.add.at(hess, user, x[:, :, None] * x[:, None, :] * (prob * (1 - prob))[:, None, None])
        theta -= np.linalg.solve(hess + eye, (grad + theta)[..., None])[..., 0]
    held_out = [np.concatenate(parts) for parts in zip(splits["valid"], splits["test"])]
    user, term, offset, label, x = held_out
    fitted = (x * theta[user]).sum(axis=1)

    def log_loss(z):
        return float(np.mean(np.logaddexp(0, z) - label * z))
    return {"term_sd": float(term.std()), "corr": float(np.corrcoef(fitted, term)[0, 1]),
            "gain": log_loss(offset) - log_loss(offset + fitted),
            "oracle_gain": log_loss(offset) - log_loss(offset + term)}


def test_heavy_users_have_a_taste_that_a_user_table_learns_and_default_users_do_not(heavy_raw, tiny_raw):
    """The part of the true logit that only the user id explains (bias + affinity) is three times as
    spread in heavy as in default; a per-user fit on the 100 train rows of each heavy user recovers
    it on the valid and test rows and lowers their log loss, where on default's 5 rows a user the
    same fit of the bias recovers little and does not help."""
    heavy_splits, basis = hidden_user_term("heavy", heavy_raw[0])
    assert basis.shape == (make_synthetic.PROCESSES["heavy"].user_affinity_rank, make_synthetic.LATENT_DIM)
    heavy = user_table_fit(heavy_splits, HEAVY_USERS)
    default = user_table_fit(hidden_user_term("default", tiny_raw)[0], TINY.n_users)
    assert heavy["term_sd"] > 0.8 and default["term_sd"] < 0.4, (heavy, default)
    assert heavy["corr"] > 0.5 and default["corr"] < 0.45, (heavy, default)
    assert heavy["gain"] > 0.01 and heavy["gain"] > 0.25 * heavy["oracle_gain"], heavy
    assert default["gain"] < 0.003, default
