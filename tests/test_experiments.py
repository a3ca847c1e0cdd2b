"""The experiment log: a row per finished run and blend, none for a resumed run or the same blend
again, concurrent appends that neither interleave nor duplicate, and the leaderboard."""
import csv
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from mmctr import blend
from mmctr import common
from mmctr import experiments
from mmctr import train
from mmctr.common import UserError
from helpers import FAST_LIGHTGBM, FASTEST, TINY


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def fake_row(result_id: str, **values) -> dict:
    return {column: "" for column in experiments.COLUMNS} | {"kind": "train", "name": "run",
                                                             "result_id": result_id} | values


# a long field with commas and quotes: an interleaved write would split or merge lines
LONG = 'blend.runs=[a, "b"]; ' + "x" * 3000


def appender(path, worker: int, n_rows: int, together) -> None:
    for i in range(n_rows):
        experiments.append(path, fake_row(f"{worker}-{i}", overrides=LONG))
        together.wait()  # then every process at once tries to add the same result
        experiments.append(path, fake_row(f"shared-{i}"))


@pytest.mark.slow
def test_concurrent_appends_keep_every_row_whole_and_once(tmp_path):
    path = tmp_path / "work" / experiments.LOG_NAME
    workers, n_rows = 6, 30
    context = multiprocessing.get_context("fork")
    together = context.Barrier(workers)
    processes = [context.Process(target=appender, args=(path, w, n_rows, together)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0

    text = path.read_text()
    assert text.startswith(experiments.HEADER) and text.count(experiments.HEADER) == 1
    rows = read_rows(path)
    ids = [row["result_id"] for row in rows]
    assert sorted(ids) == sorted([f"{w}-{i}" for w in range(workers) for i in range(n_rows)] +
                                 [f"shared-{i}" for i in range(n_rows)])
    assert all(row["overrides"] == LONG for row in rows if not row["result_id"].startswith("shared"))
    assert all(None not in row and len(row) == len(experiments.COLUMNS) for row in rows)


def train_main(monkeypatch, cfg: dict, run_name: str, *extra: str) -> None:
    """src/train.py's command line, in process, on the tiny data."""
    sets = [*TINY, "train.max_epochs=1", f"run.name={run_name}", *(f"data.{key}={'null' if value is None else value}" for key, value in cfg["data"].items())]
    argv = ["train.py", "--config", str(common.CONFIG_DIR / f"{FASTEST}.yaml"), "--device", "cpu", *extra]
    monkeypatch.setattr(sys, "argv", argv + [arg for s in sets for arg in ("--set", s)])
    train.main()


def test_a_finished_run_adds_one_row_and_a_resumed_run_none(tiny_cfg, tiny_processed, monkeypatch, capsys):
    log = experiments.log_path(tiny_cfg)
    before = read_rows(log) if log.is_file() else []
    train_main(monkeypatch, tiny_cfg, "logged", "--folds", "0")  # one fold of two: no result yet
    assert (read_rows(log) if log.is_file() else []) == before

    train_main(monkeypatch, tiny_cfg, "logged")                   # fold 1: the run is finished now
    new = read_rows(log)[len(before):]
    assert len(new) == 1
    [row] = new
    metrics = common.read_json(common.data_paths(tiny_cfg)["runs"] / "logged" / "metrics.json")
    assert row["kind"] == "train" and row["name"] == "logged" and row["folds"] == "2"
    assert float(row["oof_auc"]) == pytest.approx(metrics["oof_auc"], abs=1e-6)
    assert float(row["holdout_auc"]) == pytest.approx(metrics["valid_auc"], abs=1e-6)
    assert 0 < float(row["test_auc"]) < 1 and row["device"] == "cpu"
    assert row["epochs"] == "/".join(str(m["epochs"]) for m in metrics["folds"])
    # the overrides that differ from the config file; run.name does too, the others are its values
    assert "train.max_epochs=1" in row["overrides"] and "run.name=logged" in row["overrides"]
    assert "data.fold_seed" not in row["overrides"]

    train_main(monkeypatch, tiny_cfg, "logged")                   # resumed: every fold is done
    assert "folds [0, 1] already done, skipped" in capsys.readouterr().out
    assert len(read_rows(log)) == len(before) + 1


def test_a_blend_adds_a_row_once_per_result(workspace):
    cfg, _ = workspace
    log = experiments.log_path(cfg)
    overrides = FAST_LIGHTGBM
    for _ in range(2):  # the same blend of the same runs again: no second row
        experiments.record_blend(cfg, blend.run_blend(cfg), common.CONFIG_DIR / "blend.yaml", overrides)
    [row] = read_rows(log)
    assert row["kind"] == "blend" and row["name"].endswith("of good+fair+noise")
    assert row["overrides"] == "blend.lightgbm.n_estimators=60"
    # the submission written elsewhere is the same blend: where it goes is no setting
    elsewhere = str(Path(cfg["data"]["work_dir"]) / "elsewhere")
    moved = {**cfg, "blend": {**cfg["blend"], "submission": {**cfg["blend"].get("submission", {}), "dir": elsewhere}}}
    experiments.record_blend(moved, blend.run_blend(moved), common.CONFIG_DIR / "blend.yaml", overrides)
    assert len(read_rows(log)) == 1

    cfg["blend"].update(methods=["logit_mean"], select="logit_mean")  # other settings: another row
    experiments.record_blend(cfg, blend.run_blend(cfg), common.CONFIG_DIR / "blend.yaml", overrides)
    assert [r["name"] for r in read_rows(log)][1] == "logit_mean of good+fair+noise"


def test_a_half_written_last_line_does_not_swallow_the_next_row(tmp_path):
    path = tmp_path / experiments.LOG_NAME
    path.write_text(experiments.HEADER + "2025-01-01 00:00:00,train,cut")  # a writer died mid-line
    assert experiments.append(path, fake_row("next", name="whole"))
    assert read_rows(path)[-1]["name"] == "whole" and read_rows(path)[-1]["result_id"] == "next"


def test_changed_overrides_list_only_values_that_differ_from_the_file():
    config = common.CONFIG_DIR / "blend.yaml"
    assert experiments.changed_overrides(config, []) == ""
    assert experiments.changed_overrides(config, ["blend.select=auto", "data.n_folds=3"]) == ""  # the file's values
    assert experiments.changed_overrides(config, [
        "blend.runs=[a, b]", "blend.logistic.C=0.5", "blend.logistic.C=1.0", "data.work_dir=/tmp/w"]) == (
        "blend.runs=[a, b]; data.work_dir=/tmp/w")  # C set back to the file's value: not a change


def test_a_log_with_another_header_is_left_alone_with_a_warning(tmp_path, capsys):
    cfg = {"data": {"raw_dir": str(tmp_path / "raw"), "work_dir": str(tmp_path)}}
    log = experiments.log_path(cfg)
    log.write_text("when,what\n1,2\n")
    experiments.record(cfg, lambda: fake_row("x"))
    assert log.read_text() == "when,what\n1,2\n"
    assert f"warning: {log}: experiment row not written (UserError: {log}: first line is not" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"^{log}: first line is not the experiment log's header"):
        experiments.read_log(log)


def test_leaderboard_ranks_by_oof_auc_then_rows_without_one(tmp_path, monkeypatch, capsys):
    path = tmp_path / experiments.LOG_NAME
    for result_id, kind, oof, holdout in (("a", "train", "0.71", "0.70"), ("b", "refit", "", "0.90"),
                                          ("c", "blend", "0.75", "0.72"), ("d", "train", "0.60", "0.65")):
        experiments.append(path, fake_row(result_id, kind=kind, name=result_id, oof_auc=oof, holdout_auc=holdout))
    assert [row["name"] for row in experiments.leaderboard(experiments.read_log(path))] == ["c", "a", "d", "b"]

    # rows with no AUC, an unreadable one or NaN (a hand-edited log) go last and leave the others in order
    rows = [dict(oof_auc=oof, holdout_auc=holdout, name=name) for name, oof, holdout in
            (("a", "", "0.5"), ("b", "", ""), ("c", "", "0.9"), ("d", "", "0.7"), ("e", "nan", ""), ("f", "x", ""))]
    assert [row["name"] for row in experiments.leaderboard(rows)][:3] == ["c", "d", "a"]

    monkeypatch.setattr(sys, "argv", ["experiments.py", str(path)])
    experiments.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["oof_auc", "holdout_auc", "test_auc"]
    assert [line.split()[0] for line in lines[1:4]] == ["0.75", "0.71", "0.60"]
    assert lines[-1] == f"4 experiments in {path}, best OOF AUC first"


def test_git_commit_is_the_checkouts_head_and_empty_outside_a_checkout(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    git = dict(cwd=checkout, check=True, capture_output=True, text=True)
    checkout.mkdir()
    subprocess.run(["git", "init", "-q"], **git)
    (checkout / "a.txt").write_text("a\n")
    subprocess.run(["git", "add", "a.txt"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"], **git)
    head = subprocess.run(["git", "rev-parse", "HEAD"], **git).stdout.strip()
    monkeypatch.setattr(common, "REPO_ROOT", checkout)
    assert experiments.git_commit() == head[:12]
    (checkout / "a.txt").write_text("b\n")  # an uncommitted change to a tracked file
    assert experiments.git_commit() == head[:12] + "-dirty"
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path / "copy")  # e.g. uploaded to a notebook: no .git
    (tmp_path / "copy").mkdir()
    assert experiments.git_commit() == ""
