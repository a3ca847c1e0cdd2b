"""The speed check of issue 31: one command on one H100/H200 (about 8 minutes) that measures every
speed option of fit.py against the default step on the configs of the issue's targets.

    bash tools/gpu_speed.sh [--cpu] [--out DIR] [--data-root DIR] [--budget SECONDS] [--repeats N]
                            [--step-limit NAME=SECONDS ...]

Built like the GPU check (tools/verify/gpu_check.py, whose runner and data steps it uses): no
installs, no network, no lightgbm; every stage through its command line (make_synthetic.py,
preprocess.py, tools/bench.py) as a subprocess with its own time limit inside one budget; a step
that fails or runs out of time is recorded and the next one still runs. Steps, in order:

1. environment: Python, torch, CUDA, the device.
2. data: the demo preset (a few seconds), and in the background the full preset (generated with one
   process per core, preprocessed): 3.6M train rows, the 379,142 test rows of the targets.
3. same_function, on the demo preset while the full one is made (the GPU is idle otherwise): one
   bench.py process, every config @0 with --same-function and every training-step option (OPTIONS):
   from the same weights at each step, the option's loss, gradients and update against the
   default step's, beside a rerun of the default step (the device's own noise). An option agrees
   when each difference is within max(NOISE_FACTOR x the rerun's, the CPU's measured tolerance).
4. speed, one bench.py process per config (CONFIGS, in the order of what its figure is worth):
   --compare each option, --repeats (3: medians), data uploaded once per process; a config's own
   variants too (model_options: QIN with its whole test split in one eval batch, Transformer +
   DCNv2 at the other batch size its GPU config was chosen against); QIN always predicts the whole
   379,142-row test split, the others --predict-rows (prediction is not their target). Each profiles its
   baseline and its cuda_graphs variant (bench.py --profile: top kernels, launches and GPU idle
   time per step), merged into PROFILE_FILE.
5. compiled, while at least COMPILED_MIN_LEFT seconds of the budget remain: din_tf and dcnv2_tf
   with train.compile=true, one bench.py process each (one repeat, the compile in its warm-up),
   filed as their config's "train.compile=true" variant: the traffic model (docs/BENCHMARKS.md)
   puts din_tf's 1M rows/s out of any eager step's reach (its memory floor is above the 8.2 ms a
   step may take), and dcnv2_tf runs at 9x its floor,
   so fused kernels are what may reach their targets.
6. the targets of issue 31 from the medians (reported, not enforced); a compiled variant counts as
   an option.

Outputs, at most MAX_OUT_FILES files in --out (default $OUT when set, else gpu_speed_out/),
rewritten after every step: gpu_speed.json (everything), gpu_speed.md (tables for
docs/BENCHMARKS.md), profile.json, bench_lines.jsonl (bench's lines as printed) and logs.tgz. The
last line on stdout is SUMMARY_PREFIX and a one-line JSON of every figure. Exit code 0 when every
step ran and every option agreed with the default step. --cpu rehearses all of it on the tiny
preset with the *_small configs and fit's CUDA-graph path rehearsed (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import sys
import threading
import traceback
from pathlib import Path

from gpu_check_report import (PROFILE_FIELDS, cell, fmt, profile_summary, profile_table, rounded, steps_and_raw_lines,
                               verdict, write_outputs)
from gpu_check_runner import Runner
from gpu_check_steps import MAX_OUT_FILES, parse_lines, prepare_preset, profile_report, step_environment

SUMMARY_PREFIX = "GPU_SPEED_SUMMARY "
PROFILE_FILE = "profile.json"
OUT_FILES = ("gpu_speed.json", "gpu_speed.md", PROFILE_FILE, "bench_lines.jsonl", "logs.tgz")
assert len(OUT_FILES) <= MAX_OUT_FILES  # what a device call brings back
OPTIONS = ["train.cuda_graphs=true", "train.foreach_l2=true"]  # fit.py's training-step options
COMPILED = "train.compile=true"  # measured in a process of its own (the compile), after the others
COMPILED_MIN_LEFT = 150.0  # seconds of the budget a compiled step needs to start
PROFILED = ["baseline", "train.cuda_graphs=true"]
NOISE_FACTOR = 10.0
# the CPU's tolerances (tests/test_fit.py, SAME_STEP_UPDATE_TOL: loss and gradients bit for bit on a
# CPU; the update within 4 float32 ulps of a unit weight when the update is lr = 2e-3), the floor
# below a device's own noise
CPU_TOLERANCE = {"loss_rel_diff": 1e-6, "grad_rel_diff": 1e-6, "update_rel_diff": 2.5e-4}
TARGETS = {  # issue 31 item 3: train rows/s on one H100 or H200, medians of 3 repeats
    "qin": (1_000_000, 1_500_000), "din_tf": (1_000_000, 1_000_000), "dcnv2_tf": (1_000_000, 1_000_000),
    "simqin": (700_000, 700_000), "transformer_dcn": (100_000, 100_000)}  # (default step, best option)
QIN_PREDICT_SECONDS = 0.1  # the 379,142 test rows

MODES = {
    "gpu": {
        "device": "cuda", "check_preset": "demo", "bench_preset": "full", "budget": 470, "repeats": 3,
        "warmup": 10, "profile_steps": 5, "flags": [], "sets": [], "predict_rows": 65536,
        # model -> (config, timed steps per measurement)
        "configs": {"qin": ("qin", 60), "din_tf": ("din_tf", 40), "dcnv2_tf": ("dcnv2_tf", 40),
                    "simqin": ("simqin", 40), "transformer_dcn": ("transformer_dcn_gpu", 30)},
        # a config's own variants: not training-step options, so no "best option" of the targets
        "model_options": {"qin": ["train.eval_batch_size=393216"],  # the whole test split in one batch
                          "transformer_dcn": ["train.batch_size=4096"]},
        "compiled": ["din_tf", "dcnv2_tf"],
        "limits": {"environment": 60, "check_data": 60, "bench_data": 300, "same_function": 200,
                   "speed_qin": 120, "speed_din_tf": 90, "speed_dcnv2_tf": 90, "speed_simqin": 110,
                   "speed_transformer_dcn": 150, "compiled_din_tf": 180, "compiled_dcnv2_tf": 180},
    },
    "cpu": {  # the rehearsal: every GPU-mode path on the tiny preset (tests/test_gpu_check.py)
        # the smallest sizes that still run every path: batches of 128 rows (a CPU steps through
        # 1024 in a quarter of a second), 2 warm-up + 2 timed steps (the CUDA-graph path's 3 eager
        # steps, then a capture replayed), 2 repeats (their medians), one profiled step
        "device": "cpu", "check_preset": "tiny", "bench_preset": "tiny", "budget": 400, "repeats": 2,
        "warmup": 2, "profile_steps": 1, "flags": ["--rehearse-cuda-graphs"], "sets": ["train.batch_size=128"],
        "predict_rows": 300,
        "configs": {"qin": ("qin_small", 2), "din_tf": ("din_tf_small", 2), "dcnv2_tf": ("dcnv2_tf_small", 2),
                    "simqin": ("simqin_small", 2), "transformer_dcn": ("transformer_dcn_small", 2)},
        "model_options": {"qin": ["train.eval_batch_size=600"], "transformer_dcn": ["train.batch_size=256"]},
        # a CPU compile takes a minute a model: the compiled step is not rehearsed (the GPU check's
        # rehearsal compiles qin_small; tests/test_gpu_check.py files fake compiled lines)
        "compiled": [],
        "limits": {"environment": 60, "check_data": 60, "bench_data": 60, "same_function": 200,
                   "speed_qin": 120, "speed_din_tf": 120, "speed_dcnv2_tf": 120, "speed_simqin": 120,
                   "speed_transformer_dcn": 120},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    from gpu_check import parse_step_limit
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU rehearsal: tiny preset, *_small configs")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT when set, else gpu_speed_out)")
    parser.add_argument("--data-root", default=None,
                        help="where presets are generated and logs kept (default: ${TMPDIR:-/tmp}/gpu_speed_data)")
    parser.add_argument("--budget", type=float, default=None, help="overall seconds (default: 470 on GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="bench --repeats (default: 3 on GPU)")
    parser.add_argument("--step-limit", type=parse_step_limit, action="append", default=[], metavar="NAME=SECONDS",
                        help="a lower time limit for the step of that name (repeatable)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def bench_base(mode: dict, py: str, root: Path, preset: str) -> list[str]:
    return [py, "tools/bench.py", "--preset", preset, "--data-root", str(root), "--device", mode["device"],
            *mode["flags"], *[a for s in mode["sets"] for a in ("--set", s)]]


def same_function_argv(mode: dict, py: str, root: Path) -> list[str]:
    argv = bench_base(mode, py, root, mode["check_preset"]) + ["--same-function"]
    for config, _ in mode["configs"].values():
        argv += ["--config", f"configs/{config}.yaml@0"]
    return argv + [a for o in OPTIONS for a in ("--compare", o)]


def speed_argv(mode: dict, py: str, root: Path, model: str, repeats: int) -> list[str]:
    config, steps = mode["configs"][model]
    options = OPTIONS + mode["model_options"].get(model, [])
    argv = bench_base(mode, py, root, mode["bench_preset"]) + [
        "--config", f"configs/{config}.yaml@{steps}", "--warmup", str(mode["warmup"]), "--repeats", str(repeats),
        *[a for o in options for a in ("--compare", o)],
        "--profile", str(root / f"profile_{model}.json"), "--profile-steps", str(mode["profile_steps"]),
        *[a for v in PROFILED for a in ("--profile-variant", v)]]
    return argv + ([] if model == "qin" else ["--predict-rows", str(mode["predict_rows"])])


def compiled_argv(mode: dict, py: str, root: Path, model: str) -> list[str]:
    config, steps = mode["configs"][model]
    return bench_base(mode, py, root, mode["bench_preset"]) + [
        "--config", f"configs/{config}.yaml@{steps}", "--warmup", str(mode["warmup"]), "--repeats", "1",
        "--set", COMPILED, "--predict-rows", str(mode["predict_rows"])]


def file_compiled(speed: dict, records: list[dict]) -> None:
    """A compiled process's lines (its only variant is its baseline, with train.compile set) as the
    config's COMPILED variant, its ratios to the config's eager baseline median."""
    compiled = speed_of(records, speed.get("test_rows"))["variants"].get("baseline")
    if not compiled:
        return
    add_ratios(compiled, speed.get("variants", {}).get("baseline", {}))
    speed.setdefault("variants", {})[COMPILED] = compiled


# ---------------------------------------------------------------------------------------------
# what the bench lines say
# ---------------------------------------------------------------------------------------------

def judge_same_function(records: list[dict]) -> list[dict]:
    """Each option's same_function line against its config's rerun (the noise) and the floor."""
    noise = {r["config"]: r for r in records if r.get("variant") == "baseline (rerun)"}
    out = []
    for r in records:
        entry = {k: r.get(k) for k in ("config", "variant", "device", "steps", "batch_size", "loss_rel_diff",
                                       "grad_rel_diff", "update_rel_diff", "cuda_graphs")}
        if r.get("variant") != "baseline (rerun)":
            base = noise.get(r["config"], {})
            limits = {k: max(NOISE_FACTOR * (base.get(k) or 0.0), floor) for k, floor in CPU_TOLERANCE.items()}
            entry["limits"] = limits
            entry["passed"] = all(isinstance(r.get(k), (int, float)) and r[k] <= limit for k, limit in limits.items())
            graphs = r.get("cuda_graphs") or {}
            if r["variant"] == "train.cuda_graphs=true" and (graphs.get("failed") or not graphs.get("graphs")):
                entry["passed"] = False
                entry["problem"] = f"no graph replayed: {graphs}"
        out.append(entry)
    return out


def speed_of(records: list[dict], test_rows: int | None) -> dict:
    """Medians per variant from one config's train, predict and compare lines."""
    train = {}
    predict = {}
    graphs = {}
    for r in records:
        if r.get("measure") == "train":
            train.setdefault(r["variant"], []).append(r["rows_per_s"])
            graphs[r["variant"]] = r.get("cuda_graphs")
        elif r.get("measure") == "predict":
            predict.setdefault(r["variant"], []).append((r["rows_per_s"], r["seconds"], r["rows"], r["batch_size"]))
    variants = {}
    for label, rates in train.items():
        p = predict.get(label, [])
        variants[label] = {
            "repeats": len(rates), "train_rows_per_s": statistics.median(rates), "train_rows_per_s_all": rates,
            "predict_rows_per_s": statistics.median([x[0] for x in p]) if p else None,
            "predict_seconds": statistics.median([x[1] for x in p]) if p else None,
            "predict_rows": p[0][2] if p else None, "eval_batch_size": p[0][3] if p else None,
            "cuda_graphs": graphs.get(label)}
    base = variants.get("baseline", {})
    for label, v in variants.items():
        if label != "baseline":
            add_ratios(v, base)
    return {"variants": variants, "test_rows": test_rows}


def add_ratios(variant: dict, base: dict) -> None:
    """The variant's train and predict rows/s over the baseline's (where both are measured)."""
    if base.get("train_rows_per_s"):
        variant["train_ratio"] = variant["train_rows_per_s"] / base["train_rows_per_s"]
        if variant["predict_rows_per_s"] and base.get("predict_rows_per_s"):
            variant["predict_ratio"] = variant["predict_rows_per_s"] / base["predict_rows_per_s"]


def option_ran(label: str, figures: dict) -> bool:
    if label != "train.cuda_graphs=true":
        return True
    graphs = figures.get("cuda_graphs") or {}
    return bool(graphs.get("graphs")) and not graphs.get("failed")


def targets(speed: dict, test_rows: int | None) -> list[dict]:
    out = []
    for model, (default_target, best_target) in TARGETS.items():
        variants = (speed.get(model) or {}).get("variants", {})
        base = variants.get("baseline")
        if not base:
            out.append({"model": model, "target": f"{model}: train rows/s", "measured": "not measured", "pass": None})
            continue
        # the default step or a training-step option that did what it says (a failed capture ran the
        # default step: its rate is noise; QIN's eval-batch variant trains the default step too)
        candidates = [(label, v["train_rows_per_s"]) for label, v in variants.items()
                      if label in ("baseline", COMPILED) or (label in OPTIONS and option_ran(label, v))]
        best_label, best = max(candidates, key=lambda x: x[1])
        out.append({"model": model, "target": f"{model} default step >= {default_target:,} train rows/s",
                    "measured": base["train_rows_per_s"], "pass": base["train_rows_per_s"] >= default_target})
        out.append({"model": model, "target": f"{model} best option >= {best_target:,} train rows/s",
                    "measured": best, "variant": best_label, "pass": best >= best_target})
    qin = (speed.get("qin") or {}).get("variants", {})
    predicted = [(v["predict_seconds"], label) for label, v in qin.items()
                 if v.get("predict_seconds") is not None and v.get("predict_rows") == test_rows]
    if predicted:
        seconds, label = min(predicted)
        out.append({"model": "qin", "target": f"qin test prediction of {test_rows:,} rows < {QIN_PREDICT_SECONDS} s",
                    "measured": seconds, "variant": label, "pass": seconds < QIN_PREDICT_SECONDS})
    else:
        out.append({"model": "qin", "target": f"qin test prediction < {QIN_PREDICT_SECONDS} s",
                    "measured": "not measured", "pass": None})
    return out


def merge_profiles(root: Path, models: list[str], out: Path) -> None:
    merged = {"schema": 1, "commands": [], "torch": None, "configs": []}
    for model in models:
        try:
            part = json.loads((root / f"profile_{model}.json").read_text())
        except (OSError, ValueError):
            continue
        merged["commands"].append(part.get("command"))
        merged["torch"], merged["top_n"] = part.get("torch"), part.get("top_n")
        merged["configs"] += part.get("configs", [])
    if merged["configs"]:
        tmp = out / f".{PROFILE_FILE}.tmp"
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
        tmp.replace(out / PROFILE_FILE)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    env, mode = report["environment"], report["mode"]
    lines = [f"### GPU speed check {report['started_utc'][:10]}: {env.get('device_name') or 'no CUDA device'}"
             + (" (CPU rehearsal: the plumbing, not a measurement)" if mode == "cpu" else ""), "",
             f"`{report['command']}`: {fmt(report['wall_seconds'])} s wall (budget {report['budget_seconds']} s), "
             f"commit {env.get('git_commit') or '?'}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
             f"nvidia-smi: {env.get('nvidia_smi')}. Medians of {report['repeats']} repeats, each bench process "
             "warmed by its own first measurement.", "",
             "#### Targets of issue 31", "", "| target | measured | variant | verdict |", "|---|---:|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {fmt(t['measured'])} | {t.get('variant', '')} | {verdict(t['pass'])} |")
    lines += ["", f"#### Train and predict rows/s on the {report['bench_preset']} preset", "",
              "| config | variant | train rows/s (median) | train ratio | predict rows/s | predict ratio "
              "| predict s (rows, eval batch) | cuda_graphs |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for model, s in report["speed"].items():
        for label, v in s.get("variants", {}).items():
            graphs = v.get("cuda_graphs")
            note = "" if not graphs else (graphs.get("why") or graphs.get("failed") or f"{graphs.get('mode')}: "
                                          f"{graphs.get('graphs')} rows, {graphs.get('replays')} replays")
            lines.append(f"| {s['config']} | {label} | {fmt(v['train_rows_per_s'])} | {fmt(v.get('train_ratio'), 3)} | "
                         f"{fmt(v.get('predict_rows_per_s'))} | {fmt(v.get('predict_ratio'), 3)} | "
                         f"{fmt(v.get('predict_seconds'), 3)} ({fmt(v.get('predict_rows'))}, "
                         f"{fmt(v.get('eval_batch_size'))}) | {cell(note)} |")
        if s.get("status") != "ok":
            lines.append(f"| {s['config']} | step {cell(s.get('status'))} | | | | | | |")
    lines += ["", f"#### Same function: each option's step against the default step ({report['check_preset']} preset)",
              "", "From the same weights, buffers and Adam state at every step: the largest relative "
              "difference of the loss, of the clipped gradients and of the update; the rerun of the default "
              f"step is the device's noise. Agree: within max({NOISE_FACTOR:g} x the rerun's, "
              f"{CPU_TOLERANCE}).", "",
              "| config | variant | loss | gradients | update | verdict |", "|---|---|---:|---:|---:|---|"]
    for r in report["same_function"]:
        lines.append(f"| {r['config']} | {r['variant']} | {fmt(r.get('loss_rel_diff'), 3)} | "
                     f"{fmt(r.get('grad_rel_diff'), 3)} | {fmt(r.get('update_rel_diff'), 3)} | "
                     f"{verdict(r.get('passed')) if 'passed' in r else 'noise'}"
                     + (f" {cell(r['problem'])}" if r.get("problem") else "") + " |")
    lines.append("")
    profile = report.get("profile") or {}
    lines += profile_table(profile, "#### Profile of one training step: the default step and its cuda_graphs variant",
                           f"`tools/bench.py --profile` ({PROFILE_FILE}, {profile.get('status')}): torch.profiler over "
                           "a few steps after the measurements", variants=True)
    return "\n".join(lines + steps_and_raw_lines(report))


def summary(report: dict) -> dict:
    speed = {}
    for model, s in report["speed"].items():
        v = s.get("variants", {})
        speed[model] = {"base": rounded((v.get("baseline") or {}).get("train_rows_per_s")),
                        **{label.split(".", 1)[-1]: rounded(x.get("train_ratio")) for label, x in v.items()
                           if label != "baseline"}}
    qin = (report["speed"].get("qin") or {}).get("variants", {})
    return {
        "mode": report["mode"], "device": report["environment"].get("device_name"),
        "torch": report["environment"].get("torch"), "commit": report["environment"].get("git_commit"),
        "wall_s": report["wall_seconds"], "train_rows_s_and_ratios": speed,
        "qin_predict_s": {str(v.get("eval_batch_size")): rounded(v.get("predict_seconds")) for v in qin.values()},
        "same_function": {f"{r['config'].rsplit('/', 1)[-1].removesuffix('.yaml')}/{r['variant'].split('.', 1)[-1]}":
                          [rounded(r.get(k)) for k in ("loss_rel_diff", "grad_rel_diff", "update_rel_diff")]
                          + ([r["passed"]] if "passed" in r else []) for r in report["same_function"]},
        "profile": profile_summary(report.get("profile"), lambda c: "{}/{}".format(
            c["config"].rsplit("/", 1)[-1].removesuffix(".yaml"), c.get("variant"))),
        "profile_fields": ", ".join(PROFILE_FIELDS),
        "targets_pass": {t["target"]: t["pass"] for t in report["targets"]},
        "steps_not_ok": [f"{s['name']}: {s['status']}" for s in report["steps"] if s["status"] != "ok"],
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def guarded(r: Runner, name: str, fn, fallback):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a bug here must not lose the other results
        r.record({"name": f"{name} (gpu_speed.py)", "status": "failed", "seconds": 0.0,
                  "error": "internal error in tools/verify/gpu_speed.py\n" + traceback.format_exc(limit=6)})
        return fallback


class SpeedCheck:
    def __init__(self, args, argv):
        self.mode_name = "cpu" if args.cpu else "gpu"
        self.mode = MODES[self.mode_name]
        self.out = Path(args.out or os.environ.get("OUT") or "gpu_speed_out").resolve()
        self.root = Path(args.data_root or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_speed_data").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / PROFILE_FILE).unlink(missing_ok=True)
        for stale in self.root.glob("profile_*.json"):
            stale.unlink()
        logs = self.root / "logs"
        if logs.is_dir():
            for old in logs.iterdir():
                old.unlink()
        self.budget = args.budget or self.mode["budget"]
        self.repeats = args.repeats or self.mode["repeats"]
        self.r = Runner(logs, self.budget, dict(args.step_limit), name="gpu_speed")
        if self.mode_name == "cpu":
            self.r.env.setdefault("OMP_NUM_THREADS", "1")
        self.py = sys.executable
        self.raw_lines: list[str] = []
        self.report = {
            "schema": 1, "mode": self.mode_name, "command": shlex.join(["bash", "tools/gpu_speed.sh", *argv]),
            "budget_seconds": self.budget, "repeats": self.repeats, "check_preset": self.mode["check_preset"],
            "bench_preset": self.mode["bench_preset"], "options": OPTIONS, "model_options": self.mode["model_options"],
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": {}, "data": {}, "same_function": [], "speed": {}, "targets": [], "profile": {}}

    def run(self) -> int:
        r, mode, limits = self.r, self.mode, self.mode["limits"]
        r.say(f"{self.mode_name} mode, output {self.out}, data {self.root}, budget {self.budget:.0f} s")
        self.report["environment"] = step_environment(r, self.py, self.mode_name, limits["environment"])
        self.write()
        same_data = mode["check_preset"] == mode["bench_preset"]
        bench_data: dict = {}

        def make_bench_data():
            bench_data.update(guarded(r, "bench_data", lambda: prepare_preset(
                r, self.py, self.root, mode["bench_preset"], "bench_data", limits["bench_data"]), {"status": "failed"}))
        background = threading.Thread(target=make_bench_data, daemon=True)
        if not same_data:
            background.start()
        check_data = guarded(r, "check_data", lambda: prepare_preset(
            r, self.py, self.root, mode["check_preset"], "check_data", limits["check_data"]), {"status": "failed"})
        if check_data.get("status") == "ok":
            self.same_function()
        else:
            r.skip("same_function", f"no {mode['check_preset']} data")
        self.write()
        if same_data:
            bench_data = check_data
        else:
            background.join(max(0.0, r.left()))
            if background.is_alive():
                bench_data = {"status": "timeout"}
        self.report["data"] = {"preset": mode["bench_preset"], **bench_data}
        test_rows = (bench_data.get("rows") or {}).get("test")
        for model in mode["configs"]:
            if bench_data.get("status") == "ok":
                self.speed(model, test_rows)
            else:
                r.skip(f"speed_{model}", f"no {mode['bench_preset']} data ({bench_data.get('status')})")
                self.report["speed"][model] = {"config": mode["configs"][model][0], "status": "not run", "variants": {}}
            self.write()
        for model in mode["compiled"]:
            if bench_data.get("status") != "ok":
                r.skip(f"compiled_{model}", f"no {mode['bench_preset']} data ({bench_data.get('status')})")
            elif r.left() < COMPILED_MIN_LEFT:
                r.skip(f"compiled_{model}", f"{r.left():.0f} s of the budget left, {COMPILED_MIN_LEFT:.0f} needed")
            else:
                self.compiled(model)
            self.write()
        return self.write(final=True)

    def same_function(self) -> None:
        name = "same_function"
        step = self.r.run(name, same_function_argv(self.mode, self.py, self.root), self.mode["limits"][name])
        raw, records = parse_lines(self.r.logs / f"{name}.out")
        self.raw_lines += raw
        self.report["same_function"] = judge_same_function([x for x in records if x.get("measure") == name])
        self.report["same_function_status"] = step["status"]

    def speed(self, model: str, test_rows) -> None:
        name = f"speed_{model}"
        step = self.r.run(name, speed_argv(self.mode, self.py, self.root, model, self.repeats),
                          self.mode["limits"][name])
        raw, records = parse_lines(self.r.logs / f"{name}.out")
        self.raw_lines += raw
        self.report["speed"][model] = {"config": self.mode["configs"][model][0], "status": step["status"],
                                       **speed_of(records, test_rows)}
        merge_profiles(self.root, list(self.mode["configs"]), self.out)

    def compiled(self, model: str) -> None:
        name = f"compiled_{model}"
        step = self.r.run(name, compiled_argv(self.mode, self.py, self.root, model), self.mode["limits"][name])
        raw, records = parse_lines(self.r.logs / f"{name}.out")
        self.raw_lines += raw
        speed = self.report["speed"].setdefault(model, {"config": self.mode["configs"][model][0], "variants": {}})
        speed["compiled_status"] = step["status"]
        file_compiled(speed, records)

    def write(self, final: bool = False) -> int:
        r, report = self.r, self.report
        test_rows = (report["data"].get("rows") or {}).get("test")
        report["targets"] = guarded(r, "targets", lambda: targets(report["speed"], test_rows), [])
        report["profile"] = guarded(r, "profile", lambda: profile_report(self.out / PROFILE_FILE), {})
        report["raw_bench_lines"] = self.raw_lines
        report["steps"] = r.steps
        report["wall_seconds"] = round(r.elapsed(), 1)
        report["complete"] = final
        steps_ok = all(s["status"] == "ok" for s in r.steps)
        agree = bool(report["same_function"]) and all(x.get("passed", True) for x in report["same_function"])
        report["all_steps_ok"], report["same_function_ok"] = steps_ok, agree
        md = guarded(r, "markdown", lambda: markdown(report), "### GPU speed check: see gpu_speed.json\n")
        write_outputs(self.out, {"gpu_speed.json": json.dumps(report, indent=1, default=str) + "\n", "gpu_speed.md": md,
                                 "bench_lines.jsonl": "".join(line + "\n" for line in self.raw_lines)}, r.logs)
        if final:
            r.say(f"wrote {self.out}: steps {'all ok' if steps_ok else 'NOT all ok'}, "
                  f"same function {'PASS' if agree else 'FAIL'}")
            sys.stderr.flush()
            print(md.split("Raw lines printed")[0], flush=True)
            line = guarded(r, "summary", lambda: json.dumps(summary(report), default=str),
                           json.dumps({"mode": self.mode_name, "summary": "failed: see gpu_speed.json"}))
            print(SUMMARY_PREFIX + line, flush=True)  # the last line
        return 0 if steps_ok and agree else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = SpeedCheck(parse_args(argv), argv)
    try:
        return check.run()
    except KeyboardInterrupt:
        check.r.say("interrupted: stopping the commands it started")
        check.r.kill_all()
        check.write(final=True)
        return 130


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    sys.exit(main())
