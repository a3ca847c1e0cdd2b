"""The GPU check: one command that measures the targets on CUDA and proves every model there.

    bash tools/gpu_check.sh [--cpu] [--out DIR] [--data-root DIR] [--budget SECONDS] [--jobs N]
                            [--no-compile] [--blend-seconds S] [--step-limit NAME=SECONDS ...]

Built for one short slot on a bare GPU image (no network, no lightgbm; torch, numpy, pandas,
pyarrow, PyYAML present) that returns at most 8 files and the last lines of the output: it never
installs anything, runs the stages only through their command lines (src/make_synthetic.py,
src/preprocess.py, src/train.py, tools/bench.py) as subprocesses, each with its own time limit
inside one overall budget, so a failing or slow step is recorded and the next one still runs, and
it imports nothing from the repository (and never lightgbm).

Steps, in the order of what the figures are worth (GPU mode; --cpu rehearses them on a CPU):

1. environment: Python, torch, CUDA, the device.
2. data: the full preset generated (make_synthetic.py, one process per core) and preprocessed in
   the background while the demo preset is made and step 3 runs on it.
3. correctness, default runs: fold 0 of every model of `run.sh --preset full` on the demo preset
   (batch 1024, 3 epochs) by train.py: every epoch's train loss finite, fold and valid AUC above
   AUC_ABOVE_CHANCE, test predictions probabilities. (The GPU is idle while the full preset is
   generated, so these cost the bench nothing.)
4. bench, eager: ONE tools/bench.py process, data uploaded once: qin for one whole epoch of the
   3.6M train rows and the whole 379,142-row test split (the targets), then dcnv2_tf, din_tf,
   transformer_dcn_gpu and simqin for a few steps (the projection).
5. bench, compiled QIN: the same epoch with train.compile=true (compiled / eager ratio).
6. correctness variants while time remains: the published configs with train.bf16=false and
   train.compile=true, QIN rerun (CUDA's run-to-run noise); a variant agrees with the default run
   when its fold and valid AUCs are within AUC_TOLERANCE and its mean test prediction within
   MEAN_PRED_TOLERANCE (two trainings, not one set of weights predicted twice: single predictions
   drift apart and are recorded, not judged).
7. projection of `run.sh --preset full` from the measured rows/s and EPOCH_ASSUMPTIONS.

A step that does not run is recorded as skipped with the reason. Outputs, at most MAX_OUT_FILES
files in --out (default $OUT when set, else gpu_check_out/), rewritten after every step so a run
cut short keeps what it measured: gpu_check.json (everything), gpu_check.md (a section for
docs/BENCHMARKS.md), bench_lines.jsonl (bench's lines as printed) and logs.tgz (every command's
stdout and stderr). The last line printed on stdout is a one-line JSON summary of every target
figure (prefix SUMMARY_PREFIX), for a reply that keeps only the end of the output. Generated data
and the logs go to --data-root (default ${TMPDIR:-/tmp}/gpu_check_data), never into the
repository. Exit code 0 when every step ran and every correctness check passed; 1 otherwise (the
speed targets are reported, they do not fail the run).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 20242025  # run.sh's and bench.py's preset seed: the same files as theirs
MAX_OUT_FILES = 8  # what a device call brings back from $OUT
SUMMARY_PREFIX = "GPU_CHECK_SUMMARY "

AUC_ABOVE_CHANCE = 0.55     # fold and valid AUC of every correctness run must exceed this
AUC_TOLERANCE = 0.01        # |AUC(variant) - AUC(default)|, fold and valid
MEAN_PRED_TOLERANCE = 0.02  # |mean test prediction(variant) - mean(default)|: calibration

TARGETS = {  # docs/BENCHMARKS.md
    "qin_train_rows_per_s": 1_000_000,  # at least
    "qin_epoch_seconds": 5.0,           # below, one epoch of the 3.6M train rows
    "qin_test_predict_seconds": 1.0,    # below, the 379,142 test rows
    "run_sh_full_seconds": 3600.0,      # below, run.sh --preset full
}

# Epochs per fold each config is assumed to run in run.sh (early stopping decides the real count):
# the count the projection uses (capped by the config's max_epochs), and where it comes from.
EPOCH_ASSUMPTIONS = {
    "qin": (41, "QIN's released run: best epoch 33 of 41 (docs/spec/competition.md), patience 8"),
    "dcnv2_tf": (5, "no documented count: assumed best epoch 2 + patience 3"),
    "din_tf": (5, "no documented count: assumed best epoch 2 + patience 3"),
    "transformer_dcn": (7, "no documented count: assumed best epoch 2 + patience 5"),
    "simqin": (41, "QIN's schedule: assumed as QIN's released run"),
}
PROCESS_OVERHEAD_S = 30.0  # assumed per train.py process: imports, CUDA context, data upload
FOLD_OVERHEAD_S = 2.0      # assumed per fold: model build, checkpoint and prediction files

MODES = {
    "gpu": {
        "device": "cuda", "check_preset": "demo", "bench_preset": "full", "folds": 5,
        # run.sh --preset full's model list; the first three are the published configs
        "models": {"qin": "qin", "dcnv2_tf": "dcnv2_tf", "din_tf": "din_tf",
                   "transformer_dcn": "transformer_dcn_gpu", "simqin": "simqin"},
        "check_sets": ["train.batch_size=1024", "train.max_epochs=3"], "model_sets": {},
        "variants": {"qin": ("fp32", "compile", "rerun"), "dcnv2_tf": ("fp32", "compile"),
                     "din_tf": ("fp32", "compile")},
        # bench steps per config: QIN one whole epoch (the targets), the others enough for a rate
        "bench_steps": {"qin": "epoch", "dcnv2_tf": 60, "din_tf": 60, "transformer_dcn": 40, "simqin": 60},
        "warmup": 10, "budget": 470, "jobs": 6, "compile": True, "peak": [],
        "limits": {"environment": 60, "check_data": 120, "bench_data": 300, "correctness_run": 150,
                   "bench_eager": 180, "bench_compiled": 180},
    },
    "cpu": {  # the rehearsal: every GPU-mode path on small data (tests/test_gpu_check.py)
        "device": "cpu", "check_preset": "tiny", "bench_preset": "demo", "folds": 3,
        "models": {"qin": "qin_small", "dcnv2_tf": "dcnv2_tf_small", "din_tf": "din_tf_small",
                   "transformer_dcn": "transformer_dcn_small", "simqin": "simqin_small"},
        "check_sets": ["train.batch_size=128", "train.max_epochs=2"],
        # compiled code draws its own dropout masks: on the tiny preset's 2,000 held-out rows that
        # noise alone moves the fold AUC by 0.05; without dropout the compiled step is the eager
        # one (tests/test_train.py), so the rehearsal's agreement can be judged
        "model_sets": {"qin": ["model.dropout=0.0"]},
        "variants": {"qin": ("fp32", "compile", "rerun")},
        "bench_steps": {"qin": "epoch", "dcnv2_tf": 2, "din_tf": 2, "transformer_dcn": 2, "simqin": 2},
        "warmup": 1, "budget": 600, "jobs": 2, "compile": True, "peak": ["--peak-tflops", "matmul"],
        "limits": {"environment": 60, "check_data": 90, "bench_data": 120, "correctness_run": 300,
                   "bench_eager": 240, "bench_compiled": 300},
    },
}
PUBLISHED = ("qin", "dcnv2_tf", "din_tf")
RESERVE_S = 10.0  # kept back from the budget for writing the report
VARIANT_SETS = {"fp32": ["train.bf16=false"], "compile": ["train.compile=true"], "rerun": []}
COMPARISONS = {"fp32": "bf16 autocast vs float32 (TF32 matmuls on CUDA)",
               "compile": "torch.compile vs eager", "rerun": "eager vs eager rerun (run-to-run noise)"}
REPORT_ORDER = {"default": 0, "fp32": 1, "compile": 2, "rerun": 3}


# ---------------------------------------------------------------------------------------------
# running commands with time limits
# ---------------------------------------------------------------------------------------------

class Runner:
    """Runs commands as subprocesses with per-command limits inside one overall deadline; every
    command's stdout and stderr go to logs/<name>.out|.err."""

    def __init__(self, logs: Path, budget_s: float, step_limits: dict[str, float]):
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.step_limits = step_limits  # --step-limit: a step's own limit, below the mode's
        self.steps: list[dict] = []
        self.lock = threading.Lock()
        # tools/bench.py imports the repo's package: found from src/ as in an installed checkout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        self.live: set = set()  # started and not yet reaped: killed if this script is interrupted

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[gpu_check {self.elapsed():5.0f} s] {text}", file=sys.stderr, flush=True)

    def record(self, step: dict) -> dict:
        with self.lock:
            self.steps.append(step)
        note = f" ({first_line(step.get('error'))[:160]})" if step.get("error") else ""
        self.say(f"{step['name']}: {step['status']} in {step['seconds']:.1f} s{note}")
        return step

    def skip(self, name: str, why: str) -> dict:
        return self.record({"name": name, "status": "skipped", "seconds": 0.0, "error": why})

    def start(self, name: str, argv: list[str], limit_s: float) -> dict:
        """Start a command; finish() waits for it. Not started (skipped) under 5 s of budget."""
        left = self.left()
        limit_s = min(limit_s, self.step_limits.get(name, math.inf), left)
        job = {"name": name, "command": shlex.join(argv), "timeout_s": round(limit_s, 1),
               "stdout": self.logs / f"{name}.out", "stderr": self.logs / f"{name}.err"}
        if left < 5:
            return job
        with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
            job["proc"] = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=self.env,
                                           start_new_session=True)  # its own group: killable whole
        self.live.add(job["proc"])
        job["t0"] = time.monotonic()
        return job

    def poll(self, job: dict) -> bool:
        """True once the job is over (finished, killed at its limit, or never started)."""
        if "proc" not in job or job["proc"].poll() is not None:
            return True
        if time.monotonic() - job["t0"] > job["timeout_s"]:
            self.kill(job["proc"])
            job["timed_out"] = True
            return True
        return False

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group this script started for the command
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def finish(self, job: dict) -> dict:
        while not self.poll(job):
            time.sleep(0.2)
        step = {"name": job["name"], "command": job["command"], "timeout_s": job["timeout_s"],
                "log": f"logs/{job['name']}.err"}
        if "proc" not in job:
            return self.record({**step, "status": "skipped", "seconds": 0.0,
                                "error": f"out of time: {max(0.0, self.left()):.0f} s of the budget left"})
        self.live.discard(job["proc"])
        step["seconds"] = round(time.monotonic() - job["t0"], 2)
        step["rc"] = job["proc"].returncode
        if job.get("timed_out"):
            step["status"] = "timeout"
            step["error"] = f"killed at its {job['timeout_s']:.0f} s limit"
        else:
            step["status"] = "ok" if step["rc"] == 0 else "failed"
            step["error"] = f"exit code {step['rc']}"
        if step["status"] == "ok":
            del step["error"]
        elif last := tail(job["stderr"]) or tail(job["stdout"]):
            # first line: why, and the command's last words (an "error: ..." line if it left one)
            errors = [line for line in last.splitlines() if line.lower().startswith(("error", "traceback"))
                      or "Error" in line]
            step["error"] += f": {(errors or last.splitlines())[-1].strip()[:300]}\n{last}"
        return self.record(step)

    def kill_all(self) -> None:
        for proc in list(self.live):
            self.kill(proc)

    def run(self, name: str, argv: list[str], limit_s: float) -> dict:
        return self.finish(self.start(name, argv, limit_s))

    def run_all(self, jobs: list[tuple[str, list[str], float]], parallel: int) -> dict:
        """Run (name, argv, limit) commands, `parallel` at a time, in order; returns name -> step."""
        pending, running, done = list(jobs), [], {}
        while pending or running:
            while pending and len(running) < parallel:
                name, argv, limit = pending.pop(0)
                job = self.start(name, argv, limit)
                if "proc" in job:
                    running.append(job)
                else:
                    done[name] = self.finish(job)  # recorded as skipped: out of time
            for job in [j for j in running if self.poll(j)]:
                running.remove(job)
                done[job["name"]] = self.finish(job)
            time.sleep(0.2)
        return done


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]  # no tqdm
    return "\n".join(kept[-lines:])


# ---------------------------------------------------------------------------------------------
# configs (read-only: batch size, max_epochs, patience for the step counts and the projection)
# ---------------------------------------------------------------------------------------------

def load_config(name: str) -> dict:
    import yaml

    def load(path: Path) -> dict:
        data = yaml.safe_load(path.read_text()) or {}
        base = data.pop("base", None)
        return merge(load(path.parent / base), data) if base else data

    def merge(base: dict, over: dict) -> dict:
        result = dict(base)
        for key, value in over.items():
            result[key] = merge(result[key], value) if isinstance(value, dict) and isinstance(
                result.get(key), dict) else value
        return result

    return load(REPO / "configs" / f"{name}.yaml")


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------

ENV_SNIPPET = r"""
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
for name in ("numpy", "pandas", "pyarrow", "yaml", "sklearn", "scipy", "lightgbm"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = f"missing ({type(exc).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                device_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                bf16_supported=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


def step_environment(r: Runner, py: str, mode_name: str, limit: float) -> dict:
    step = r.run("environment", [py, "-c", ENV_SNIPPET], limit)
    env = {}
    if step["status"] == "ok":
        env = json.loads((r.logs / "environment.out").read_text().strip().splitlines()[-1])
    if mode_name == "gpu" and not env.get("cuda_available"):
        step["status"], step["error"] = "failed", "torch.cuda.is_available() is False"
        r.say("environment: FAILED, torch sees no CUDA device (every CUDA step will fail)")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    env["platform"] = platform.platform()
    return env


def data_dirs(root: Path, preset: str) -> tuple[Path, Path]:
    return root / preset, root / "work" / preset  # run.sh's and bench.py's layout


def data_sets(root: Path, preset: str) -> list[str]:
    raw, work = data_dirs(root, preset)
    return ["--set", f"data.raw_dir={raw}", "--set", f"data.work_dir={work}"]


def prepare_preset(r: Runner, py: str, root: Path, preset: str, label: str, limit: float) -> dict:
    """Generate the preset unless it is there (timed, the time kept beside it), preprocess it
    (always, --force: timed); both within ``limit`` seconds; returns the data record."""
    deadline = time.monotonic() + limit
    raw, work = data_dirs(root, preset)
    timing_file = root / f"gpu_check_timing_{preset}.json"
    record = {"preset": preset, "raw_dir": str(raw), "work_dir": str(work)}
    if (raw / "item_info.parquet").is_file() and timing_file.is_file():  # written last: complete
        record.update(reused=True, **json.loads(timing_file.read_text()))
    else:
        workers = os.cpu_count() or 1
        step = r.run(f"{label}_generate", [py, "src/make_synthetic.py", "--preset", preset, "--out",
                                           str(raw), "--seed", str(SEED), "--workers", str(workers)],
                     deadline - time.monotonic())
        record.update(reused=False, generate_workers=workers)
        if step["status"] != "ok":
            record["status"] = step["status"]
            return record
        record["generate_seconds"] = step["seconds"]
        timing_file.write_text(json.dumps({"generate_seconds": step["seconds"], "generate_workers": workers}))
    step = r.run(f"{label}_preprocess", [py, "src/preprocess.py", "--config", "configs/data.yaml",
                                         *data_sets(root, preset), "--force"], deadline - time.monotonic())
    record["status"] = step["status"]
    if step["status"] == "ok":
        record["preprocess_seconds"] = step["seconds"]
        manifest = json.loads((work / "processed" / "manifest.json").read_text())
        record["rows"] = manifest["n_rows"]
    return record


def correctness_runs(mode: dict, py: str, root: Path, device: str, compile_on: bool) -> list[dict]:
    runs = []
    for model, config in mode["models"].items():
        wanted = [("default", [])] + [(v, VARIANT_SETS[v]) for v in mode["variants"].get(model, ())
                                      if v != "compile" or compile_on]
        for variant, extra in wanted:
            run_name = f"gpucheck_{model}_{variant}"
            sets = [*mode["check_sets"], *mode["model_sets"].get(model, []), f"run.name={run_name}", *extra]
            argv = [py, "src/train.py", "--config", f"configs/{config}.yaml",
                    *data_sets(root, mode["check_preset"]), *[a for s in sets for a in ("--set", s)],
                    "--folds", "0", "--device", device]
            runs.append({"model": model, "config": config, "variant": variant, "run_name": run_name,
                         "overrides": sets, "argv": argv, "step": f"train_{run_name}"})
    return runs


def run_correctness(r: Runner, runs: list[dict], work: Path, limit: float, jobs: int) -> dict:
    """Train the runs (compiling ones first: the slowest), judge each from its run folder."""
    for run in runs:  # train.py would reuse the finished folds of an earlier check: start afresh
        shutil.rmtree(work / "runs" / run["run_name"], ignore_errors=True)
    ordered = sorted(runs, key=lambda run: run["variant"] != "compile")
    steps = r.run_all([(run["step"], run["argv"], limit) for run in ordered], jobs)
    results = {}
    for run in runs:
        step = steps[run["step"]]
        if step["status"] == "ok":
            results[(run["model"], run["variant"])] = read_run(run, work)
        else:
            results[(run["model"], run["variant"])] = {
                **{k: run[k] for k in ("model", "config", "variant", "run_name", "overrides")},
                "passed": False, "problem": f"train.py {step['status']}: {first_line(step.get('error'))}"}
    return results


def read_run(run: dict, work_dir: Path) -> dict:
    """Judge one correctness run from its run folder (docs/DESIGN.md "Run directory")."""
    fold = work_dir / "runs" / run["run_name"] / "fold0"
    result = {k: run[k] for k in ("model", "config", "variant", "run_name", "overrides")}
    try:
        history = json.loads((fold / "history.json").read_text())
        done = json.loads((fold / "done.json").read_text())
        import pandas as pd
        test = pd.read_parquet(fold / "test.parquet").sort_values("ID")
    except Exception as exc:  # noqa: BLE001 - any unreadable file fails this run, not the check
        result.update(passed=False, problem=f"run folder unreadable: {type(exc).__name__}: {exc}")
        return result
    losses = [h.get("train_loss") for h in history]
    preds = test["pred"].to_numpy(dtype="float64")
    result.update(
        epochs=len(history), best_epoch=done.get("best_epoch"), train_loss=losses,
        fold_auc=done.get("fold_auc"), valid_auc=done.get("valid_auc"),
        train_rows_per_s=done.get("rows_per_s"), fold_seconds=done.get("seconds"),
        test_rows=int(len(preds)), test_pred_mean=float(preds.mean()) if len(preds) else None)
    problems = []
    if not losses or not finite(*losses):
        problems.append("a train loss is not finite")
    for key in ("fold_auc", "valid_auc"):
        if not finite(result[key]) or result[key] <= AUC_ABOVE_CHANCE:
            problems.append(f"{key} {result[key]} not above {AUC_ABOVE_CHANCE}")
    if not len(preds) or not ((preds >= 0) & (preds <= 1)).all():
        problems.append("test predictions are not all probabilities")
    result["passed"] = not problems
    if problems:
        result["problem"] = "; ".join(problems)
    result["_preds"], result["_ids"] = preds, test["ID"].to_numpy()
    return result


def agreement(base: dict, other: dict, what: str) -> dict:
    import numpy as np
    record = {"model": base["model"], "comparison": what, "variant": other["variant"],
              "tolerance": {"auc": AUC_TOLERANCE, "mean_pred": MEAN_PRED_TOLERANCE}}
    if "_preds" not in base or "_preds" not in other:
        record.update(passed=False, problem="a run is missing")
        return record
    p, q = base["_preds"], other["_preds"]
    if len(p) != len(q) or not (base["_ids"] == other["_ids"]).all():
        record.update(passed=False, problem="test IDs differ")
        return record

    def logit(x):
        x = np.clip(x, 1e-7, 1 - 1e-7)
        return np.log(x / (1 - x))

    diff = np.abs(p - q)
    lp, lq = logit(p), logit(q)
    corr = float(np.corrcoef(lp, lq)[0, 1]) if lp.std() > 0 and lq.std() > 0 else (1.0 if (lp == lq).all() else 0.0)
    record.update(
        fold_auc_diff=abs(other["fold_auc"] - base["fold_auc"]),
        valid_auc_diff=abs(other["valid_auc"] - base["valid_auc"]),
        mean_pred_diff=abs(float(q.mean() - p.mean())),
        mean_abs_pred_diff=float(diff.mean()), max_abs_pred_diff=float(diff.max()), logit_corr=corr)
    record["passed"] = bool(other["passed"] and base["passed"]
                            and record["fold_auc_diff"] <= AUC_TOLERANCE
                            and record["valid_auc_diff"] <= AUC_TOLERANCE
                            and record["mean_pred_diff"] <= MEAN_PRED_TOLERANCE)
    return record


def correctness_report(mode: dict, device: str, results: dict, skipped: list[str]) -> dict:
    models = list(mode["models"])
    ordered = dict(sorted(results.items(), key=lambda kv: (models.index(kv[0][0]), REPORT_ORDER[kv[0][1]])))
    pairs = [agreement(ordered[(model, "default")], other, COMPARISONS[variant])
             for (model, variant), other in ordered.items()
             if variant != "default" and (model, "default") in ordered]
    clean = [{k: v for k, v in res.items() if not k.startswith("_")} for res in ordered.values()]
    return {"preset": mode["check_preset"], "device": device, "fold": 0, "overrides": mode["check_sets"],
            "auc_above_chance": AUC_ABOVE_CHANCE, "runs": clean, "agreement": pairs, "skipped": skipped}


def parse_lines(path: Path) -> tuple[list[str], list[dict]]:
    raw, records = [], []
    try:
        text = path.read_text()
    except OSError:
        return raw, records
    for line in text.splitlines():
        if not line.strip():
            continue
        raw.append(line)
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return raw, records


BENCH_FIELDS = ("rows", "seconds", "rows_per_s", "flops_per_row", "achieved_tflops", "peak_tflops",
                "fraction_of_peak", "peak_memory_bytes", "dtype", "batch_size", "steps", "params")


def bench_argv(mode: dict, py: str, root: Path, device: str, models: list[str], sets: list[str]) -> list[str]:
    argv = [py, "tools/bench.py", "--preset", mode["bench_preset"], "--data-root", str(root),
            "--device", device, "--warmup", str(mode["warmup"]), *mode["peak"]]
    for model in models:
        argv += ["--config", f"configs/{mode['models'][model]}.yaml@{mode['bench_steps'][model]}"]
    return argv + [a for s in sets for a in ("--set", s)]


def step_bench(r: Runner, name: str, argv: list[str], limit: float, benches: dict, mode: dict,
               models: list[str], which: str) -> list[str]:
    """Run one bench.py command; file its figures under benches[model][which]; returns its lines
    as printed (kept even when the command failed or was killed: each line is printed when measured)."""
    step = r.run(name, argv, limit)
    raw, records = parse_lines(r.logs / f"{name}.out")
    by_config = {f"configs/{config}.yaml": model for model, config in mode["models"].items()}
    for rec in records:
        model = by_config.get(rec.get("config"))
        if model is None or rec.get("measure") not in ("train", "predict"):
            continue
        entry = benches.setdefault(model, {"model": model, "config": mode["models"][model], "eager": {},
                                           "compiled": {}, "status": {}})
        entry[which][rec["measure"]] = {k: rec.get(k) for k in BENCH_FIELDS}
        entry["device_name"] = rec.get("device_name")
    for model in models:  # the step's status for every config it was meant to measure
        entry = benches.setdefault(model, {"model": model, "config": mode["models"][model],
                                           "eager": {}, "compiled": {}, "status": {}})
        entry["status"][which] = step["status"] if entry[which].get("predict") else (
            "not measured: " + step["status"])
    return raw


def compile_ratio(bench: dict) -> dict | None:
    eager, compiled = bench.get("eager", {}), bench.get("compiled", {})
    if not all(part.get(m) for part in (eager, compiled) for m in ("train", "predict")):
        return None
    return {m: compiled[m]["rows_per_s"] / eager[m]["rows_per_s"] for m in ("train", "predict")}


def qin_full_epoch(bench: dict, rows: dict) -> dict:
    n_train, n_test = rows["train"], rows["test"]
    out = {"train_rows": n_train, "test_rows": n_test, "variants": {}}
    for which in ("eager", "compiled"):
        train, predict = bench.get(which, {}).get("train"), bench.get(which, {}).get("predict")
        if not train or not predict:
            continue
        out["steps"] = train["steps"]
        rate = train["rows_per_s"]
        epoch = n_train / rate
        out["variants"][which] = {
            "train_rows_timed": train["rows"], "train_seconds_timed": train["seconds"],
            "train_rows_per_s": rate, "epoch_seconds": epoch,
            "test_predict_rows": predict["rows"], "test_predict_seconds": predict["seconds"],
            "epoch_plus_predict_seconds": epoch + predict["seconds"],
            "pass": {"train_rows_per_s": rate >= TARGETS["qin_train_rows_per_s"],
                     "epoch_seconds": epoch < TARGETS["qin_epoch_seconds"],
                     "test_predict_seconds": (predict["seconds"] < TARGETS["qin_test_predict_seconds"]
                                              and predict["rows"] == n_test)}}
    return out


def projection(benches: dict, mode: dict, data: dict, blend_s: float, which: str = "eager") -> dict:
    """run.sh --preset <bench preset>: generate + preprocess + K folds x models + blend."""
    rows, k = data.get("rows") or {}, mode["folds"]
    result = {"folds": k, "rows_per_s": which, "process_overhead_s": PROCESS_OVERHEAD_S,
              "fold_overhead_s": FOLD_OVERHEAD_S, "blend_seconds": blend_s,
              "blend_note": "assumed, not measured: the GPU image has no lightgbm",
              "generate_seconds": data.get("generate_seconds"), "preprocess_seconds": data.get("preprocess_seconds"),
              "models": [], "formula": ("per epoch = train rows x (K-1)/K / train rows/s + (held-out fold + "
                                        "valid rows) / predict rows/s; per fold = epochs x per epoch + test "
                                        "rows / predict rows/s + fold overhead; per model = K x per fold + "
                                        "process overhead")}
    if not rows:
        result.update(total_seconds=None, problem="no data sizes (the data step failed)")
        return result
    n_train, n_valid, n_test = rows["train"], rows["valid"], rows["test"]
    missing = []
    for model, config in mode["models"].items():
        bench = benches.get(model, {})
        used = which if bench.get(which, {}).get("train") else "eager"  # not compiled: eager figures
        train, predict = bench.get(used, {}).get("train"), bench.get(used, {}).get("predict")
        cfg = load_config(config)["train"]
        typical, source = EPOCH_ASSUMPTIONS[model]
        epochs, max_epochs = min(typical, cfg["max_epochs"]), cfg["max_epochs"]
        if epochs < typical:
            source = f"max_epochs {max_epochs}; uncapped: {typical}, {source}"
        entry = {"model": model, "config": config, "rows_per_s": used, "epochs": epochs,
                 "epochs_source": source, "max_epochs": max_epochs, "patience": cfg["patience"]}
        if not train or not predict:
            missing.append(config)
            entry["problem"] = f"no {which} bench figure"
            result["models"].append(entry)
            continue
        per_epoch = (n_train * (k - 1) / k / train["rows_per_s"]
                     + (n_train / k + n_valid) / predict["rows_per_s"])
        per_fold_fixed = n_test / predict["rows_per_s"] + FOLD_OVERHEAD_S
        entry.update(epoch_seconds=per_epoch, fold_seconds=epochs * per_epoch + per_fold_fixed,
                     model_seconds=k * (epochs * per_epoch + per_fold_fixed) + PROCESS_OVERHEAD_S,
                     model_seconds_max_epochs=k * (max_epochs * per_epoch + per_fold_fixed) + PROCESS_OVERHEAD_S)
        result["models"].append(entry)
    fixed = (data.get("generate_seconds") or 0.0) + (data.get("preprocess_seconds") or 0.0) + blend_s
    if missing:
        result.update(total_seconds=None, problem=f"incomplete: no {which} figure for {', '.join(missing)}")
    else:
        done = result["models"]
        result["total_seconds"] = fixed + sum(m["model_seconds"] for m in done)
        result["total_seconds_max_epochs"] = fixed + sum(m["model_seconds_max_epochs"] for m in done)
        published = [m for m in done if m["model"] in PUBLISHED]
        result["total_seconds_published_only"] = fixed + sum(m["model_seconds"] for m in published)
        result["pass"] = result["total_seconds"] < TARGETS["run_sh_full_seconds"]
    return result


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f} MiB"


def cell(text) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\n", " ").replace("|", "\\|")


def verdict(ok) -> str:
    return "—" if ok is None else ("**PASS**" if ok else "**FAIL**")


def markdown(report: dict) -> str:
    env, mode = report["environment"], report["mode"]
    bench_device = next((b["device_name"] for b in report["bench"] if b.get("device_name")), None)
    device = env.get("device_name") or bench_device or "no CUDA device"
    lines = [f"### GPU check {report['started_utc'][:10]}: {device}"
             + (" (CPU rehearsal: the plumbing, not a measurement)" if mode == "cpu" else ""), ""]
    lines += [f"`{report['command']}`: {fmt(report['wall_seconds'])} s wall (budget {report['budget_seconds']} s), "
              f"commit {env.get('git_commit') or '?'}. Python {env.get('python')}, torch {env.get('torch')} "
              f"(CUDA {env.get('torch_cuda')}), numpy {env.get('numpy')}, pandas {env.get('pandas')}; "
              f"{env.get('cpu_count')} CPU cores; nvidia-smi: {env.get('nvidia_smi')}.", ""]

    lines += ["#### Targets", "", "| target | measured | verdict |", "|---|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {verdict(t['pass'])} |")
    lines.append("")

    d = report["data"]
    gen = "reused; an earlier run generated it with" if d.get("reused") else "generated by"
    lines += [f"#### 1. The {d.get('preset')} preset and the models of `run.sh --preset {d.get('preset')}`", "",
              f"Data: {gen} `make_synthetic.py --preset {d.get('preset')} --workers "
              f"{fmt(d.get('generate_workers'))}` in {fmt(d.get('generate_seconds'))} s, then `preprocess.py "
              f"--force` in {fmt(d.get('preprocess_seconds'))} s (in the background, while the correctness "
              f"runs trained); rows {json.dumps(d.get('rows'))}. One `tools/bench.py` process measured the "
              "configs eagerly on data uploaded once, a second one QIN compiled.", "",
              "| config | compile | dtype | steps | train rows/s | train FLOPs/row | fraction of peak | peak mem train | "
              "predict rows/s | predict FLOPs/row | peak mem predict | status |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b in report["bench"]:
        for which in ("eager", "compiled"):
            if which not in b["status"]:
                continue
            tr, pr = b[which].get("train") or {}, b[which].get("predict") or {}
            lines.append(f"| {b['config']} | {'yes' if which == 'compiled' else 'no'} | {tr.get('dtype') or '—'} | "
                         f"{fmt(tr.get('steps'))} | {fmt(tr.get('rows_per_s'))} | {fmt(tr.get('flops_per_row'))} | "
                         f"{fmt(tr.get('fraction_of_peak'), 3)} | {mib(tr.get('peak_memory_bytes'))} | "
                         f"{fmt(pr.get('rows_per_s'))} | {fmt(pr.get('flops_per_row'))} | "
                         f"{mib(pr.get('peak_memory_bytes'))} | {b['status'][which]} |")
        ratio = compile_ratio(b)
        if ratio:
            lines.append(f"| {b['config']} compiled / eager | | | | x{fmt(ratio['train'], 3)} | | | | "
                         f"x{fmt(ratio['predict'], 3)} | | | |")
    lines.append("")

    q = report["qin_full_epoch"]
    lines += [f"#### 2. One QIN epoch ({fmt(q.get('train_rows'))} train rows) and the test split "
              f"({fmt(q.get('test_rows'))} rows)", "",
              f"`bench.py --config configs/{report['models']['qin']}.yaml@epoch`: {fmt(q.get('steps'))} steps "
              "(= ceil(train rows / batch)), then the whole test split.", "",
              "| compile | train rows/s (>= 1,000,000) | epoch s (< 5) | test predict s (< 1) | epoch + predict s |",
              "|---|---:|---:|---:|---:|"]
    for which, v in q.get("variants", {}).items():
        ok = v["pass"]
        lines.append(f"| {'yes' if which == 'compiled' else 'no'} | {fmt(v['train_rows_per_s'])} "
                     f"{verdict(ok['train_rows_per_s'])} | {fmt(v['epoch_seconds'], 3)} {verdict(ok['epoch_seconds'])} | "
                     f"{fmt(v['test_predict_seconds'], 3)} {verdict(ok['test_predict_seconds'])} | "
                     f"{fmt(v['epoch_plus_predict_seconds'], 3)} |")
    lines.append("")

    p = report["projection"]
    lines += [f"#### 3. Projected `run.sh --preset {report['bench_preset']}` "
              f"({p['folds']} folds x all models + blend)", "",
              f"{p['formula']}. Assumed: {fmt(p['process_overhead_s'])} s per train.py process, "
              f"{fmt(p['fold_overhead_s'])} s per fold, blend {fmt(p['blend_seconds'])} s ({p['blend_note']}). "
              "Eager rows/s, as the configs run (train.compile: false).", "",
              "| config | epochs per fold (assumption) | max_epochs / patience | s per epoch | s per fold "
              "| s per model | s per model at max_epochs |", "|---|---|---|---:|---:|---:|---:|"]
    for m in p["models"]:
        lines.append(f"| {m['config']} | {m['epochs']} ({cell(m['epochs_source'])}) | "
                     f"{m['max_epochs']} / {m['patience']} | {fmt(m.get('epoch_seconds'), 3)} | "
                     f"{fmt(m.get('fold_seconds'), 3)} | {fmt(m.get('model_seconds'))} | "
                     f"{fmt(m.get('model_seconds_max_epochs'))} |")
    lines += ["", f"Total (generate {fmt(p.get('generate_seconds'))} s + preprocess "
              f"{fmt(p.get('preprocess_seconds'))} s + models + blend): **{fmt(p.get('total_seconds'))} s** "
              f"against 3,600 s: {verdict(p.get('pass'))}; "
              f"only qin, dcnv2_tf, din_tf: {fmt(p.get('total_seconds_published_only'))} s; every fold at max_epochs: "
              f"{fmt(p.get('total_seconds_max_epochs'))} s." + (f" {p['problem']}." if p.get("problem") else ""), ""]
    pc = report.get("projection_compiled")
    if pc:
        lines += [f"With `--train-set train.compile=true` (compiled rows/s where measured, eager for the "
                  f"others; compile time per fold not included): {fmt(pc.get('total_seconds'))} s"
                  + (f" ({pc['problem']})" if pc.get("problem") else "") + ".", ""]

    c = report["correctness"]
    lines += [f"#### 4. Correctness on {c['device']}: fold 0 of each model, {c['preset']} preset",
              "", f"`src/train.py --folds 0 --device {c['device']}` with `--set` "
              + ", ".join(f"`{s}`" for s in c["overrides"])
              + f". Pass: every epoch's train loss finite, fold and valid AUC above {AUC_ABOVE_CHANCE}, "
              "test predictions in [0, 1].", "",
              "| model (config) | variant | epochs | train loss (last) | fold AUC | valid AUC | train rows/s "
              "| verdict |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for run in c["runs"]:
        loss = (run.get("train_loss") or [None])[-1]
        lines.append(f"| {run['model']} ({run['config']}) | {run['variant']} | {fmt(run.get('epochs'))} | "
                     f"{fmt(loss)} | {fmt(run.get('fold_auc'))} | {fmt(run.get('valid_auc'))} | "
                     f"{fmt(run.get('train_rows_per_s'))} | {verdict(run['passed'])}"
                     + (f" {cell(run['problem'][:200])}" if run.get("problem") else "") + " |")
    lines += ["", f"Agreement with the default run (bf16 autocast on CUDA, eager), same seed and batches: "
              f"|Δ AUC| <= {AUC_TOLERANCE} (fold and valid) and |Δ mean test prediction| <= "
              f"{MEAN_PRED_TOLERANCE}. Two trainings are compared, so single predictions drift apart "
              "(logit correlation, mean and max |Δp| over the test rows: recorded, not judged).", "",
              "| model | comparison | Δ fold AUC | Δ valid AUC | Δ mean pred | mean abs Δp | max abs Δp "
              "| logit corr | verdict |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for a in c["agreement"]:
        lines.append(f"| {a['model']} | {a['comparison']} | {fmt(a.get('fold_auc_diff'), 3)} | "
                     f"{fmt(a.get('valid_auc_diff'), 3)} | {fmt(a.get('mean_pred_diff'), 3)} | "
                     f"{fmt(a.get('mean_abs_pred_diff'), 3)} | {fmt(a.get('max_abs_pred_diff'), 3)} | "
                     f"{fmt(a.get('logit_corr'), 4)} | {verdict(a['passed'])}"
                     + (f" {cell(a['problem'])}" if a.get("problem") else "") + " |")
    for s in c["skipped"]:
        lines += ["", f"Skipped: {s}."]
    lines.append("")

    lines += ["#### Steps", "", "| step | status | seconds | limit s |", "|---|---|---:|---:|"]
    for s in report["steps"]:
        why = f": {cell(first_line(s.get('error'))[:160])}" if s.get("error") else ""
        lines.append(f"| {s['name']} | {s['status']}{why} | {fmt(s.get('seconds'))} | {fmt(s.get('timeout_s'))} |")
    lines += ["", "Raw lines printed by `tools/bench.py`, as printed:", "", "```"]
    lines += report["raw_bench_lines"] or ["(none)"]
    lines += ["```", ""]
    return "\n".join(lines)


def targets(report: dict) -> list[dict]:
    out = []
    q = report["qin_full_epoch"]["variants"]
    for which in ("eager", "compiled"):
        v = q.get(which)
        if not v:
            out.append({"target": f"QIN ({which}) full epoch and test prediction", "measured": "not measured",
                        "pass": None if which == "compiled" else False})
            continue
        out += [
            {"target": f"QIN ({which}) train rows/s >= 1,000,000", "measured": fmt(v["train_rows_per_s"]),
             "pass": v["pass"]["train_rows_per_s"]},
            {"target": f"QIN ({which}) one epoch of {fmt(report['qin_full_epoch']['train_rows'])} rows < 5 s",
             "measured": f"{fmt(v['epoch_seconds'], 3)} s", "pass": v["pass"]["epoch_seconds"]},
            {"target": f"QIN ({which}) prediction of the {fmt(report['qin_full_epoch']['test_rows'])} test rows < 1 s",
             "measured": f"{fmt(v['test_predict_seconds'], 3)} s", "pass": v["pass"]["test_predict_seconds"]}]
    p = report["projection"]
    out.append({"target": f"run.sh --preset {report['bench_preset']} ({p['folds']} folds x all models + blend) < 1 h, projected",
                "measured": f"{fmt(p.get('total_seconds'))} s", "pass": p.get("pass")})
    c = report["correctness"]
    out.append({"target": "every model trains fold 0: finite loss, AUC above chance",
                "measured": f"{sum(r['passed'] for r in c['runs'])} of {len(c['runs'])} runs",
                "pass": bool(c["runs"]) and all(r["passed"] for r in c["runs"])})
    out.append({"target": "bf16 / compiled / rerun agree with the default run",
                "measured": f"{sum(a['passed'] for a in c['agreement'])} of {len(c['agreement'])} pairs",
                "pass": bool(c["agreement"]) and all(a["passed"] for a in c["agreement"])})
    return out


def summary(report: dict) -> dict:
    """Every target figure in one compact object: the last line of stdout."""
    def short(figures: dict) -> dict:
        tr, pr = figures.get("train") or {}, figures.get("predict") or {}
        return {"train_rows_s": tr.get("rows_per_s"), "predict_rows_s": pr.get("rows_per_s"),
                "frac_peak": tr.get("fraction_of_peak"), "mem_gib": None if tr.get("peak_memory_bytes") is None
                else round(tr["peak_memory_bytes"] / 2**30, 2), "steps": tr.get("steps")}
    epoch = report["qin_full_epoch"]["variants"]
    c = report["correctness"]
    return {
        "mode": report["mode"], "device": report["environment"].get("device_name"),
        "torch": report["environment"].get("torch"), "commit": report["environment"].get("git_commit"),
        "wall_s": report["wall_seconds"],
        "data_s": {k: report["data"].get(k) for k in ("generate_seconds", "preprocess_seconds")},
        "bench": {f"{b['config']}/{which}": short(b[which]) for b in report["bench"]
                  for which in ("eager", "compiled") if b[which]},
        "qin_epoch_s": {w: round(v["epoch_seconds"], 3) for w, v in epoch.items()},
        "qin_test_predict_s": {w: round(v["test_predict_seconds"], 3) for w, v in epoch.items()},
        "run_sh_full_projected_s": report["projection"].get("total_seconds"),
        "targets_pass": {t["target"]: t["pass"] for t in report["targets"]},
        "correctness": f"{sum(r['passed'] for r in c['runs'])}/{len(c['runs'])} runs, "
                       f"{sum(a['passed'] for a in c['agreement'])}/{len(c['agreement'])} pairs",
        "steps_not_ok": [f"{s['name']}: {s['status']} ({first_line(s.get('error'))[:80]})"
                         for s in report["steps"] if s["status"] != "ok"],
    }


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def parse_step_limit(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        if name and float(seconds) > 0:
            return name, float(seconds)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NAME=SECONDS (a step name, seconds > 0), got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU rehearsal of every GPU-mode path: tiny and demo presets, *_small configs")
    parser.add_argument("--out", default=None,
                        help=f"output folder, at most {MAX_OUT_FILES} files (default: $OUT when set, "
                             "else gpu_check_out)")
    parser.add_argument("--data-root", default=None,
                        help="where presets are generated and logs kept (default: ${TMPDIR:-/tmp}/gpu_check_data)")
    parser.add_argument("--budget", type=float, default=None,
                        help="overall seconds (default: 470 on GPU, 600 with --cpu); steps get what is left")
    parser.add_argument("--jobs", type=int, default=None,
                        help="correctness runs at a time (default: 6 on GPU, 2 with --cpu)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=True,
                        help="skip the compiled bench and the compiled correctness runs")
    parser.add_argument("--blend-seconds", type=float, default=300.0,
                        help="assumed blend time in the projection (default 300; the GPU image has no lightgbm)")
    parser.add_argument("--step-limit", type=parse_step_limit, action="append", default=[], metavar="NAME=SECONDS",
                        help="a lower time limit for the step of that name (repeatable; the rehearsal "
                             "kills one step this way)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def guarded(r: Runner, name: str, fn, fallback):
    """fn(), or fallback with a failed step recorded: a bug here must not lose the other results."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        r.record({"name": f"{name} (gpu_check.py)", "status": "failed", "seconds": 0.0,
                  "error": "internal error in tools/gpu_check.py\n" + traceback.format_exc(limit=6)})
        return fallback


def main(argv=None) -> int:
    args = parse_args(argv)
    mode_name = "cpu" if args.cpu else "gpu"
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    root = Path(args.data_root or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_data").resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    shutil.rmtree(logs, ignore_errors=True)  # this run's logs only, in logs.tgz
    budget = args.budget or MODES[mode_name]["budget"]
    command = shlex.join(["bash", "tools/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    r = Runner(logs, budget, dict(args.step_limit))
    check = Check(args, r, mode_name, out, root, budget, command)
    try:
        return check.run()
    except KeyboardInterrupt:  # stop what this script started: the commands run in their own groups
        r.say("interrupted: stopping the commands it started")
        r.kill_all()
        check.write(final=True)
        return 130


class Check:
    """The steps in order; after each, the outputs are written again from what is known so far."""

    def __init__(self, args, r: Runner, mode_name: str, out: Path, root: Path, budget: float, command: str):
        self.args, self.r, self.mode_name, self.out, self.root = args, r, mode_name, out, root
        self.mode = MODES[mode_name]
        self.py, self.device = sys.executable, self.mode["device"]
        self.compile_on = args.compile
        self.jobs = args.jobs or self.mode["jobs"]
        if mode_name == "cpu":  # jobs run side by side: one thread each, no OpenMP threads fighting
            r.env.setdefault("OMP_NUM_THREADS", "1")
        self.report = {
            "schema": 2, "mode": mode_name, "command": command, "budget_seconds": budget,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": self.device, "check_preset": self.mode["check_preset"],
            "bench_preset": self.mode["bench_preset"], "models": self.mode["models"], "data_root": str(root),
            "environment": {}, "data": {"preset": self.mode["bench_preset"], "status": "not run"}}
        self.benches: dict = {}
        self.raw_lines: list[str] = []
        self.results: dict = {}
        self.skipped: list[str] = []

    def run(self) -> int:
        r, mode, limits = self.r, self.mode, self.mode["limits"]
        r.say(f"{self.mode_name} mode, output {self.out}, data {self.root}, budget "
              f"{self.report['budget_seconds']:.0f} s")
        self.report["environment"] = step_environment(r, self.py, self.mode_name, limits["environment"])
        self.write()

        bench_data: dict = {}

        def make_bench_data():
            bench_data.update(guarded(r, "bench_data", lambda: prepare_preset(
                r, self.py, self.root, mode["bench_preset"], "bench_data", limits["bench_data"]),
                {"status": "failed"}))
        background = threading.Thread(target=make_bench_data, daemon=True)
        background.start()

        runs = correctness_runs(mode, self.py, self.root, self.device, self.compile_on)
        if not self.compile_on:
            self.skipped.append("train.compile=true (--no-compile)")
        check_data = guarded(r, "check_data", lambda: prepare_preset(
            r, self.py, self.root, mode["check_preset"], "check_data", limits["check_data"]), {"status": "failed"})
        work = data_dirs(self.root, mode["check_preset"])[1]
        defaults = [run for run in runs if run["variant"] == "default"]
        if check_data.get("status") == "ok":
            self.results.update(guarded(r, "correctness", lambda: run_correctness(
                r, defaults, work, limits["correctness_run"], self.jobs), {}))
        else:
            self.skipped.append(f"every correctness run: the {mode['check_preset']} data step failed")
        self.write()

        background.join(max(0.0, r.left()))
        self.report["data"] = {"preset": mode["bench_preset"], **bench_data} if not background.is_alive() else {
            "preset": mode["bench_preset"], "status": "timeout"}
        if bench_data.get("status") == "ok" and not background.is_alive():
            self.bench("bench_eager", list(mode["models"]), [])
            if self.compile_on:
                self.bench("bench_compiled", ["qin"], ["train.compile=true"])
            else:
                r.skip("bench_compiled", "compile off (--no-compile)")
        else:
            why = f"no {mode['bench_preset']} data (data step: {self.report['data'].get('status')})"
            r.skip("bench_eager", why)
            r.skip("bench_compiled", why)
        self.write()

        variants = [run for run in runs if run["variant"] != "default"]
        if check_data.get("status") == "ok" and variants:
            self.results.update(guarded(r, "correctness", lambda: run_correctness(
                r, variants, work, limits["correctness_run"], self.jobs), {}))
        return self.write(final=True)

    def bench(self, name: str, models: list[str], sets: list[str]) -> None:
        argv = bench_argv(self.mode, self.py, self.root, self.device, models, sets)
        which = "compiled" if sets else "eager"
        self.raw_lines += guarded(self.r, name, lambda: step_bench(
            self.r, name, argv, self.mode["limits"][name], self.benches, self.mode, models, which), [])

    def write(self, final: bool = False) -> int:
        """gpu_check.json, gpu_check.md, bench_lines.jsonl and logs.tgz from what is known now; at
        the end also the markdown and the summary line on stdout. Returns the exit code."""
        r, report = self.r, self.report
        no_projection = {"folds": self.mode["folds"], "models": [], "total_seconds": None,
                         "problem": "not computed", "formula": "", "process_overhead_s": PROCESS_OVERHEAD_S,
                         "fold_overhead_s": FOLD_OVERHEAD_S, "blend_seconds": self.args.blend_seconds,
                         "blend_note": ""}
        report["correctness"] = guarded(r, "correctness report", lambda: correctness_report(
            self.mode, self.device, self.results, self.skipped), {
            "preset": self.mode["check_preset"], "device": self.device, "overrides": self.mode["check_sets"],
            "runs": [], "agreement": [], "skipped": self.skipped})
        report["bench"] = [self.benches[m] for m in self.mode["models"] if m in self.benches]
        data = report["data"]
        report["qin_full_epoch"] = guarded(r, "qin_full_epoch", lambda: qin_full_epoch(
            self.benches.get("qin", {}), data["rows"]), None) if data.get("rows") else None
        report["qin_full_epoch"] = report["qin_full_epoch"] or {"train_rows": None, "test_rows": None,
                                                                "variants": {}}
        report["projection"] = guarded(r, "projection", lambda: projection(
            self.benches, self.mode, data, self.args.blend_seconds), no_projection)
        report["projection_compiled"] = guarded(r, "projection", lambda: projection(
            self.benches, self.mode, data, self.args.blend_seconds, "compiled"), no_projection) \
            if self.compile_on else None
        report["raw_bench_lines"] = self.raw_lines
        report["targets"] = guarded(r, "targets", lambda: targets(report), [])
        report["steps"] = r.steps
        report["wall_seconds"] = round(r.elapsed(), 1)
        report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report["complete"] = final
        steps_ok = all(s["status"] == "ok" for s in r.steps)
        checks_ok = len(report["targets"]) >= 2 and all(t["pass"] for t in report["targets"][-2:])
        report["all_steps_ok"], report["correctness_ok"] = steps_ok, checks_ok
        md = guarded(r, "markdown", lambda: markdown(report), None)
        if md is None:  # still the lines and the JSON's place
            md = ("### GPU check: the report could not be formatted (see gpu_check.json, steps)\n\n"
                  "Raw lines printed by `tools/bench.py`, as printed:\n\n```\n"
                  + "".join(line + "\n" for line in self.raw_lines) + "```\n")
            report["steps"] = r.steps
        self.write_files(md)
        if final:
            print(md.split("Raw lines printed")[0], flush=True)
            r.say(f"wrote {self.out}: steps {'all ok' if steps_ok else 'NOT all ok'}, "
                  f"correctness {'PASS' if checks_ok else 'FAIL'}")
            sys.stderr.flush()
            line = guarded(r, "summary", lambda: json.dumps(summary(report), default=str),
                           json.dumps({"mode": self.mode_name, "summary": "failed: see gpu_check.json"}))
            print(SUMMARY_PREFIX + line, flush=True)  # the last line: what a cut-off reply still shows
        return 0 if steps_ok and checks_ok else 1

    def write_files(self, md: str) -> None:
        files = {"gpu_check.json": json.dumps(self.report, indent=1, default=str) + "\n",
                 "gpu_check.md": md, "bench_lines.jsonl": "".join(line + "\n" for line in self.raw_lines)}
        for name, text in files.items():
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            if self.r.logs.is_dir():
                for path in sorted(self.r.logs.iterdir()):  # a log still being written: as far as it goes
                    tar.add(path, arcname=f"logs/{path.name}")
        tmp = self.out / ".logs.tgz.tmp"
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(self.out / "logs.tgz")


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    sys.exit(main())
