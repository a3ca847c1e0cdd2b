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
3. correctness, default runs: fold 0 of every model of `run.sh --preset full` (qin, qin_plus,
   dcnv2_tf, din_tf, transformer_dcn_gpu, simqin) on the demo preset
   (batch 1024, 3 epochs) by train.py: every epoch's train loss finite, fold and valid AUC above
   AUC_ABOVE_CHANCE, test predictions probabilities. (The GPU is idle while the full preset is
   generated, so these cost the bench nothing.)
4. bench, eager: ONE tools/bench.py process, data uploaded once: qin for one whole epoch of the
   3.6M train rows and the whole 379,142-row test split (the targets), then qin_plus, dcnv2_tf,
   din_tf, transformer_dcn_gpu and simqin for a few steps (the projection); each config then
   profiled over a few more steps (bench.py --profile: top kernels, launches and GPU idle time per
   step, the traffic model of one step) into PROFILE_FILE.
5. bench, QIN with CUDA graphs: the same epoch with train.cuda_graphs=true (the whole step replayed
   from a CUDA graph; the CPU rehearsal runs fit's graph path with --rehearse-cuda-graphs), then
   compiled QIN: the same epoch with train.compile=true (ratios to eager).
6. correctness variants while time remains: the published configs with train.bf16=false and
   train.compile=true, QIN rerun (CUDA's run-to-run noise); a variant agrees with the default run
   when its fold and valid AUCs are within AUC_TOLERANCE and its mean test prediction within
   MEAN_PRED_TOLERANCE (two trainings, not one set of weights predicted twice: single predictions
   drift apart and are recorded, not judged).
7. projection of `run.sh --preset full` (every model's folds, the slowest refit, the blend) from
   the measured rows/s and EPOCH_ASSUMPTIONS.

A step that does not run is recorded as skipped with the reason. Outputs, at most MAX_OUT_FILES
files in --out (default $OUT when set, else gpu_check_out/), rewritten after every step so a run
cut short keeps what it measured: gpu_check.json (everything), gpu_check.md (a section for
docs/BENCHMARKS.md), bench_lines.jsonl (bench's lines as printed), profile.json (bench's profile
of one training step per config) and logs.tgz (every command's stdout and stderr). The last line
printed on stdout is a one-line JSON summary of every target figure (prefix SUMMARY_PREFIX), for a
reply that keeps only the end of the output. Generated data and the logs go to --data-root
(default ${TMPDIR:-/tmp}/gpu_check_data), never into the repository. Exit code 0 when every step ran and every correctness check passed; 1 otherwise (the
speed targets are reported, they do not fail the run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import traceback
from pathlib import Path

from gpu_check_report import markdown, summary, targets, write_outputs
from gpu_check_runner import Runner
from gpu_check_steps import (BENCH_SETS, FOLD_OVERHEAD_S, MAX_OUT_FILES, MODES, PROCESS_OVERHEAD_S, PROFILE_FILE,
                             SUMMARY_PREFIX, bench_argv, bench_root, correctness_report, correctness_runs, data_dirs,
                             prepare_preset, profile_report, projection, qin_full_epoch, run_correctness,
                             step_bench, step_environment)


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
                        help="the CPU rehearsal of every GPU-mode path: the tiny preset (check and bench data), *_small configs")
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
                  "error": "internal error in tools/verify/gpu_check.py\n" + traceback.format_exc(limit=6)})
        return fallback


def main(argv=None) -> int:
    args = parse_args(argv)
    mode_name = "cpu" if args.cpu else "gpu"
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    root = Path(args.data_root or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_data").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / PROFILE_FILE).unlink(missing_ok=True)  # this run's profile only
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
                r, self.py, bench_root(mode, self.root), mode["bench_preset"], "bench_data", limits["bench_data"]),
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
            self.bench("bench_eager", list(mode["models"]), "eager",
                       ["--profile", str(self.out / PROFILE_FILE), "--profile-steps", str(mode["profile_steps"])])
            self.bench("bench_graphs", ["qin"], "graphs", mode["graphs_flags"])
            if self.compile_on:
                self.bench("bench_compiled", ["qin"], "compiled")
            else:
                r.skip("bench_compiled", "compile off (--no-compile)")
        else:
            why = f"no {mode['bench_preset']} data (data step: {self.report['data'].get('status')})"
            for name in ("bench_eager", "bench_graphs", "bench_compiled"):
                r.skip(name, why)
        self.write()

        variants = [run for run in runs if run["variant"] != "default"]
        if check_data.get("status") == "ok" and variants:
            self.results.update(guarded(r, "correctness", lambda: run_correctness(
                r, variants, work, limits["correctness_run"], self.jobs), {}))
        return self.write(final=True)

    def bench(self, name: str, models: list[str], which: str, extra: list[str] = ()) -> None:
        sets = BENCH_SETS[which] + self.mode.get("bench_sets", {}).get(which, [])
        argv = bench_argv(self.mode, self.py, self.root, self.device, models, sets, extra)
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
        report["profile"] = guarded(r, "profile", lambda: profile_report(self.out / PROFILE_FILE),
                                    {"file": PROFILE_FILE, "status": "unreadable", "configs": []})
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
        write_outputs(self.out, {"gpu_check.json": json.dumps(self.report, indent=1, default=str) + "\n",
                                 "gpu_check.md": md,
                                 "bench_lines.jsonl": "".join(line + "\n" for line in self.raw_lines)}, self.r.logs)


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    sys.exit(main())
