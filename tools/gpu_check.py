"""The GPU check: one command that proves the models on CUDA and measures the issue's targets.

    bash tools/gpu_check.sh [--cpu] [--out DIR] [--data-root DIR] [--budget SECONDS] [--jobs N]
                            [--compile | --no-compile] [--blend-seconds S]

Built for short GPU slots on a bare image (no network, no lightgbm, torch/numpy/pandas/pyarrow/
PyYAML present): it never installs anything and runs the stages only through their command lines
(src/make_synthetic.py, src/preprocess.py, src/train.py, tools/bench.py), as subprocesses of this
Python (${PYTHON:-python3}), each with its own time limit, so a failing or slow step is recorded
and the next one still runs. It imports nothing from the repository (and never lightgbm).

Steps (GPU mode; --cpu runs the same steps on the tiny preset with the *_small configs):

1. environment: Python, torch, CUDA, the device (nvidia-smi when present).
2. data: the demo preset (for the correctness runs), then, in the background while step 3 runs,
   the full preset generated (make_synthetic.py) and preprocessed (preprocess.py --force), timed.
3. correctness: fold 0 of every model of `run.sh --preset full` on the demo preset (batch 1024,
   3 epochs), by train.py on CUDA: every epoch's train loss finite, fold and valid AUC above
   AUC_ABOVE_CHANCE, test predictions finite probabilities. The published configs also run with
   train.bf16=false (float32 with TF32 matmuls) and train.compile=true, QIN once more as is (the
   run-to-run noise of CUDA): a variant agrees with the default run (bf16 autocast, eager) when
   its fold and valid AUCs are within AUC_TOLERANCE and its mean test prediction within
   MEAN_PRED_TOLERANCE. Two trainings are compared, not two forward passes of the same weights
   (no stage CLI predicts from a checkpoint): one epoch of drift apart is already visible in single
   predictions (their logit correlation and mean |difference| are recorded, not judged).
4. bench: tools/bench.py on the full preset for qin, dcnv2_tf and din_tf with
   --compare train.compile=true (QIN with --steps ceil(train rows / batch): one full epoch of the
   3.6M rows, and the whole 379,142-row test split), then transformer_dcn_gpu eagerly (for the
   projection). Every JSON line bench printed is kept as printed.
5. projection of `run.sh --preset full` from the measured rows/s and the epochs each config is
   assumed to run (EPOCH_ASSUMPTIONS), against the 1-hour target.

Outputs in --out (default $OUT when set, else gpu_check_out/): gpu_check.json (everything),
gpu_check.md (a section for docs/BENCHMARKS.md), bench_lines.jsonl (bench's lines as printed),
logs/ (stdout and stderr of every command). Generated data goes to --data-root (default
${TMPDIR:-/tmp}/gpu_check_data), never into the repository or --out; a rerun reuses the presets
there (and their recorded generation time). Exit code 0 when every step ran and every
correctness check passed; 1 otherwise (the speed targets are reported, they do not fail the run).
"""
from __future__ import annotations

import argparse
import datetime
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
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 20242025  # run.sh's and bench.py's preset seed: the same files as theirs

AUC_ABOVE_CHANCE = 0.55     # fold and valid AUC of every correctness run must exceed this
AUC_TOLERANCE = 0.01        # |AUC(variant) - AUC(default)|, fold and valid
MEAN_PRED_TOLERANCE = 0.02  # |mean test prediction(variant) - mean(default)|: calibration

TARGETS = {  # the issue's targets
    "qin_train_rows_per_s": 1_000_000,  # at least
    "qin_epoch_seconds": 5.0,           # below, one epoch of the 3.6M train rows
    "qin_test_predict_seconds": 1.0,    # below, the 379,142 test rows
    "run_sh_full_seconds": 3600.0,      # below, run.sh --preset full
}

# Epochs per fold each config is assumed to run in run.sh (early stopping decides the real count).
# typical: the count the projection uses (capped by the config's max_epochs); the config's
# max_epochs gives the upper bound.
EPOCH_ASSUMPTIONS = {
    "qin": (41, "QIN's released run: best epoch 33 of 41 (docs/spec/competition.md), patience 8"),
    "dcnv2_tf": (5, "no documented count: assumed best epoch 2 + patience 3"),
    "din_tf": (5, "no documented count: assumed best epoch 2 + patience 3"),
    "transformer_dcn": (7, "no documented count: assumed best epoch 2 + patience 5"),
}
PROCESS_OVERHEAD_S = 30.0  # assumed per train.py process: imports, CUDA context, data upload
FOLD_OVERHEAD_S = 2.0      # assumed per fold: model build, checkpoint and prediction files

MODES = {
    "gpu": {
        "device": "cuda", "check_preset": "demo", "bench_preset": "full", "folds": 5,
        # run.sh --preset full's model list; the first three are the published configs
        "models": {"qin": "qin", "dcnv2_tf": "dcnv2_tf", "din_tf": "din_tf",
                   "transformer_dcn": "transformer_dcn_gpu"},
        "check_sets": ["train.batch_size=1024", "train.max_epochs=3"],
        # variants of the default run: the published configs in float32 and compiled, QIN rerun
        "variants": {"qin": ("fp32", "compile", "rerun"), "dcnv2_tf": ("fp32", "compile"),
                     "din_tf": ("fp32", "compile")},
        "bench_steps": {"dcnv2_tf": (50, 10), "din_tf": (50, 10), "transformer_dcn": (20, 5)},
        "qin_warmup": 10, "budget": 460, "jobs": 6, "compile": True, "peak": [],
        "timeouts": {"environment": 60, "demo_data": 90, "full_generate": 300, "full_preprocess": 150,
                     "correctness": 200, "correctness_run": 150, "bench_qin": 150, "bench_dcnv2_tf": 100,
                     "bench_din_tf": 120, "bench_transformer_dcn": 90},
    },
    "cpu": {  # the same steps, small enough for the test suite: tiny preset, *_small configs
        "device": "cpu", "check_preset": "tiny", "bench_preset": "tiny", "folds": 3,
        "models": {"qin": "qin_small", "dcnv2_tf": "dcnv2_tf_small", "din_tf": "din_tf_small",
                   "transformer_dcn": "transformer_dcn_small"},
        "check_sets": ["train.batch_size=128", "train.max_epochs=2"],
        # on a CPU float32 is the default anyway (bf16 is CUDA only): one variant runs the plumbing
        "variants": {"qin": ("fp32", "compile")},
        "bench_steps": {"dcnv2_tf": (2, 1), "din_tf": (2, 1), "transformer_dcn": (2, 1)},
        # generous limits: about 40 s in all on 2 idle cores, but a shared machine can be 3x slower
        "qin_warmup": 1, "budget": 420, "jobs": 2, "compile": False, "peak": ["--peak-tflops", "matmul"],
        "timeouts": {"environment": 60, "demo_data": 60, "full_generate": 60, "full_preprocess": 60,
                     "correctness": 240, "correctness_run": 180, "bench_qin": 90, "bench_dcnv2_tf": 90,
                     "bench_din_tf": 90, "bench_transformer_dcn": 90},
    },
}
PUBLISHED = ("qin", "dcnv2_tf", "din_tf")
RESERVE_S = 10.0  # kept back from the budget for writing the report


# ---------------------------------------------------------------------------------------------
# running commands with time limits
# ---------------------------------------------------------------------------------------------

class Runner:
    """Runs commands as subprocesses with per-command limits inside one overall deadline."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.started = out, time.monotonic()
        self.deadline = self.started + budget_s
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict] = []
        self.lock = threading.Lock()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
        """Start a command (stdout and stderr to logs/<name>.out|.err); finish() waits for it."""
        limit_s = min(limit_s, self.left())
        job = {"name": name, "command": shlex.join(argv), "timeout_s": round(limit_s, 1),
               "stdout": self.logs / f"{name}.out", "stderr": self.logs / f"{name}.err"}
        if limit_s < 5:
            job["status"] = "skipped"
            return job
        with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
            job["proc"] = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=self.env,
                                           start_new_session=True)  # its own group: killable whole
        self.live.add(job["proc"])
        job["t0"] = time.monotonic()
        return job

    def poll(self, job: dict) -> bool:
        """True once the job is over (finished, killed for its limit, or never started)."""
        if "proc" not in job:
            return True
        if job["proc"].poll() is not None:
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
            step.update(status="skipped", seconds=0.0, error="out of time (overall budget)")
            return self.record(step)
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
        else:  # first line: why, and the command's last words (an "error: ..." line if it left one)
            last = tail(job["stderr"]) or tail(job["stdout"])
            errors = [line for line in last.splitlines() if line.lower().startswith(("error", "traceback"))
                      or "Error" in line]
            step["error"] += f": {(errors or last.splitlines() or [''])[-1].strip()[:300]}\n{last}"
        return self.record(step)

    def kill_all(self) -> None:
        for proc in list(self.live):
            self.kill(proc)

    def run(self, name: str, argv: list[str], limit_s: float) -> dict:
        return self.finish(self.start(name, argv, limit_s))

    def run_all(self, jobs: list[tuple[str, list[str], float]], parallel: int, deadline_s: float) -> dict:
        """Run (name, argv, limit) commands, `parallel` at a time, none started after deadline_s
        from now; returns name -> step."""
        step_deadline = time.monotonic() + deadline_s
        pending, running, done = list(jobs), [], {}
        while pending or running:
            while pending and len(running) < parallel:
                name, argv, limit = pending.pop(0)
                limit = min(limit, step_deadline - time.monotonic())
                if limit < 5:
                    done[name] = self.skip(name, "out of time (correctness step budget)")
                    continue
                running.append(self.start(name, argv, limit))
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
for name in ("numpy", "pandas", "pyarrow", "yaml", "sklearn", "scipy"):
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


def step_environment(r: Runner, py: str, mode: str) -> dict:
    step = r.run("environment", [py, "-c", ENV_SNIPPET], 60)
    env = {}
    if step["status"] == "ok":
        env = json.loads((r.logs / "environment.out").read_text().strip().splitlines()[-1])
    if mode == "gpu" and not env.get("cuda_available"):
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


def prepare_preset(r: Runner, py: str, root: Path, preset: str, label: str, gen_limit: float,
                   prep_limit: float) -> dict:
    """Generate the preset unless it is there (timed, the time kept beside it), preprocess it
    (always, --force: timed); returns the data record."""
    raw, work = data_dirs(root, preset)
    timing_file = root / f"gpu_check_timing_{preset}.json"
    record = {"preset": preset, "raw_dir": str(raw), "work_dir": str(work)}
    if (raw / "item_info.parquet").is_file() and timing_file.is_file():  # written last: complete
        record.update(reused=True, **json.loads(timing_file.read_text()))
    else:
        step = r.run(f"{label}_generate", [py, "src/make_synthetic.py", "--preset", preset, "--out",
                                           str(raw), "--seed", str(SEED)], gen_limit)
        record["reused"] = False
        if step["status"] != "ok":
            record["status"] = step["status"]
            return record
        record["generate_seconds"] = step["seconds"]
        timing_file.write_text(json.dumps({"generate_seconds": step["seconds"]}))
    step = r.run(f"{label}_preprocess", [py, "src/preprocess.py", "--config", "configs/data.yaml",
                                         *data_sets(root, preset), "--force"], prep_limit)
    record["status"] = step["status"]
    if step["status"] == "ok":
        record["preprocess_seconds"] = step["seconds"]
        manifest = json.loads((work / "processed" / "manifest.json").read_text())
        record["rows"] = manifest["n_rows"]
    return record


def correctness_jobs(mode: dict, py: str, root: Path, device: str, compile_on: bool) -> list[dict]:
    runs = []
    for model, config in mode["models"].items():
        wanted = [("default", [])] + [(v, VARIANT_SETS[v]) for v in mode["variants"].get(model, ())
                                      if v != "compile" or compile_on]
        for variant, extra in wanted:
            run_name = f"gpucheck_{model}_{variant}"
            sets = [*mode["check_sets"], f"run.name={run_name}", *extra]
            argv = [py, "src/train.py", "--config", f"configs/{config}.yaml",
                    *data_sets(root, mode["check_preset"]), *[a for s in sets for a in ("--set", s)],
                    "--folds", "0", "--device", device]
            runs.append({"model": model, "config": config, "variant": variant, "run_name": run_name,
                         "overrides": sets, "argv": argv})
    order = {"compile": 0, "default": 1, "fp32": 2, "rerun": 3}  # the slowest (compiling) first
    return sorted(runs, key=lambda run: order[run["variant"]])


REPORT_ORDER = {"default": 0, "fp32": 1, "compile": 2, "rerun": 3}


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


VARIANT_SETS = {"fp32": ["train.bf16=false"], "compile": ["train.compile=true"], "rerun": []}
COMPARISONS = {"fp32": "bf16 autocast vs float32 (TF32 matmuls on CUDA)",
               "compile": "torch.compile vs eager", "rerun": "eager vs eager rerun (run-to-run noise)"}


def step_correctness(r: Runner, mode: dict, py: str, root: Path, device: str, compile_on: bool,
                     jobs: int) -> dict:
    runs = correctness_jobs(mode, py, root, device, compile_on)
    work = data_dirs(root, mode["check_preset"])[1]
    for run in runs:  # train.py would reuse the finished folds of an earlier check: start afresh
        shutil.rmtree(work / "runs" / run["run_name"], ignore_errors=True)
    limit = mode["timeouts"]["correctness_run"]
    steps = r.run_all([(f"train_{run['run_name']}", run["argv"], limit) for run in runs], jobs,
                      min(mode["timeouts"]["correctness"], r.left()))
    results = {}
    for run in runs:
        step = steps[f"train_{run['run_name']}"]
        if step["status"] == "ok":
            results[(run["model"], run["variant"])] = read_run(run, work)
        else:
            results[(run["model"], run["variant"])] = {
                **{k: run[k] for k in ("model", "config", "variant", "run_name", "overrides")},
                "passed": False, "problem": f"train.py {step['status']}: {first_line(step.get('error'))}"}
    models = list(mode["models"])
    results = dict(sorted(results.items(), key=lambda kv: (models.index(kv[0][0]), REPORT_ORDER[kv[0][1]])))
    pairs = []
    for (model, variant), other in results.items():
        if variant != "default":
            pairs.append(agreement(results[(model, "default")], other, COMPARISONS[variant]))
    skipped = []
    if not compile_on:
        skipped.append("train.compile=true (compile disabled: --no-compile, the --cpu default)")
    clean = [{k: v for k, v in res.items() if not k.startswith("_")} for res in results.values()]
    return {"preset": mode["check_preset"], "device": device, "fold": 0, "overrides": mode["check_sets"],
            "auc_above_chance": AUC_ABOVE_CHANCE, "runs": clean, "agreement": pairs,
            "skipped": skipped}


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


def step_bench(r: Runner, mode: dict, py: str, root: Path, device: str, compile_on: bool, model: str,
               n_train: int) -> tuple[dict, list[str]]:
    config = mode["models"][model]
    cfg = load_config(config)
    if model == "qin":  # one full epoch of the train split, the whole test split
        steps, warmup = math.ceil(n_train / cfg["train"]["batch_size"]), mode["qin_warmup"]
    else:
        steps, warmup = mode["bench_steps"][model]
    argv = [py, "tools/bench.py", "--config", f"configs/{config}.yaml", "--preset", mode["bench_preset"],
            "--data-root", str(root), "--device", device, "--steps", str(steps), "--warmup", str(warmup),
            *mode["peak"]]
    compiled = compile_on and model in PUBLISHED
    if compiled:
        argv += ["--compare", "train.compile=true"]
    step = r.run(f"bench_{model}", argv, mode["timeouts"][f"bench_{model}"])
    raw, records = parse_lines(r.logs / f"bench_{model}.out")  # kept even when the command failed
    result = {"model": model, "config": config, "status": step["status"], "steps": steps, "warmup": warmup,
              "compile_compared": compiled}
    return {**result, **bench_figures(records)}, raw


def bench_figures(records: list[dict]) -> dict:
    """bench.py's records of one config: eager (baseline) and compiled figures, the compare ratios."""
    result = {"eager": {}, "compiled": {}, "compare": None}
    for rec in records:
        if rec.get("measure") in ("train", "predict"):
            which = "eager" if rec.get("variant") == "baseline" else "compiled"
            result[which][rec["measure"]] = {k: rec.get(k) for k in BENCH_FIELDS}
            result["device_name"] = rec.get("device_name")
        elif rec.get("measure") == "compare":
            result["compare"] = {k: rec.get(k) for k in ("train_ratio", "predict_ratio")}
    return result


def qin_full_epoch(bench: dict, rows: dict) -> dict:
    n_train, n_test = rows["train"], rows["test"]
    out = {"train_rows": n_train, "test_rows": n_test, "steps": bench.get("steps"), "variants": {}}
    for which in ("eager", "compiled"):
        train, predict = bench[which].get("train"), bench[which].get("predict")
        if not train or not predict:
            continue
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
              "blend_note": "assumed, not measured: blend.py imports lightgbm, absent on the GPU image",
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
             + (" (CPU mode: plumbing test, not a measurement)" if mode == "cpu" else ""), ""]
    lines += [f"`{report['command']}`: {fmt(report['wall_seconds'])} s wall (budget {report['budget_seconds']} s), "
              f"commit {env.get('git_commit') or '?'}. Python {env.get('python')}, torch {env.get('torch')} "
              f"(CUDA {env.get('torch_cuda')}), numpy {env.get('numpy')}, pandas {env.get('pandas')}; "
              f"{env.get('cpu_count')} CPU cores; nvidia-smi: {env.get('nvidia_smi')}.", ""]

    lines += ["#### Targets", "", "| target | measured | verdict |", "|---|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {verdict(t['pass'])} |")
    lines.append("")

    c = report["correctness"]
    lines += [f"#### 1. Correctness on {c['device']}: fold 0 of each model, {c['preset']} preset",
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

    d = report["data"]
    gen = "reused; an earlier run generated it with" if d.get("reused") else "generated by"
    during = " (in the background, while step 1 ran)" if d.get("background") else ""
    lines += [f"#### 2. The {d.get('preset')} preset and the published configs", "",
              f"Data: {gen} `make_synthetic.py --preset {d.get('preset')}` in {fmt(d.get('generate_seconds'))} s, "
              f"then `preprocess.py --force` in {fmt(d.get('preprocess_seconds'))} s{during}; "
              f"rows {json.dumps(d.get('rows'))}.", "",
              "| config | compile | dtype | train rows/s | train FLOPs/row | fraction of peak | peak mem train | "
              "predict rows/s | predict FLOPs/row | peak mem predict | status |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b in report["bench"]:
        for which in ("eager", "compiled"):
            tr, pr = b[which].get("train"), b[which].get("predict")
            if not tr and not (which == "eager" or b["compile_compared"]):
                continue
            tr, pr = tr or {}, pr or {}
            compiled = "yes" if which == "compiled" else "no"
            lines.append(f"| {b['config']} | {compiled} | {tr.get('dtype') or '—'} | "
                         f"{fmt(tr.get('rows_per_s'))} | {fmt(tr.get('flops_per_row'))} | "
                         f"{fmt(tr.get('fraction_of_peak'), 3)} | {mib(tr.get('peak_memory_bytes'))} | "
                         f"{fmt(pr.get('rows_per_s'))} | {fmt(pr.get('flops_per_row'))} | "
                         f"{mib(pr.get('peak_memory_bytes'))} | {b['status']} |")
        if b.get("compare"):
            lines.append(f"| {b['config']} compiled / eager | | | x{fmt(b['compare']['train_ratio'], 3)} | | | | "
                         f"x{fmt(b['compare']['predict_ratio'], 3)} | | | |")
    lines.append("")

    q = report["qin_full_epoch"]
    lines += [f"#### 3. One QIN epoch ({fmt(q.get('train_rows'))} train rows) and the test split "
              f"({fmt(q.get('test_rows'))} rows)", "",
              f"`bench.py --steps {fmt(q.get('steps'))}` (= ceil(train rows / batch)), whole test split.", "",
              "| compile | train rows/s (>= 1,000,000) | epoch s (< 5) | test predict s (< 1) | epoch + predict s |",
              "|---|---:|---:|---:|---:|"]
    for which, v in q.get("variants", {}).items():
        ok = v["pass"]
        compiled = "yes" if which == "compiled" else "no"
        lines.append(f"| {compiled} | {fmt(v['train_rows_per_s'])} {verdict(ok['train_rows_per_s'])} | "
                     f"{fmt(v['epoch_seconds'], 3)} {verdict(ok['epoch_seconds'])} | "
                     f"{fmt(v['test_predict_seconds'], 3)} {verdict(ok['test_predict_seconds'])} | "
                     f"{fmt(v['epoch_plus_predict_seconds'], 3)} |")
    lines.append("")

    p = report["projection"]
    lines += [f"#### 4. Projected `run.sh --preset {report['bench_preset']}` "
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
        tag = "compiled" if which == "compiled" else "eager"
        if not v:
            out.append({"target": f"QIN ({tag}) full epoch and test prediction", "measured": "not measured",
                        "pass": None if which == "compiled" else False})
            continue
        out += [
            {"target": f"QIN ({tag}) train rows/s >= 1,000,000", "measured": fmt(v["train_rows_per_s"]),
             "pass": v["pass"]["train_rows_per_s"]},
            {"target": f"QIN ({tag}) one epoch of {fmt(report['qin_full_epoch']['train_rows'])} rows < 5 s",
             "measured": f"{fmt(v['epoch_seconds'], 3)} s", "pass": v["pass"]["epoch_seconds"]},
            {"target": f"QIN ({tag}) prediction of the {fmt(report['qin_full_epoch']['test_rows'])} test rows < 1 s",
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


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="CPU mode: tiny preset, *_small configs, a few steps, device cpu (the test)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: $OUT when set, else gpu_check_out)")
    parser.add_argument("--data-root", default=None,
                        help="where presets are generated (default: ${TMPDIR:-/tmp}/gpu_check_data)")
    parser.add_argument("--budget", type=float, default=None,
                        help="overall seconds (default: 460 on GPU, 420 with --cpu); steps get what is left")
    parser.add_argument("--jobs", type=int, default=None,
                        help="correctness runs at a time (default: 4 on GPU, 2 with --cpu)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="compare train.compile=true (default on GPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled variants (default with --cpu: compiling takes minutes there)")
    parser.add_argument("--blend-seconds", type=float, default=300.0,
                        help="assumed blend time in the projection (default 300; not measurable without lightgbm)")
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
    mode = MODES[mode_name]
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    root = Path(args.data_root or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_data").resolve()
    root.mkdir(parents=True, exist_ok=True)
    budget = args.budget or mode["budget"]
    command = shlex.join(["bash", "tools/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    r = Runner(out, budget)
    try:
        return checked(args, r, mode_name, out, root, budget, command)
    except KeyboardInterrupt:  # stop what this script started: the commands run in their own groups
        r.say("interrupted: stopping the commands it started")
        r.kill_all()
        return 130


def checked(args, r: Runner, mode_name: str, out: Path, root: Path, budget: float, command: str) -> int:
    """The steps, the report; main() stops the commands if this is interrupted."""
    mode = MODES[mode_name]
    compile_on = mode["compile"] if args.compile is None else args.compile
    jobs = args.jobs or mode["jobs"]
    py, device = sys.executable, mode["device"]
    if mode_name == "cpu":  # jobs run side by side: one thread each, no spinning OpenMP threads fighting
        r.env.setdefault("OMP_NUM_THREADS", "1")
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    r.say(f"{mode_name} mode, output {out}, data {root}, budget {budget:.0f} s")
    t = mode["timeouts"]

    env = step_environment(r, py, mode_name)

    # data: the correctness preset first (seconds), the bench preset in the background
    check_data = guarded(r, "data", lambda: prepare_preset(
        r, py, root, mode["check_preset"], f"{mode['check_preset']}_data", t["demo_data"], t["demo_data"]),
        {"preset": mode["check_preset"], "status": "failed"})
    bench_data: dict = {}
    background = None
    if mode["bench_preset"] == mode["check_preset"]:
        bench_data = check_data
    else:
        def make_bench_data():
            bench_data.update(guarded(r, "data", lambda: prepare_preset(
                r, py, root, mode["bench_preset"], mode["bench_preset"], t["full_generate"],
                t["full_preprocess"]), {"status": "failed"}), background=True)
        background = threading.Thread(target=make_bench_data, daemon=True)
        background.start()

    no_correctness = {"preset": mode["check_preset"], "device": device, "fold": 0,
                      "overrides": mode["check_sets"], "auc_above_chance": AUC_ABOVE_CHANCE, "runs": [],
                      "agreement": [], "skipped": []}
    if check_data.get("status") == "ok":
        correctness = guarded(r, "correctness", lambda: step_correctness(
            r, mode, py, root, device, compile_on, jobs), no_correctness)
    else:
        correctness = {**no_correctness, "skipped": [f"every run: the {mode['check_preset']} data step failed"]}

    if background is not None:
        background.join(max(0.0, r.left()))
        if background.is_alive():  # its commands end at their own limits; do not wait for them
            bench_data = {"preset": mode["bench_preset"], "status": "timeout"}
    benches, raw_lines = {}, []
    if bench_data.get("status") == "ok":
        for model in mode["models"]:
            result, raw = guarded(r, f"bench_{model}", lambda: step_bench(
                r, mode, py, root, device, compile_on, model, bench_data["rows"]["train"]), (None, []))
            if result:
                benches[model] = result
            raw_lines += raw
    else:
        r.skip("bench", f"no {mode['bench_preset']} data (data step: {bench_data.get('status')})")
    (out / "bench_lines.jsonl").write_text("".join(line + "\n" for line in raw_lines))

    empty_bench = {"eager": {}, "compiled": {}, "steps": None}
    no_epoch = {"train_rows": None, "test_rows": None, "steps": None, "variants": {}}
    no_projection = {"folds": mode["folds"], "models": [], "total_seconds": None, "problem": "not computed",
                     "formula": "", "process_overhead_s": PROCESS_OVERHEAD_S, "fold_overhead_s": FOLD_OVERHEAD_S,
                     "blend_seconds": args.blend_seconds, "blend_note": ""}
    report = {
        "schema": 1, "mode": mode_name, "command": command, "started_utc": started_utc,
        "budget_seconds": budget, "device": device, "check_preset": mode["check_preset"],
        "bench_preset": mode["bench_preset"], "data_root": str(root), "environment": env,
        "correctness": correctness,
        "data": {k: v for k, v in bench_data.items()},
        "bench": list(benches.values()),
        "qin_full_epoch": no_epoch,
        "projection": guarded(r, "projection", lambda: projection(benches, mode, bench_data, args.blend_seconds),
                              no_projection),
        "projection_compiled": guarded(r, "projection", lambda: projection(
            benches, mode, bench_data, args.blend_seconds, "compiled"), no_projection) if compile_on else None,
        "raw_bench_lines": raw_lines,
    }
    if bench_data.get("rows"):
        report["qin_full_epoch"] = guarded(r, "qin_full_epoch", lambda: qin_full_epoch(
            benches.get("qin", empty_bench), bench_data["rows"]), no_epoch)
    report["targets"] = guarded(r, "targets", lambda: targets(report), [])
    report["steps"] = r.steps
    report["wall_seconds"] = round(r.elapsed(), 1)
    report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    steps_ok = all(s["status"] == "ok" for s in r.steps)
    checks_ok = len(report["targets"]) >= 2 and all(t["pass"] for t in report["targets"][-2:])
    report["all_steps_ok"], report["correctness_ok"] = steps_ok, checks_ok

    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = guarded(r, "markdown", lambda: markdown(report), None)
    if md is None:  # still the lines and the JSON's place
        md = ("### GPU check: the report could not be formatted (see gpu_check.json, steps)\n\n"
              "Raw lines printed by `tools/bench.py`, as printed:\n\n```\n"
              + "".join(line + "\n" for line in raw_lines) + "```\n")
        report["steps"] = r.steps
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(md)
    print(md.split("Raw lines printed")[0])
    r.say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}: steps "
          f"{'all ok' if steps_ok else 'NOT all ok'}, correctness {'PASS' if checks_ok else 'FAIL'}")
    return 0 if steps_ok and checks_ok else 1


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    sys.exit(main())
