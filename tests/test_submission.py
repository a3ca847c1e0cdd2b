"""The submission: the validator on every kind of bad file, the zip layout the blend writes, and
local scoring against the tiny synthetic oracle (or its absence on real data).

Robustness: malformed submissions (byte-order marks, separators, ID and number formats, zip
layouts) are rejected and well-formed variants accepted, validate reads the raw test IDs only when
they are sound (on the shared `pipeline`, conftest), and a failed write keeps the previous pair."""
import errno
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr import common
from mmctr import score
from mmctr import submission
from mmctr.common import UserError
from mmctr.submission import validate_submission
from helpers import assert_user_error, replace_column, restored, run_script, snapshot

SRC = Path(__file__).resolve().parent.parent / "src"
IDS = np.arange(20)
GOOD_ROWS = [(str(i), f"{i / 19:.4f}") for i in IDS]


def csv_text(rows=GOOD_ROWS, header="ID,Task2") -> str:
    return header + "\n" + "".join(",".join(row) + "\n" for row in rows)


def with_row(index: int, row: tuple) -> list:
    rows = list(GOOD_ROWS)
    rows[index] = row
    return rows


def write_csv(folder: Path, text: str, name: str = "prediction.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def write_zip(folder: Path, members: dict[str, str], name: str = "submission.zip") -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in members.items():
            archive.writestr(member, text)
    return path


def test_good_csv_zip_and_table_pass(tmp_path):
    validate_submission(write_csv(tmp_path, csv_text()), IDS, "Task2")
    validate_submission(write_zip(tmp_path, {"prediction.csv": csv_text()}), IDS, "Task2")
    validate_submission(pd.DataFrame({"ID": IDS, "Task2": np.linspace(0, 1, len(IDS))}), IDS, "Task2")
    validate_submission(write_csv(tmp_path, csv_text(header="ID,ctr")), IDS, "ctr")


BAD_CSVS = {
    "missing ID column": (csv_text(header="id,Task2"), "missing column 'ID'"),
    "wrong prediction column": (csv_text(header="ID,pred"), "missing column 'Task2' (found: ID, pred"),
    "extra column": (csv_text([row + ("1",) for row in GOOD_ROWS], header="ID,Task2,extra"),
                     "unexpected column(s) extra"),
    # a leaderboard that reads by position would take the IDs for the predictions
    "swapped columns": (csv_text([(p, i) for i, p in GOOD_ROWS], header="Task2,ID"),
                        "columns in the order Task2,ID, expected ID,Task2"),
    "duplicated ID": (csv_text(with_row(5, ("4", "0.5"))), "1 duplicated IDs (first: ID 4 again at line 7)"),
    "missing row": (csv_text(GOOD_ROWS[:-1]),
                    "19 rows, expected 20 (one per test row); 1 test IDs missing (first: ID 19)"),
    "extra row": (csv_text(GOOD_ROWS + [("19", "0.5")]), "duplicated IDs"),
    "unknown ID": (csv_text(with_row(3, ("20", "0.5"))), "1 IDs are not test IDs (first: ID 20 at line 5)"),
    "empty value": (csv_text(with_row(3, ("3", ""))), "1 values empty or NaN"),
    "NaN value": (csv_text(with_row(3, ("3", "nan"))), "1 values empty or NaN"),
    "infinite value": (csv_text(with_row(3, ("3", "inf"))), "1 values infinite"),
    "value above 1": (csv_text(with_row(3, ("3", "1.5"))), "1 values outside [0, 1] (first: 1.5 at line 5, ID 3)"),
    "value below 0": (csv_text(with_row(3, ("3", "-0.1"))), "outside [0, 1]"),
    # shown as written, not rounded to a value inside the range
    "value just above 1": (csv_text(with_row(3, ("3", "1.0000001"))), "(first: 1.0000001 at line 5, ID 3)"),
    # a name with a line break (a quoted header) or NUL bytes is shown escaped, on one line
    "line break in a column name": (csv_text(header='ID,"Ta\nsk2"'), r"found: ID, 'Ta\nsk2'"),
    "non-numeric value": (csv_text(with_row(3, ("3", "abc"))), "non-numeric value 'abc' at line 5"),
    "non-numeric ID": (csv_text(with_row(3, ("three", "0.5"))), "column 'ID': non-numeric value 'three'"),
    "fractional ID": (csv_text(with_row(3, ("3.5", "0.5"))), "is not an integer ID"),
    "wrong order": (csv_text([GOOD_ROWS[1], GOOD_ROWS[0]] + GOOD_ROWS[2:]), "not in test order"),
    "empty file": ("", "empty file"),
    "header only": (csv_text([]), "0 rows, expected 20"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_bad_csv_is_a_one_line_error(tmp_path, case):
    text, expected = BAD_CSVS[case]
    path = write_csv(tmp_path, text)
    with pytest.raises(UserError) as error:
        validate_submission(path, IDS, "Task2")
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(str(path))


BAD_ZIPS = {
    "nested path": ({"submission/prediction.csv": csv_text()}, "exactly one file, prediction.csv, at its root"),
    "two files": ({"prediction.csv": csv_text(), "notes.txt": "hi"}, "it holds 2: 'prediction.csv', 'notes.txt'"),
    "other name": ({"submission.csv": csv_text()}, "it holds 1: 'submission.csv'"),
    "empty zip": ({}, "it holds 0: nothing"),
    "bad csv inside": ({"prediction.csv": csv_text(with_row(0, ("0", "2")))}, "zip:prediction.csv: column 'Task2'"),
}


@pytest.mark.parametrize("case", list(BAD_ZIPS))
def test_bad_zip_is_a_one_line_error(tmp_path, case):
    members, expected = BAD_ZIPS[case]
    with pytest.raises(UserError) as error:
        validate_submission(write_zip(tmp_path, members), IDS, "Task2")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_unreadable_files_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 this is no zip")
    with pytest.raises(UserError, match="not a readable zip file"):
        validate_submission(garbage, IDS, "Task2")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"ID,Task2\n\xff\xfe\x00\x81,\x90\n")
    with pytest.raises(UserError, match="cannot read as CSV"):
        validate_submission(binary, IDS, "Task2")
    with pytest.raises(UserError, match="file not found"):
        validate_submission(tmp_path / "absent.zip", IDS, "Task2")


def test_write_submission_makes_a_zip_with_exactly_prediction_csv_at_its_root(tmp_path):
    preds = np.random.default_rng(0).random(len(IDS))
    settings = (tmp_path / "out", "mine", "Task2")
    csv_path, zip_path = submission.write_submission(IDS, preds, *settings)
    assert (csv_path, zip_path) == (tmp_path / "out" / "mine.csv", tmp_path / "out" / "mine.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["prediction.csv"]
        assert archive.read("prediction.csv") == csv_path.read_bytes()
    frame = pd.read_csv(csv_path)
    assert list(frame.columns) == ["ID", "Task2"]
    np.testing.assert_array_equal(frame["ID"], IDS)
    np.testing.assert_allclose(frame["Task2"], preds, rtol=1e-11)
    first_bytes = zip_path.read_bytes()
    submission.write_submission(IDS, preds, *settings)
    assert zip_path.read_bytes() == first_bytes  # same predictions, same bytes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.csv", "mine.zip"]  # no temporaries left


def test_an_earlier_submission_of_other_predictions_is_moved_aside_never_overwritten(tmp_path, capsys):
    settings = (tmp_path, "mine", "Task2")
    first = np.linspace(0, 1, len(IDS))
    csv_path, zip_path = submission.write_submission(IDS, first, *settings)
    earlier_zip, earlier_csv = zip_path.read_bytes(), csv_path.read_bytes()
    submission.write_submission(IDS, first[::-1], *settings)
    [aside_zip] = tmp_path.glob("mine.old-*.zip")
    assert aside_zip.read_bytes() == earlier_zip and aside_zip.with_suffix(".csv").read_bytes() == earlier_csv
    assert zip_path.read_bytes() != earlier_zip
    assert f"moved to {aside_zip.with_suffix('')}.*" in capsys.readouterr().out
    submission.write_submission(IDS, first[::-1], *settings)  # the same predictions again: nothing moves
    assert len(list(tmp_path.iterdir())) == 4
    zip_path.unlink()  # a csv alone, of other predictions, is kept too
    earlier_csv = csv_path.read_bytes()
    submission.write_submission(IDS, first, *settings)
    assert [p.read_bytes() for p in tmp_path.glob("mine.old-*.csv") if p != aside_zip.with_suffix(".csv")] == [
        earlier_csv]


def test_a_submission_folder_inside_a_folder_the_stage_replaces_is_refused(tmp_path):
    assert_user_error(lambda: submission.require_outside(tmp_path / "blend" / "subs", tmp_path / "blend"),
                      "blend.submission.dir", "lies inside", "replaces whole")
    assert_user_error(lambda: submission.require_outside(tmp_path / "blend", tmp_path / "blend"), "lies inside")
    submission.require_outside(tmp_path / "submissions", tmp_path / "blend")
    submission.require_outside(tmp_path / "blend2", tmp_path / "blend")


def test_write_submission_refuses_an_invalid_submission(tmp_path):
    with pytest.raises(UserError, match="outside"):
        submission.write_submission(IDS, np.full(len(IDS), 1.5), tmp_path, "bad", "Task2")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the command line and local scoring on the tiny synthetic data (no processed folder: the test
# IDs come from the raw test.parquet)
# ---------------------------------------------------------------------------------------------

def data_cfg(raw_dir: Path, tmp_path: Path) -> dict:
    cfg = common.load_config(common.CONFIG_DIR / "blend.yaml")
    cfg["data"].update(raw_dir=str(raw_dir), work_dir=str(tmp_path / "work"))
    return cfg


def submission_of(tmp_path: Path, preds: np.ndarray, name: str) -> Path:
    return submission.write_submission(np.arange(len(preds)), preds, tmp_path, name, "Task2")[1]


def test_score_of_a_perfect_and_a_random_submission(tiny_raw, tmp_path):
    labels = common.read_test_labels(tiny_raw).astype(np.float64)
    cfg = data_cfg(tiny_raw, tmp_path)
    perfect = score.score_submission(submission_of(tmp_path, labels, "perfect"), cfg, "Task2")
    assert perfect["auc"] == pytest.approx(1.0) and perfect["rows"] == len(labels)
    assert 0.6 < perfect["oracle_auc"] < 1.0
    noise = np.random.default_rng(0).random(len(labels))
    assert abs(score.score_submission(submission_of(tmp_path, noise, "random"), cfg, "Task2")["auc"] - 0.5) < 0.08


def test_score_and_validate_command_lines(tiny_raw, tmp_path):
    labels = common.read_test_labels(tiny_raw).astype(np.float64)
    path = submission_of(tmp_path, labels, "perfect")
    data_sets = ["--set", f"data.raw_dir={tiny_raw}", "--set", f"data.work_dir={tmp_path / 'work'}"]
    scored = run_script("score.py", str(path), *data_sets, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "test AUC    1.000000" in scored.stdout and "oracle AUC" in scored.stdout
    validated = run_script("validate_submission.py", str(path), *data_sets, cwd=tmp_path)
    assert validated.returncode == 0 and validated.stdout.strip() == f"OK: {len(labels)} rows"
    wrong_column = run_script("validate_submission.py", str(path), "--column", "Task1", *data_sets, cwd=tmp_path)
    assert wrong_column.returncode == 2
    assert wrong_column.stderr.startswith("error: ") and "missing column 'Task1'" in wrong_column.stderr
    assert len(wrong_column.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("cfg, column, fragments", [
    ({"data": {"raw_dir": 123, "work_dir": "w"}}, None, ["config: data.raw_dir must be a string, got 123"]),
    ({"data": 5}, None, ["config: data must be a mapping of keys, got 5"]),
    ({"blend": {"submission": 5}}, None, ["config: blend.submission must be a mapping of keys, got 5"]),
    ({"blend": {"submission": {"column": ["a"]}}}, None, ["blend.submission.column must be a string, got ['a']"]),
    ({"blend": {"submission": {"column": "ID"}}}, None, ["blend.submission.column cannot be 'ID'"]),
    ({"blend": {"submission": {"colum": "x"}}}, None, ["unknown key blend.submission.colum"]),
    ({}, "", ["--column must name the prediction column", "got ''"]),
    ({}, "ID", ["--column must name the prediction column", "got 'ID'"]),
])
def test_what_a_submission_is_checked_against_is_type_checked(cfg, column, fragments):
    base = {"data": {"raw_dir": "raw", "work_dir": "work"}}
    assert_user_error(lambda: submission.check_target({**base, **cfg}, column), *fragments)


def test_the_prediction_column_is_the_flag_else_the_config_else_task2():
    base = {"data": {"raw_dir": "raw", "work_dir": "work"}}
    configured = {**base, "blend": {"runs": ["x"], "submission": {"column": "ctr"}}}
    assert submission.check_target(base)[1] == "Task2"
    assert submission.check_target(configured)[1] == "ctr"
    assert submission.check_target(configured, "Task1")[1] == "Task1"
    checked = submission.check_target(base)[0]
    assert checked["data"]["n_folds"] == 3 and checked["data"]["raw_dir"] == "raw"  # the defaults filled in


def test_score_without_an_oracle_says_no_labels(copy_raw, tmp_path):
    raw = copy_raw()
    for path in (raw / "oracle").iterdir():
        path.unlink()
    (raw / "oracle").rmdir()
    n_test = len(pd.read_parquet(raw / "test.parquet", columns=["ID"]))
    path = submission_of(tmp_path, np.full(n_test, 0.25), "real")
    result = run_script("score.py", str(path), "--set", f"data.raw_dir={raw}",
                        "--set", f"data.work_dir={tmp_path / 'work'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no labels" in result.stdout and "AUC" not in result.stdout


# ---------------------------------------------------------------------------------------------
# robustness: the raw test IDs, malformed and well-formed files, a failed write
# ---------------------------------------------------------------------------------------------

def test_validate_reads_the_raw_test_ids_only_when_they_are_sound(pipeline, tmp_path):
    p = pipeline
    cfg = common.load_config(p.blend_yaml, [f"data.work_dir={tmp_path / 'nothing'}"])  # no processed
    np.testing.assert_array_equal(submission.expected_test_ids(cfg), np.arange(600))
    with restored(p.raw):  # the raw file changed after preprocessing: its IDs count, not the stale ones
        table = pq.read_table(p.raw / "test.parquet")
        pq.write_table(table.set_column(table.schema.get_field_index("ID"), "ID",
                                        pa.array(np.arange(600) + 1000, pa.int64())), p.raw / "test.parquet")
        np.testing.assert_array_equal(submission.expected_test_ids(p.blend_cfg), np.arange(600) + 1000)
        without_raw = common.load_config(p.blend_yaml, ["data.raw_dir=/nonexistent/raw"])
        np.testing.assert_array_equal(submission.expected_test_ids(without_raw), np.arange(600))
    with restored(p.raw):
        replace_column(p.raw / "test.parquet", "ID", None)
        assert_user_error(lambda: submission.expected_test_ids(cfg), "test.parquet", "'ID'")
    with restored(p.raw):
        ids = pq.read_table(p.raw / "test.parquet")["ID"].to_pylist()
        replace_column(p.raw / "test.parquet", "ID", pa.array([None] + ids[1:], pa.int64()))
        assert_user_error(lambda: submission.expected_test_ids(cfg), "test.parquet", "1 nulls")


ROWS = "".join(f"{i},{i / 19:.4f}\n" for i in IDS)


def zip_of(members: dict[str, bytes | None]) -> bytes:
    """A zip in memory; a member whose content is None is a directory entry."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if content is None:
                archive.writestr(zipfile.ZipInfo(name), b"")
            else:
                archive.writestr(name, content)
    return buffer.getvalue()


def corrupt_deflate(data: bytes) -> bytes:
    """Garbage in the compressed stream, the directory intact: fails while inflating."""
    data = bytearray(data)
    start = 30 + len("prediction.csv") + 4
    data[start:start + 20] = bytes(range(20))
    return bytes(data)


GOOD = ("ID,Task2\n" + ROWS).encode()
BAD_SUBMISSIONS = {
    # name: (file name, bytes, expected fragment)
    "UTF-8 BOM": ("s.csv", b"\xef\xbb\xbf" + GOOD, "byte-order mark"),
    "UTF-16": ("s.csv", GOOD.decode().encode("utf-16"), "byte-order mark"),
    "space before the header": ("s.csv", b" " + GOOD, "missing column 'ID'"),
    "space after the comma": ("s.csv", GOOD.replace(b"ID,Task2", b"ID, Task2"), "missing column 'Task2'"),
    "lower-case column": ("s.csv", GOOD.replace(b"Task2", b"task2"), "missing column 'Task2'"),
    "semicolons": ("s.csv", GOOD.replace(b",", b";"), "missing column 'ID'"),
    "tabs": ("s.csv", GOOD.replace(b",", b"\t"), "missing column 'ID'"),
    "trailing comma": ("s.csv", GOOD.replace(b"\n", b",\n"), "unexpected column(s) Unnamed: 2"),
    "index column": ("s.csv", pd.DataFrame({"ID": IDS, "Task2": IDS / 19}).to_csv().encode(),
                     "unexpected column(s) Unnamed: 0"),
    "no header": ("s.csv", ROWS.encode(), "missing column 'ID'"),
    "whitespace only": ("s.csv", b"  \n\n", "empty file"),
    "ragged row": ("s.csv", GOOD + b"3,0.5,0.1\n", "cannot read as CSV"),
    "IDs as floats": ("s.csv", ("ID,Task2\n" + "".join(f"{i}.0,0.5\n" for i in IDS)).encode(),
                      "column 'ID': 0.0 at line 2 is not an integer ID (20 such values)"),
    "IDs in exponent form": ("s.csv", ("ID,Task2\n" + "".join(f"{i}e0,0.5\n" for i in IDS)).encode(),
                             "0e0 at line 2 is not an integer ID"),
    "IDs as words": ("s.csv", ("ID,Task2\n" + "".join(f"id{i},0.5\n" for i in IDS)).encode(),
                     "column 'ID': non-numeric value 'id0'"),
    "ID beyond int64": ("s.csv", GOOD.replace(b"\n3,", b"\n99999999999999999999,"),
                        "99999999999999999999 at line 5 is not an integer ID"),
    "predictions as booleans": ("s.csv", ("ID,Task2\n" + "".join(f"{i},True\n" for i in IDS)).encode(),
                                "non-numeric value 'True'"),
    "decimal commas": ("s.csv", ("ID,Task2\n" + "".join(f'{i},"0,5"\n' for i in IDS)).encode(),
                       "non-numeric value '0,5'"),
    "csv named .zip": ("s.zip", GOOD, "not a readable zip file"),
    "empty .zip": ("s.zip", b"", "not a readable zip file"),
    "truncated zip": ("s.zip", zip_of({"prediction.csv": GOOD})[:-30], "not a readable zip file"),
    "corrupt compressed data": ("s.zip", corrupt_deflate(zip_of({"prediction.csv": GOOD * 40})),
                                "cannot read the zip"),
    "zip with a directory entry": ("s.zip", zip_of({"sub/": None, "prediction.csv": GOOD}),
                                   "it holds 2: 'sub/', 'prediction.csv'"),
    "zip holding only a folder": ("s.zip", zip_of({"prediction.csv/": None}), "it holds 1: 'prediction.csv/'"),
    "zip member under ./": ("s.zip", zip_of({"./prediction.csv": GOOD}), "it holds 1: './prediction.csv'"),
    "zip inside the zip": ("s.zip", zip_of({"prediction.csv": zip_of({"prediction.csv": GOOD})}),
                           "cannot read as CSV"),
    "BOM inside the zip": ("s.zip", zip_of({"prediction.csv": b"\xef\xbb\xbf" + GOOD}), "byte-order mark"),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_malformed_submissions_are_rejected(tmp_path, case):
    name, data, expected = BAD_SUBMISSIONS[case]
    path = tmp_path / name
    path.write_bytes(data)
    message = assert_user_error(lambda: submission.validate_submission(path, IDS, "Task2"), expected)
    assert message.startswith(str(path))


@pytest.mark.parametrize("text", [
    GOOD.replace(b"\n", b"\r\n"),              # Windows line ends (the plain file: test_good_csv_zip_and_table_pass)
    GOOD.rstrip(b"\n"),                        # no newline at the end
    b'"ID","Task2"\n' + ROWS.encode(),         # quoted header: the same CSV
    GOOD.replace(b"\n0,0.0000\n", b"\n0,0\n"),  # a plain 0 is a probability too
])
def test_well_formed_variants_are_accepted(tmp_path, text):
    path = tmp_path / "prediction.csv"
    path.write_bytes(text)
    submission.validate_submission(path, IDS, "Task2")
    archive = tmp_path / "submission.zip"
    archive.write_bytes(zip_of({"prediction.csv": text}))
    submission.validate_submission(archive, IDS, "Task2")


def test_a_failed_submission_write_keeps_the_previous_pair(tmp_path, monkeypatch):
    from mmctr import submission
    ids = np.arange(20)
    csv_path, zip_path = submission.write_submission(ids, np.full(20, 0.25), tmp_path, "run")
    before = snapshot(csv_path, zip_path)

    def zip_refused(path, *args, **kwargs):
        if Path(path).name.endswith(".tmp") and ".zip." in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(submission, "validate_submission", zip_refused)
    with pytest.raises(OSError):
        submission.write_submission(ids, np.full(20, 0.75), tmp_path, "run")
    assert snapshot(csv_path, zip_path) == before, "neither file of the pair changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.zip"]
