"""The GPU check's settings and steps: the environment, the data, the correctness runs, the
benches and the projection (tools/verify/gpu_check.py)."""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from gpu_check_runner import REPO, Runner, first_line
from mmctr.common import CONFIG_DIR, load_config as load_config_file


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
    "qin_plus": (4, "the authors' log: best valid AUC at epoch 1 (docs/spec/qin.md), patience 3"),
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
        # run.sh --preset full's model list; qin, dcnv2_tf and din_tf are the published configs
        "models": {"qin": "qin", "qin_plus": "qin_plus", "dcnv2_tf": "dcnv2_tf", "din_tf": "din_tf",
                   "transformer_dcn": "transformer_dcn_gpu", "simqin": "simqin"},
        "check_sets": ["train.batch_size=1024", "train.max_epochs=3"], "model_sets": {},
        "variants": {"qin": ("fp32", "compile", "rerun"), "dcnv2_tf": ("fp32", "compile"),
                     "din_tf": ("fp32", "compile")},
        # bench steps per config: QIN one whole epoch (the targets), the others enough for a rate
        "bench_steps": {"qin": "epoch", "qin_plus": 40, "dcnv2_tf": 60, "din_tf": 60, "transformer_dcn": 40,
                        "simqin": 60},
        "warmup": 10, "budget": 470, "jobs": 6, "compile": True, "peak": [],
        # bench_eager profiles each config (tools/bench.py --profile); bench_graphs is QIN's epoch
        # with its step replayed from CUDA graphs
        "profile_steps": 5, "graphs_flags": [],
        "limits": {"environment": 60, "check_data": 120, "bench_data": 300, "correctness_run": 150,
                   "bench_eager": 210, "bench_graphs": 120, "bench_compiled": 180},
    },
    "cpu": {  # the rehearsal: every GPU-mode path on small data (tests/test_gpu_check.py)
        "device": "cpu", "check_preset": "tiny", "bench_preset": "tiny", "folds": 3,
        # the bench data in a folder of its own under the data root (GPU mode: the data root
        # itself): the same preset as the check data, still generated and preprocessed by the
        # bench data step, beside the check data, as the full preset is on a GPU
        "bench_root": "bench",
        "models": {"qin": "qin_small", "qin_plus": "qin_plus_small", "dcnv2_tf": "dcnv2_tf_small",
                   "din_tf": "din_tf_small", "transformer_dcn": "transformer_dcn_small", "simqin": "simqin_small"},
        "check_sets": ["train.batch_size=128", "train.max_epochs=2"],
        # compiled code draws its own dropout masks: on the tiny preset's 2,000 held-out rows that
        # noise alone moves the fold AUC by 0.05; without dropout the compiled step is the eager
        # one (tests/test_train.py), so the rehearsal's agreement can be judged
        "model_sets": {"qin": ["model.dropout=0.0"]},
        "variants": {"qin": ("fp32", "compile", "rerun")},
        "bench_steps": {"qin": "epoch", "qin_plus": 2, "dcnv2_tf": 2, "din_tf": 2, "transformer_dcn": 2,
                        "simqin": 2},
        # the compiled bench builds the very QIN of the compiled correctness run (its model_sets):
        # the same graphs, so that run loads them from the inductor cache (TORCHINDUCTOR_CACHE_DIR)
        # instead of compiling them again (a CPU compiles for half a minute; the rows dimension is
        # dynamic, so the batch sizes may differ)
        "bench_sets": {"compiled": ["model.dropout=0.0"]},
        "warmup": 1, "budget": 600, "jobs": 2, "compile": True, "peak": ["--peak-tflops", "matmul"],
        # a CPU has no CUDA graphs: fit's graph path runs with every capture a call of the function
        "profile_steps": 1, "graphs_flags": ["--rehearse-cuda-graphs"],
        "limits": {"environment": 60, "check_data": 90, "bench_data": 120, "correctness_run": 300,
                   "bench_eager": 240, "bench_graphs": 120, "bench_compiled": 300},
    },
}
PUBLISHED = ("qin", "dcnv2_tf", "din_tf")
# the bench steps' figures per model: eager (every config), compiled and graphs (QIN's epoch with
# train.compile=true, with train.cuda_graphs=true); each step's --set
BENCH_KINDS = ("eager", "compiled", "graphs")
BENCH_SETS = {"eager": [], "compiled": ["train.compile=true"], "graphs": ["train.cuda_graphs=true"]}
BENCH_LABELS = {"eager": "eager", "compiled": "compiled", "graphs": "CUDA graphs"}
PROFILE_FILE = "profile.json"  # bench_eager's --profile, written into the output folder
VARIANT_SETS = {"fp32": ["train.bf16=false"], "compile": ["train.compile=true"], "rerun": []}
COMPARISONS = {"fp32": "bf16 autocast vs float32 (TF32 matmuls on CUDA)",
               "compile": "torch.compile vs eager", "rerun": "eager vs eager rerun (run-to-run noise)"}
REPORT_ORDER = {"default": 0, "fp32": 1, "compile": 2, "rerun": 3}


# ---------------------------------------------------------------------------------------------
# configs (read-only: batch size, max_epochs, patience for the step counts and the projection)
# ---------------------------------------------------------------------------------------------

def load_config(name: str) -> dict:
    """configs/<name>.yaml with its bases (read-only: batch size, epochs, patience)."""
    return load_config_file(CONFIG_DIR / f"{name}.yaml")


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


def bench_root(mode: dict, root: Path) -> Path:
    """Where the bench preset lives: the data root, or the mode's folder under it."""
    return root / mode["bench_root"] if mode.get("bench_root") else root


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
                "fraction_of_peak", "peak_memory_bytes", "dtype", "batch_size", "steps", "params", "cuda_graphs")


def bench_argv(mode: dict, py: str, root: Path, device: str, models: list[str], sets: list[str],
               extra: list[str] = ()) -> list[str]:
    argv = [py, "tools/bench.py", "--preset", mode["bench_preset"], "--data-root", str(bench_root(mode, root)),
            "--device", device, "--warmup", str(mode["warmup"]), *mode["peak"]]
    for model in models:
        argv += ["--config", f"configs/{mode['models'][model]}.yaml@{mode['bench_steps'][model]}"]
    return argv + [a for s in sets for a in ("--set", s)] + list(extra)


def empty_bench(mode: dict, model: str) -> dict:
    return {"model": model, "config": mode["models"][model], **{kind: {} for kind in BENCH_KINDS}, "status": {}}


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
        entry = benches.setdefault(model, empty_bench(mode, model))
        entry[which][rec["measure"]] = {k: rec.get(k) for k in BENCH_FIELDS if k in rec}
        entry["device_name"] = rec.get("device_name")
    for model in models:  # the step's status for every config it was meant to measure
        entry = benches.setdefault(model, empty_bench(mode, model))
        entry["status"][which] = step["status"] if entry[which].get("predict") else (
            "not measured: " + step["status"])
    return raw


def ratio_to_eager(bench: dict, which: str) -> dict | None:
    eager, other = bench.get("eager", {}), bench.get(which, {})
    if not all(part.get(m) for part in (eager, other) for m in ("train", "predict")):
        return None
    return {m: other[m]["rows_per_s"] / eager[m]["rows_per_s"] for m in ("train", "predict")}


def traffic_figures(traffic: dict) -> dict:
    floor = (traffic.get("floors") or {}).get(traffic.get("floor_gpu")) or {}
    return {"traffic_gb_per_step": traffic.get("gb_per_step"), "memory_floor_ms": floor.get("memory_ms"),
            "floor_gpu": traffic.get("floor_gpu")}


def profile_report(path: Path) -> dict:
    """The profile bench_eager wrote (tools/bench.py --profile), per config the figures the report
    shows: step time, launches and the GPU's idle time per step, the three top kernels or ops, and
    the traffic model's GB per step with the time that traffic takes at its GPU's bandwidth."""
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"file": path.name, "status": f"not written ({type(exc).__name__})", "configs": []}
    configs = []
    for c in profile.get("configs", []):
        configs.append({k: c.get(k) for k in ("config", "variant", "run", "device", "batch_size", "profiled_steps",
                                              "step_ms", "unprofiled_step_ms", "launches_per_step", "launches_what",
                                              "launch_calls_per_step", "gpu_busy_ms_per_step",
                                              "gpu_idle_ms_per_step", "cpu_self_ms_per_step")}
                       | {"top3": [{k: t.get(k) for k in ("name", "calls_per_step", "ms_per_step", "pct_of_step")}
                                   for t in c.get("top", [])[:3]]}
                       | traffic_figures(c.get("traffic") or {}))
    return {"file": path.name, "status": "ok", "torch": profile.get("torch"), "configs": configs}


def qin_full_epoch(bench: dict, rows: dict) -> dict:
    n_train, n_test = rows["train"], rows["test"]
    out = {"train_rows": n_train, "test_rows": n_test, "variants": {}}
    for which in BENCH_KINDS:
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
    """run.sh --preset <bench preset>: generate + preprocess + K folds x models + the refit of the
    single network + blend. The refit's model is chosen after the folds (the best OOF AUC), so the
    slowest refit stands for it."""
    rows, k = data.get("rows") or {}, mode["folds"]
    result = {"folds": k, "rows_per_s": which, "process_overhead_s": PROCESS_OVERHEAD_S,
              "fold_overhead_s": FOLD_OVERHEAD_S, "blend_seconds": blend_s,
              "blend_note": "assumed, not measured: the GPU image has no lightgbm",
              "generate_seconds": data.get("generate_seconds"), "preprocess_seconds": data.get("preprocess_seconds"),
              "models": [], "formula": ("per epoch = train rows x (K-1)/K / train rows/s + (held-out fold + "
                                        "valid rows) / predict rows/s; per fold = epochs x per epoch + test "
                                        "rows / predict rows/s + fold overhead; per model = K x per fold + "
                                        "process overhead; refit = epochs x (train rows / train rows/s + "
                                        "valid rows / predict rows/s) + test rows / predict rows/s + fold "
                                        "and process overhead, the slowest model's")}
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
        # the refit: every train row an epoch, the valid split scored after each (refit_epochs valid,
        # the published configs) or not at all (folds: the folds' median best epoch, no early stopping)
        scored = n_valid / predict["rows_per_s"] if cfg.get("refit_epochs", "valid") == "valid" else 0.0
        refit_epoch = n_train / train["rows_per_s"] + scored
        entry.update(epoch_seconds=per_epoch, fold_seconds=epochs * per_epoch + per_fold_fixed,
                     model_seconds=k * (epochs * per_epoch + per_fold_fixed) + PROCESS_OVERHEAD_S,
                     model_seconds_max_epochs=k * (max_epochs * per_epoch + per_fold_fixed) + PROCESS_OVERHEAD_S,
                     refit_seconds=epochs * refit_epoch + per_fold_fixed + PROCESS_OVERHEAD_S,
                     refit_seconds_max_epochs=max_epochs * refit_epoch + per_fold_fixed + PROCESS_OVERHEAD_S)
        result["models"].append(entry)
    fixed = (data.get("generate_seconds") or 0.0) + (data.get("preprocess_seconds") or 0.0) + blend_s
    if missing:
        result.update(total_seconds=None, problem=f"incomplete: no {which} figure for {', '.join(missing)}")
    else:
        done = result["models"]
        slowest = max(done, key=lambda m: m["refit_seconds"])
        result.update(refit_seconds=slowest["refit_seconds"], refit_model=slowest["model"])
        result["total_seconds"] = fixed + sum(m["model_seconds"] for m in done) + slowest["refit_seconds"]
        result["total_seconds_max_epochs"] = fixed + sum(m["model_seconds_max_epochs"] for m in done) + max(
            m["refit_seconds_max_epochs"] for m in done)
        published = [m for m in done if m["model"] in PUBLISHED]
        result["total_seconds_published_only"] = fixed + sum(m["model_seconds"] for m in published) + max(
            m["refit_seconds"] for m in published)
        result["pass"] = result["total_seconds"] < TARGETS["run_sh_full_seconds"]
    return result
