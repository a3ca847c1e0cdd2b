"""The processed folder {work_dir}/processed/: its format, its fingerprint, and reading it back.

src/preprocess.py (mmctr.preprocess) alone writes it; every later stage reads it through
load_current, which refuses a folder that is missing, was built with other settings or by another
format version, or whose raw files changed since (one line naming the command to run). The layout:
{split}_{name}.npy per row array (ROW_ARRAYS), one .npy per item table (ITEM_ARRAYS), and
manifest.json (written last: rows, vocabularies, the fingerprint, the raw files' records).
"""
from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from mmctr import common
from mmctr.models.schema import FEATURES, ITEM_TABLES, SPLITS

FORMAT_VERSION = 2      # bump when the processed layout changes: old caches then rebuild
ITEM_FILE = "item_info.parquet"
# Optional, from the same download: per-item likes/views levels (the real file also holds BERT and
# CLIP vectors, never read). Without it every item gets the rounded mean level of its rows.
ITEM_FEATURE_FILE = "item_feature.parquet"
# Optional, from the same download: four more 128-d vectors per item (item_emb_d128_v1/v2/v3/e4,
# undocumented by the organisers); data.item_emb picks one column instead of item_emb_d128.
ITEM_EMB_FILE = "item_emb.parquet"
EmbDtype = Literal["float32", "float16"]
EMB_DTYPES = {name: np.dtype(name).type for name in get_args(EmbDtype)}
# The per-row arrays of each split in the processed folder ({split}_{name}.npy)
ROW_ARRAYS = {split: FEATURES + (("label",) if split != "test" else ("ID",)) + (("fold",) if split == "train" else ())
              for split in SPLITS}
ITEM_ARRAYS = ITEM_TABLES  # [V] or [V, ...]


def input_files(raw_dir: Path, item_emb: dict | None = None, item_feature: str | None = None) -> dict[str, Path]:
    """The four required files; the file data.item_feature names (relative to raw_dir) or, when it is
    null, item_feature.parquet if it is in raw_dir; and the file data.item_emb names (``item_emb``: the
    setting, a {file, column} dict, or None) when it is set."""
    files = {split: raw_dir / f"{split}.parquet" for split in SPLITS}
    files["item_info"] = raw_dir / ITEM_FILE
    if item_feature is not None or (raw_dir / ITEM_FEATURE_FILE).exists():
        files["item_feature"] = raw_dir / (item_feature or ITEM_FEATURE_FILE)
    if item_emb is not None:
        files["item_emb"] = raw_dir / item_emb["file"]
    return files


def content_hash(path: Path) -> str:
    """BLAKE2b of the file's bytes (0.73 s for the full preset's 591 MB of raw files, page-cached)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def raw_records(raw_dir: Path, known: dict | None = None, item_emb: dict | None = None,
                item_feature: str | None = None) -> dict[str, dict]:
    """Per input file (input_files): size, mtime and content hash. With ``known`` (a processed
    folder's record) a file whose size and mtime are unchanged keeps its recorded hash unread (the
    later stages' cheap check); without it every file is hashed (preprocess: an edit that restored
    the mtime is still seen)."""
    records = {}
    settings = {"item_emb": "data.item_emb.file", "item_feature": "data.item_feature"}
    for name, path in input_files(Path(raw_dir), item_emb, item_feature).items():
        note = ""
        if name in settings:
            note = f" (named by {settings[name]}, relative to data.raw_dir"
            up = Path(raw_dir).parent / path.name
            # the download keeps item_emb.parquet and item_feature.parquet one folder above the four files
            note += f"; {up} is there: ../{path.name})" if not path.exists() and up.is_file() else ")"
        common.require_file(path, note=note)
        stat = path.stat()
        old = (known or {}).get(name) or {}
        same = old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns
        records[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "blake2b": old["blake2b"] if same and "blake2b" in old else content_hash(path)}
    return records


def fingerprint_of(records: dict[str, dict], data: dict) -> str:
    """What the processed folder depends on: every input's content (adding or removing the optional
    item_feature.parquet changes it too) and the settings that change the output. No path and no
    time: a moved or copied checkout, a work folder attached at another path, the same files
    copied to another node all give the same fingerprint, and their finished runs stay valid.
    An optional setting left null adds nothing: the fingerprint of a folder built before it existed."""
    return common.config_hash({"format_version": FORMAT_VERSION,
                               "files": {name: [r["size"], r["blake2b"]] for name, r in sorted(records.items())},
                               **{key: data[key] for key in BUILD_SETTINGS},
                               **{key: data[key] for key in OPTIONAL_SETTINGS if data.get(key) is not None}})


def raw_files_changed(manifest: dict, raw_dir: str | os.PathLike) -> list[str] | None:
    """None when the files at ``raw_dir`` are those the processed folder was built from (or are gone:
    there is nothing to compare with); else what differs, e.g. ["train.parquet changed"]. Files whose
    size and mtime match the folder's record are not read again."""
    data = {key: manifest.get(key) for key in BUILD_SETTINGS + OPTIONAL_SETTINGS}
    try:
        records = raw_records(Path(raw_dir), known=manifest.get("raw_files"), item_emb=data["item_emb"],
                              item_feature=data["item_feature"])
    except common.UserError:
        return None
    if fingerprint_of(records, data) == manifest.get("fingerprint"):
        return None
    known = manifest.get("raw_files") or {}
    paths = input_files(Path(raw_dir), data["item_emb"], data["item_feature"])

    def content(record: dict | None) -> list | None:
        return None if record is None else [record.get("size"), record.get("blake2b")]
    changes = [f"{paths[name].name if name in paths else name} "
               f"{'added' if name not in known else 'removed' if name not in records else 'changed'}"
               for name in sorted(set(known) | set(records)) if content(known.get(name)) != content(records.get(name))]
    return changes or ["the processed folder's record of them is incomplete"]


def require_current(processed: Path, manifest: dict, raw_dir: str | os.PathLike) -> None:
    """A UserError if the raw files at ``raw_dir`` are not those ``processed`` was built from:
    whatever was made from it (runs, blend) describes other data."""
    changes = raw_files_changed(manifest, raw_dir)
    if changes:
        raise common.UserError(f"{processed}: the raw files in {raw_dir} are not those it was built from "
                               f"({', '.join(changes)} since it was built): rerun src/preprocess.py, then "
                               f"retrain the runs")


# the data settings a processed folder is built with, which every later stage must share
BUILD_SETTINGS = ("n_folds", "fold_seed", "emb_dtype")
# the same, for settings added later whose null default builds what the repo built before them: a
# manifest without the key means null, and a null one is left out of the fingerprint and the
# manifest, so folders (and the runs made from them) built before the key existed stay current
OPTIONAL_SETTINGS = ("item_emb", "item_feature")


def setting_text(value) -> str:
    """A data setting as a --set value parses it back (YAML: null, a {key: value} mapping)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {setting_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str) and not reads_back(value):  # a folder named 2025, null or '[old] raw'
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def reads_back(text: str) -> bool:
    try:
        return common.override_value("", text) == text
    except common.UserError:
        return False


def data_set_args(data: dict, keys) -> str:
    """The shell words `--set data.KEY=VALUE ...` that give a stage these data settings back."""
    return " ".join(f"--set {shlex.quote(f'data.{key}={setting_text(data[key])}')}" for key in keys)


def preprocess_command(data: dict) -> str:
    keys = ("raw_dir", "work_dir", *BUILD_SETTINGS, *(k for k in OPTIONAL_SETTINGS if data.get(k) is not None))
    return f"python src/preprocess.py --config configs/data.yaml {data_set_args(data, keys)}"


def load_current(cfg: dict) -> tuple[Path, dict, dict]:
    """(folder, arrays, manifest) of the processed data the config's data section describes.

    For the stages after preprocessing (train, bench, blend, summary), which never build or rebuild
    it: a missing folder, one built with other fold, dtype or item_emb settings, or one whose raw files
    changed since is a one-line error naming the command to run, so a stage can never make another
    model's finished runs stale behind the user's back.
    """
    data = checked_data(cfg)
    processed = common.data_paths(cfg)["processed"]
    if not (processed / "manifest.json").is_file():
        raise common.UserError(f"{processed}: no processed data yet: run `{preprocess_command(data)}` first")
    arrays, manifest = load_processed(processed)
    for key in BUILD_SETTINGS + OPTIONAL_SETTINGS:
        if manifest.get(key) != data[key]:
            built, says = setting_text(manifest.get(key)), setting_text(data[key])
            raise common.UserError(
                f"{processed}: built with data.{key}={built}, the config says {says}: "
                f"pass --set {shlex.quote(f'data.{key}={built}')}, or rebuild with `{preprocess_command(data)}` "
                f"(runs trained on the old folders must then be retrained)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise common.UserError(f"{processed}: written by another version of src/preprocess.py (format "
                               f"{manifest.get('format_version')}, this one writes {FORMAT_VERSION}): "
                               f"rebuild with `{preprocess_command(data)}`")
    require_current(processed, manifest, data["raw_dir"])
    return processed, arrays, manifest


@dataclass(kw_only=True)
class ItemEmbSource:
    """data.item_emb: the items' multimodal vectors from ``column`` of ``file`` (relative to
    data.raw_dir: the download keeps item_emb.parquet one folder above the four files, ../item_emb.parquet;
    keyed by item_id, a row for the padding item 0 all zero if any) instead of item_info's item_emb_d128."""
    file: str = field(default=ITEM_EMB_FILE, metadata={"nonempty": True})
    column: str = field(metadata={"nonempty": True})  # e.g. item_emb_d128_v3 (Gavin113's choice)


@dataclass
class DataConfig:
    """The data: section (configs/data.yaml), which every stage shares."""
    raw_dir: str                      # train/valid/test/item_info.parquet, real or synthetic
    work_dir: str                     # processed arrays, runs and blends for this dataset
    # stratified folds over train, for OOF predictions; train_fold.npy holds them as int8
    n_folds: int = field(default=3, metadata={"min": 2, "max": 127})
    fold_seed: int = field(default=20242025, metadata={"min": 0})  # numpy seeds are non-negative
    emb_dtype: EmbDtype = "float32"   # float16 halves the multimodal table in memory
    item_emb: ItemEmbSource | None = None  # null: item_info's item_emb_d128
    # the items' own levels: null reads item_feature.parquet when it is in raw_dir; a file relative to
    # raw_dir (the download keeps it one folder above: ../item_feature.parquet) must be there
    item_feature: str | None = field(default=None, metadata={"nonempty": True})


def checked_data(cfg: dict) -> dict:
    """The data section type-checked and completed with the defaults, as a dict."""
    return asdict(common.typed_section(DataConfig, cfg.get("data"), "data"))



def load_processed(processed_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Every processed array, memory-mapped, keyed by file stem; plus the manifest.

    The maps are copy-on-write (mode "c"): torch can wrap them without a copy, and a write by
    mistake changes this process's view only, never the files.
    """
    processed_dir = Path(processed_dir)
    manifest_path = processed_dir / "manifest.json"
    if not manifest_path.is_file():
        raise common.UserError(f"{processed_dir}: no processed data here (run src/preprocess.py first)")
    manifest = common.read_json(manifest_path)
    rebuild = "rebuild it with src/preprocess.py --force"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("n_rows"), dict):
        raise common.UserError(f"{manifest_path}: not a manifest written by src/preprocess.py; {rebuild}")
    arrays = {}
    for path in sorted(processed_dir.glob("*.npy")):
        try:
            arrays[path.stem] = np.load(path, mmap_mode="c")
        except (OSError, ValueError) as exc:
            raise common.UserError(f"{path}: not a readable .npy file ({common.first_line(exc)}); "
                                   f"{rebuild}") from None
    expected_rows = {f"{split}_{name}": n_rows for split, n_rows in manifest["n_rows"].items()
                     for name in ROW_ARRAYS.get(split, ())}
    expected_rows.update({name: (manifest.get("vocab") or {}).get("item") for name in ITEM_ARRAYS})
    for name, n_rows in expected_rows.items():
        array = arrays.get(name)
        if array is None or array.shape[:1] != (n_rows,):
            found = "missing" if array is None else f"shape {array.shape}"
            raise common.UserError(f"{processed_dir / name}.npy: {found}, the manifest says {n_rows} rows; "
                                   f"{rebuild}")
    return arrays, manifest
