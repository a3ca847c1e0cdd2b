"""The experiment log {work_dir}/experiments.csv, one row per finished training run, refit and blend,
and its leaderboard:

    python src/experiments.py [data/work/demo/experiments.csv]   # default: {data.work_dir} of --config/--set

src/train.py, src/blend.py and src/tune.py (kind folds: a trial's folds) append a row when they
finish: when it ran, what (kind, name, the
config hash, the --set overrides whose value differs from the config file, the git commit), how
(folds, epochs per fold, seconds, device) and how well (OOF, valid-holdout and, on synthetic data,
test AUC). A row's result_id names the result it describes: the hash of a run's metrics.json, of a
refit's done.json, or of a blend's settings and predictions. A command that changes nothing (a
resumed run whose folds were all done, the same blend again) finds its result_id in the log and adds
no row. An append holds an exclusive lock (flock) on the log for its read, check and write, and
writes the row with one os.write on an O_APPEND descriptor, so concurrent runs neither interleave
nor duplicate rows. The log is a record of results already written: a problem with it is one
warning line, never a failed run.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import io
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from mmctr import common
from mmctr import runs
from mmctr.common import UserError
from mmctr.runs import hidden_test_auc

LOG_NAME = "experiments.csv"
COLUMNS = ("time", "kind", "name", "config_hash", "overrides", "git_commit", "folds", "epochs", "oof_auc",
           "holdout_auc", "test_auc", "seconds", "device", "data_fingerprint", "result_id")


def log_path(cfg: dict) -> Path:
    return common.data_paths(cfg)["work"] / LOG_NAME


# ---------------------------------------------------------------------------------------------
# the row's fields
# ---------------------------------------------------------------------------------------------

def git_commit() -> str:
    """HEAD of the checkout the code runs from (-dirty with uncommitted changes to tracked files),
    or '' when the code is not a git checkout of its own (e.g. uploaded to a Kaggle notebook)."""
    # GIT_OPTIONAL_LOCKS=0: git status must not take the index lock a concurrent git commit needs
    git = dict(cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=10,
               env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], **git)
        lines = head.stdout.split()
        if head.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != common.REPO_ROOT.resolve():
            return ""
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git)
    except (OSError, subprocess.SubprocessError):  # no git at all
        return ""
    return lines[1][:12] + ("-dirty" if status.stdout.strip() else "")


def value_text(value) -> str:
    """A config value as --set takes it back (YAML flow style: [a, b], 0.001, true)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def changed_overrides(config_file: str | os.PathLike, overrides: list[str]) -> str:
    """The --set overrides whose value differs from the config file's, as 'key=value; ...'."""
    if not overrides:
        return ""
    base, final = common.load_config(config_file), common.load_config(config_file, overrides)

    def lookup(cfg: dict, key: str):
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return cfg

    keys = dict.fromkeys(assignment.split("=", 1)[0].strip() for assignment in overrides)  # in order, once
    return "; ".join(f"{key}={value_text(lookup(final, key))}" for key in keys
                     if lookup(final, key) != lookup(base, key))


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def auc_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def run_row(cfg: dict, config_file, overrides: list[str], refit: bool, folds: list[int] | None = None) -> dict | None:
    """The row of the run named by ``cfg`` (its refit with ``refit``; with ``folds``, those folds
    alone, e.g. a tuning trial's fold 0), or None if it is not finished."""
    run = runs.run_dir(cfg)
    fingerprint = runs.read_fingerprint(run) or {}
    labels = common.read_test_labels(common.data_paths(cfg)["raw"])
    if refit:
        if not runs.fold_done(run, runs.REFIT):
            return None
        done_path = runs.fold_dir(run, runs.REFIT) / "done.json"
        done = runs.fold_metrics(run, runs.REFIT)
        row = dict(kind="refit", folds="", epochs=str(done["epochs"]), oof_auc="",
                   holdout_auc=auc_cell(done["valid_auc"]),
                   test_auc=auc_cell(hidden_test_auc(done_path.parent / "test.parquet", labels)),
                   seconds=f"{done['seconds']:.1f}", device=done.get("device", ""), result_id=file_hash(done_path))
    elif folds is not None:  # some folds only: their holdout and test means, no OOF
        if not folds or not all(runs.fold_done(run, k) for k in folds):
            return None
        done = [runs.fold_metrics(run, k) for k in folds]
        done_paths = [runs.fold_dir(run, k) / "done.json" for k in folds]
        valid = float(np.mean([d["valid_auc"] for d in done]))
        tests = [hidden_test_auc(p.parent / "test.parquet", labels) for p in done_paths]
        row = dict(kind="folds", folds=",".join(map(str, folds)), epochs="/".join(str(d["epochs"]) for d in done),
                   oof_auc="", holdout_auc=auc_cell(valid),
                   test_auc=auc_cell(None if None in tests else float(np.mean(tests))),
                   seconds=f"{sum(d['seconds'] for d in done):.1f}",
                   device=",".join(sorted({d.get("device", "") for d in done})),
                   result_id=common.config_hash([file_hash(p) for p in done_paths]))
    else:
        metrics_path = run / "metrics.json"
        if not metrics_path.is_file():  # some folds still to train (--folds): no result yet
            return None
        metrics = runs.read_metrics(run)
        row = dict(kind="train", folds=str(metrics["n_folds"]),
                   epochs="/".join(str(m["epochs"]) for m in metrics["folds"]),
                   oof_auc=auc_cell(metrics["oof_auc"]), holdout_auc=auc_cell(metrics["valid_auc"]),
                   test_auc=auc_cell(hidden_test_auc(run / "test.parquet", labels)), seconds=f"{metrics['seconds']:.1f}",
                   device=",".join(sorted({m.get("device", "") for m in metrics["folds"]})),
                   result_id=file_hash(metrics_path))
    return dict(row, name=run.name, config_hash=fingerprint.get("config_hash", ""),
                overrides=changed_overrides(config_file, overrides),
                data_fingerprint=fingerprint.get("data_fingerprint", ""))


def blend_row(cfg: dict, metrics: dict, config_file, overrides: list[str]) -> dict:
    """The row of a finished blend (``metrics``: its metrics.json)."""
    paths = common.data_paths(cfg)
    blend_dir = paths["work"] / "blend"
    names = list(metrics["runs"])
    # the same settings and the same predictions (deterministic: the same runs) are the same result
    predictions = [file_hash(blend_dir / f"{split}.parquet") for split in runs.SPLITS]
    data_fingerprint = (runs.read_fingerprint(runs.run_dir(cfg, names[0])) or {}).get("data_fingerprint", "")
    labels = common.read_test_labels(paths["raw"])
    # where the submission files go is no setting of the blend (a copied or moved folder, a relative path)
    settings = {**cfg["blend"], "submission": {k: v for k, v in (cfg["blend"].get("submission") or {}).items()
                                               if k != "dir"}}
    return dict(kind="blend", name=f"{metrics['chosen']} of {'+'.join(names)}",
                config_hash=common.config_hash(settings), overrides=changed_overrides(config_file, overrides),
                folds=str(metrics["n_folds"]), epochs="", oof_auc=auc_cell(metrics["chosen_oof_auc"]),
                holdout_auc=auc_cell(metrics["chosen_valid_auc"]),
                test_auc=auc_cell(hidden_test_auc(blend_dir / "test.parquet", labels)),
                seconds=f"{metrics['seconds']:.1f}", device="cpu", data_fingerprint=data_fingerprint,
                result_id=common.config_hash({"blend": settings, "predictions": predictions}))


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------

def csv_line(values) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue()


HEADER = csv_line(COLUMNS)


def parse_log(path: Path, text: str) -> list[dict]:
    """The rows of the log's ``text``; a header other than COLUMNS is a one-line UserError."""
    if not text:
        return []
    if not text.startswith(HEADER):
        raise UserError(f"{path}: first line is not the experiment log's header ({HEADER.strip()}); move the "
                        f"file away to start a new log")
    return list(csv.DictReader(io.StringIO(text)))


def append(path: Path, row: dict) -> bool:
    """Append ``row`` (COLUMNS' keys; time is filled in) unless the log holds its result_id already.
    True when it was appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # read, check and write as one step against every other process
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", errors="replace")
        if any(r.get("result_id") == row["result_id"] for r in parse_log(path, text)):
            return False
        row = dict(row, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        # one write of whole lines, the header with the first row: O_APPEND puts it at the end (after a
        # line break if a crashed writer, e.g. on a full disk, left half a line)
        start = HEADER if not text else "" if text.endswith("\n") else "\n"
        data = (start + csv_line(row[c] for c in COLUMNS)).encode()
        if os.write(fd, data) != len(data):
            raise OSError(f"{path}: short write (disk full?)")
        return True
    finally:
        os.close(fd)  # and with it the lock


def record(cfg: dict, make_row, *args) -> None:
    """Append ``make_row(*args)`` (None: nothing to record) to the log of ``cfg``'s work folder."""
    path = log_path(cfg)
    try:
        row = make_row(*args)
        if row is not None and append(path, dict(row, git_commit=git_commit())):
            common.log(f"experiment log: {row['kind']} {row['name']} added to {path}")
    except Exception as exc:  # noqa: BLE001: the results are written; a log problem must not fail the run
        common.log(f"warning: {path}: experiment row not written ({type(exc).__name__}: {common.first_line(exc)})")


def record_run(cfg: dict, config_file, overrides: list[str], refit: bool = False,
               folds: list[int] | None = None) -> None:
    record(cfg, run_row, cfg, config_file, overrides, refit, folds)


def record_blend(cfg: dict, metrics: dict, config_file, overrides: list[str]) -> None:
    record(cfg, blend_row, cfg, metrics, config_file, overrides)


# ---------------------------------------------------------------------------------------------
# the leaderboard
# ---------------------------------------------------------------------------------------------

def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no experiment log yet (src/train.py and src/blend.py write it)")
    try:
        return parse_log(path, path.read_text())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable experiment log ({common.first_line(exc)})") from None


def leaderboard(rows: list[dict]) -> list[dict]:
    """Best OOF AUC first; rows without one (refits) after them, by holdout AUC."""
    def auc(text: str) -> float:
        try:
            value = float(text)
        except ValueError:  # empty, or a hand-edited cell
            return float("-inf")
        return float("-inf") if math.isnan(value) else value  # a NaN key leaves sorted()'s order undefined

    def key(row):
        oof = auc(row["oof_auc"])
        return (True, oof) if oof > float("-inf") else (False, auc(row["holdout_auc"]))
    return sorted(rows, key=key, reverse=True)


SHOWN = ("oof_auc", "holdout_auc", "test_auc", "kind", "name", "folds", "epochs", "seconds", "device", "time",
         "git_commit", "config_hash", "overrides")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", nargs="?", help=f"the log (default: {{data.work_dir}}/{LOG_NAME} of the config)")
    common.add_config_args(parser, "data.yaml")
    args = parser.parse_args(argv)
    path = Path(args.log) if args.log else log_path(common.config_from_args(args))
    rows = leaderboard(read_log(path))
    table = [SHOWN] + [tuple(row.get(column) or "" for column in SHOWN) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(SHOWN))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print(f"\n{len(rows)} experiments in {path}, best OOF AUC first")


if __name__ == "__main__":
    common.run_main(main)
