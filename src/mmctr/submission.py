"""The submission format, in one place: what the leaderboard reads, how it is written and checked.

A submission is a zip holding exactly one file, prediction.csv, at its root (a bare csv is checked
the same way) with exactly two columns, ID then the prediction column (Task2 unless configured):
one row per test row in test order (ID ascending), each prediction a probability in [0, 1]. The
expected IDs come from the raw test.parquet, or from the processed test_ID.npy when the raw files are
not at data.raw_dir. Every problem is one line naming the file and the first offending row.

write_submission writes <dir>/<name>.csv and .zip (blend.py, single.py); validate_submission.py is
the command line that checks a file before it is uploaded.
"""
from __future__ import annotations

import codecs
import io
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmctr import common
from mmctr import processed_data
from mmctr.common import UserError, first_line

ID_COLUMN = "ID"
ZIP_MEMBER = "prediction.csv"
DEFAULT_COLUMN = "Task2"


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def _read_csv(source: str | Path | IO[bytes], where: str) -> pd.DataFrame:
    # everything is read as text, so a bad cell can be quoted back exactly as the file has it
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
    except OSError as exc:
        raise UserError(f"{where}: cannot read ({first_line(exc)})") from None
    if data.startswith((codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # pandas would skip a UTF-8 BOM, a plain CSV reader makes it part of the first header
        raise UserError(f"{where}: starts with a byte-order mark (BOM); save it as plain UTF-8 "
                        f"without BOM, header '{ID_COLUMN},<column>'")
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{where}: empty file, expected a header line '{ID_COLUMN},<column>'") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot read as CSV ({first_line(exc)})") from None


def read_submission(path: str | os.PathLike) -> tuple[pd.DataFrame, str]:
    """The submission's table, every cell as text, and where it was read from (for messages).

    A zip must hold exactly one file, prediction.csv, at its root.
    """
    path = Path(path)
    common.require_file(path)
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".zip":
            raise UserError(f"{path}: not a readable zip file")
        return _read_csv(path, str(path)), str(path)
    where = f"{path}:{ZIP_MEMBER}"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if names != [ZIP_MEMBER]:
                held = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
                raise UserError(f"{path}: the zip must hold exactly one file, {ZIP_MEMBER}, at its root "
                                f"(no folder); it holds {len(names)}: {held or 'nothing'}")
            with archive.open(ZIP_MEMBER) as member:
                return _read_csv(member, where), where
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, zlib.error,
            EOFError) as exc:
        raise UserError(f"{path}: cannot read the zip ({first_line(exc)})") from None


def expected_test_ids(cfg: dict) -> np.ndarray:
    """The test IDs a submission must cover: the raw test.parquet's, the rows the leaderboard scores
    (so predictions made from stale processed data fail here), else the processed test_ID.npy."""
    paths = common.data_paths(cfg)
    raw_test = paths["raw"] / "test.parquet"
    processed_ids = paths["processed"] / "test_ID.npy"
    if raw_test.is_file():
        try:
            table = pq.read_table(raw_test, columns=[ID_COLUMN])
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise UserError(f"{raw_test}: cannot read column '{ID_COLUMN}' ({first_line(exc)})") from None
        ids = table.column(ID_COLUMN)
        if ids.null_count or not pa.types.is_integer(ids.type):
            raise UserError(f"{raw_test}: column '{ID_COLUMN}': expected integer IDs without nulls, found "
                            f"{ids.type} with {ids.null_count} nulls")
        return ids.to_numpy().astype(np.int64)
    if processed_ids.is_file():
        try:
            return np.load(processed_ids).astype(np.int64)
        except (OSError, ValueError) as exc:
            raise UserError(f"{processed_ids}: not a readable .npy file ({first_line(exc)}); rebuild it "
                            f"with src/preprocess.py --force") from None
    raise UserError(f"no test IDs to check against: neither {raw_test} nor {processed_ids} exists "
                    f"(set data.raw_dir to the folder holding test.parquet, e.g. --set data.raw_dir=data/MicroLens_1M_x1)")


@dataclass
class SubmissionConfig:
    """blend.submission: where the submissions go, <dir>/<name>-blend.* (src/blend.py) and
    <dir>/<name>-single-<run>.* (src/single.py), each a .csv and a .zip, predictions in column <column>."""
    dir: str = field(default="submissions", metadata={"nonempty": True})
    name: str = "submission"
    column: str = field(default=DEFAULT_COLUMN, metadata={"nonempty": True})

    def __post_init__(self):
        if self.column == ID_COLUMN:
            raise UserError(f"config: blend.submission.column cannot be '{ID_COLUMN}' (that column holds the IDs)")


def check_target(cfg: dict, column: str | None = None) -> tuple[dict, str]:
    """What validate_submission.py and score.py check a file against, from the config they read:
    (``cfg`` with its data section type-checked, the prediction column: ``column`` (--column) when
    given, else blend.submission.column, type-checked, else Task2)."""
    checked = {**cfg, "data": processed_data.checked_data(cfg)}
    if column is None:
        blend = cfg.get("blend") or {}
        if not isinstance(blend, dict):
            raise UserError(f"config: blend must be a mapping of keys, got {blend!r}")
        return checked, common.typed_section(SubmissionConfig, blend.get("submission", {}), "blend.submission").column
    if not column.strip() or column == ID_COLUMN:
        raise UserError(f"--column must name the prediction column (not empty, not '{ID_COLUMN}'), got {column!r}")
    return checked, column


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------

def _numbers(frame: pd.DataFrame, column: str, where: str, locate) -> np.ndarray:
    """The column as float64; text that is not a number is an error, empty or 'nan' becomes NaN."""
    values = frame[column]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(np.float64)
    text = values.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)
    not_numbers = np.flatnonzero(np.isnan(numbers) & ~text.str.lower().isin(["", "nan"]).to_numpy())
    if len(not_numbers):
        first = not_numbers[0]
        raise UserError(f"{where}: column '{column}': non-numeric value {text.iloc[first]!r} at "
                        f"{locate(first)} ({len(not_numbers)} such values)")
    return numbers


def checked_predictions(frame: pd.DataFrame, expected_ids: np.ndarray, column: str,
                        where: str = "submission", from_file: bool = False) -> np.ndarray:
    """The predictions as float64 in test order, or a one-line UserError naming the first problem."""
    # a file's problems are located by line (the header is line 1), a table's by row position
    locate = (lambda i: f"line {i + 2}") if from_file else (lambda i: f"row {i}")
    found = [str(name) for name in frame.columns]
    # a name with a line break or NUL bytes (a UTF-16 file) shown escaped: the error stays one line
    shown = [name if name.isprintable() else repr(name) for name in found]
    for name in (ID_COLUMN, column):
        if name not in found:
            raise UserError(f"{where}: missing column '{name}' (found: {', '.join(shown) or 'none'}; "
                            f"expected exactly {ID_COLUMN},{column})")
    extra = [text for name, text in zip(found, shown) if name not in (ID_COLUMN, column)]
    if extra:
        raise UserError(f"{where}: unexpected column(s) {', '.join(extra)} "
                        f"(expected exactly {ID_COLUMN},{column})")
    if found != [ID_COLUMN, column]:  # a reader that goes by position would score the IDs
        raise UserError(f"{where}: columns in the order {','.join(shown)}, expected {ID_COLUMN},{column}")

    ids = _numbers(frame, ID_COLUMN, where, locate)
    not_integer = ~np.isfinite(ids) | (ids != np.round(ids)) | (np.abs(ids) >= 2.0**63)
    if not pd.api.types.is_numeric_dtype(frame[ID_COLUMN]):
        # a file holds IDs as integer literals: 3.0 or 3e0 is a float that happens to be whole
        not_integer |= ~frame[ID_COLUMN].astype(str).str.strip().str.fullmatch(r"[+-]?\d+").to_numpy()
    bad = np.flatnonzero(not_integer)
    if len(bad):
        text = str(frame[ID_COLUMN].iloc[bad[0]]).strip()
        raise UserError(f"{where}: column '{ID_COLUMN}': {text} at {locate(bad[0])} is not an "
                        f"integer ID ({len(bad)} such values)")
    preds = _numbers(frame, column, where, locate)
    for problem, bad in (("empty or NaN", np.isnan(preds)),
                         ("infinite", np.isinf(preds)),
                         ("outside [0, 1]", np.isfinite(preds) & ((preds < 0) | (preds > 1)))):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where}: column '{column}': {int(bad.sum())} values {problem} (first: "
                            f"{float(preds[first])!r} at {locate(first)}, ID {ids[first]:.0f}); predictions "
                            f"must be probabilities in [0, 1]")

    ids = ids.astype(np.int64)
    duplicated = pd.Series(ids).duplicated().to_numpy()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated)[0])
        raise UserError(f"{where}: column '{ID_COLUMN}': {int(duplicated.sum())} duplicated IDs (first: "
                        f"ID {ids[first]} again at {locate(first)})")
    unknown = ~np.isin(ids, expected_ids)
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        raise UserError(f"{where}: column '{ID_COLUMN}': {int(unknown.sum())} IDs are not test IDs "
                        f"(first: ID {ids[first]} at {locate(first)})")
    if len(ids) != len(expected_ids):
        missing = expected_ids[~np.isin(expected_ids, ids)]
        raise UserError(f"{where}: {len(ids)} rows, expected {len(expected_ids)} (one per test row); "
                        f"{len(missing)} test IDs missing (first: ID {missing[0]})")
    misplaced = np.flatnonzero(ids != expected_ids)
    if len(misplaced):
        first = misplaced[0]
        raise UserError(f"{where}: rows are not in test order (ID ascending): {locate(first)} has ID "
                        f"{ids[first]}, expected {expected_ids[first]}")
    return preds


def validate_submission(submission: str | os.PathLike | pd.DataFrame, expected_ids: np.ndarray,
                        column: str = DEFAULT_COLUMN) -> None:
    """Raise a one-line UserError unless ``submission`` (a csv/zip path or a table) is uploadable."""
    if isinstance(submission, pd.DataFrame):
        checked_predictions(submission, np.asarray(expected_ids), column)
    else:
        frame, where = read_submission(submission)
        checked_predictions(frame, np.asarray(expected_ids), column, where=where, from_file=True)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def submission_paths(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    return Path(folder) / f"{name}.csv", Path(folder) / f"{name}.zip"


def write_submission(test_ids: np.ndarray, preds: np.ndarray, folder: str | os.PathLike, name: str,
                     column: str = DEFAULT_COLUMN) -> tuple[Path, Path]:
    """<folder>/<name>.csv and .zip (prediction.csv at its root): both written and validated first,
    then renamed into place one after the other, so the pair never mixes two writes' predictions
    (short of a kill in the microseconds between the two renames)."""
    # 12 significant digits: far finer than the float32 predictions the runs make, so rounding adds
    # practically no ties
    text = pd.DataFrame({ID_COLUMN: test_ids, column: preds}).to_csv(index=False, float_format="%.12g")
    csv_path, zip_path = submission_paths(folder, name)
    with common.atomic_path(csv_path) as csv_tmp, common.atomic_path(zip_path) as zip_tmp:
        csv_tmp.write_text(text)
        validate_submission(csv_tmp, test_ids, column)
        # a fixed timestamp: the same predictions give the same zip bytes
        member = zipfile.ZipInfo(ZIP_MEMBER, date_time=(2025, 1, 1, 0, 0, 0))
        member.compress_type = zipfile.ZIP_DEFLATED
        member.external_attr = 0o644 << 16
        with zipfile.ZipFile(zip_tmp, "w") as archive:
            archive.writestr(member, text)
        validate_submission(zip_tmp, test_ids, column)
        keep_earlier_submission({zip_path: zip_tmp.read_bytes(), csv_path: csv_tmp.read_bytes()})
    return csv_path, zip_path


def require_outside(folder: str | os.PathLike, replaced: Path) -> None:
    """blend.submission.dir must not lie inside a folder its stage replaces whole once written
    (work_dir/blend, work_dir/single): the swap would delete the submission it had just written."""
    if Path(folder).resolve().is_relative_to(Path(replaced).resolve()):
        raise UserError(f"config: blend.submission.dir {folder} lies inside {replaced}, which this stage "
                        f"replaces whole: choose a folder outside it")


def keep_earlier_submission(new: dict[Path, bytes]) -> None:
    """A submission of other predictions at the pair's paths (``new``: path -> the bytes about to be
    written there) is a user's earlier result: what is there is moved aside (<name>.old-<time>.zip
    and .csv), never overwritten. The same predictions give the same bytes, so a rerun that changes
    nothing moves nothing."""
    there = [path for path in new if path.is_file()]
    if all(path.read_bytes() == new[path] for path in there):
        return
    aside = common.aside_path(next(path for path in new if path.suffix == ".zip"))
    for path in there:
        path.replace(aside.with_suffix(path.suffix))
    common.log(f"{', '.join(map(str, there))}: the earlier submission there has other predictions: moved to "
               f"{aside.with_suffix('')}.*, delete that when no longer needed")
