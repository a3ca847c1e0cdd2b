"""The submission: the validator on every kind of bad file, the zip layout the blend writes, and
local scoring against the tiny synthetic oracle (or its absence on real data)."""
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmctr import common
from mmctr import score
from mmctr import submission
from mmctr.common import UserError
from mmctr.submission import validate_submission
from helpers import run_script

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
