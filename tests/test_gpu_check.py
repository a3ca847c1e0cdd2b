"""tools/gpu_check.sh: its CPU rehearsal (the tiny preset, *_small configs, compile on, one step
killed at its limit) end to end, so the GPU check cannot rot between the rare GPU slots; plus
the projection's arithmetic, the GPU-only report parts, and the rule that the check imports nothing
from the repository (the GPU image has no lightgbm).

No figure is judged here: the CPU mode's speeds are not the GPU targets; only that every section
holds finite numbers, every step ran, and the markdown carries bench.py's lines as printed.
"""
import ast
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import gpu_check
import gpu_check_steps
import gpu_speed

REPO = Path(__file__).resolve().parent.parent
MODELS = ["qin", "qin_plus", "dcnv2_tf", "din_tf", "transformer_dcn", "simqin"]


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


KILLED = "train_gpucheck_qin_rerun"  # the rehearsal kills this step at a 1 s limit
REHEARSALS = {  # fixture -> (its folder, its command given that folder): each CPU rehearsal
    "cpu_run": ("gpu_check", lambda tmp: ["bash", "tools/gpu_check.sh", "--cpu", "--out", str(tmp / "out"),
                                          "--data-root", str(tmp / "data"), "--step-limit", f"{KILLED}=1"]),
    "speed_run": ("gpu_speed", lambda tmp: ["bash", "tools/gpu_speed.sh", "--cpu", "--out", str(tmp / "out"),
                                            "--data-root", str(tmp / "data")]),
}
REHEARSAL_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def rehearsals(request, tmp_path_factory):
    """rehearsal(fixture) -> (the finished command, its output folder). The first call starts every
    rehearsal the selected tests of this module use, side by side: each runs its steps mostly one
    process at a time (the benches, the compile), so two keep 2 cores busy where one after the
    other would leave one idle. Under pytest-xdist a worker runs only some of the tests: there
    each rehearsal starts when its own tests need it. Left running at the end (a test run cut
    short): stopped (SIGTERM: the check stops the commands it started)."""
    started = {}

    def start(name: str) -> None:
        if name in started:
            return
        folder, command = REHEARSALS[name]
        tmp = tmp_path_factory.mktemp(folder)
        with open(tmp / "stdout.txt", "wb") as stdout, open(tmp / "stderr.txt", "wb") as stderr:
            proc = subprocess.Popen(command(tmp), cwd=REPO, stdout=stdout, stderr=stderr)
        started[name] = (proc, tmp, command(tmp), time.monotonic())

    def rehearsal(name: str):
        start(name)
        if "PYTEST_XDIST_WORKER" not in os.environ:
            for other in REHEARSALS:
                if any(other in item.fixturenames for item in request.session.items):
                    start(other)
        proc, tmp, command, t0 = started[name]
        try:
            proc.wait(timeout=max(1.0, REHEARSAL_TIMEOUT_S - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            stop(proc)
            raise
        result = subprocess.CompletedProcess(command, proc.returncode, (tmp / "stdout.txt").read_text(),
                                             (tmp / "stderr.txt").read_text())
        return result, tmp / "out"

    yield rehearsal
    for proc, *_ in started.values():
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cpu_run(rehearsals):
    return rehearsals("cpu_run")


def report_of(cpu_run) -> dict:
    return json.loads((cpu_run[1] / "gpu_check.json").read_text())


@pytest.mark.slow
def test_rehearsal_runs_every_step_in_order_and_names_the_killed_one(cpu_run):
    result, out = cpu_run
    assert result.returncode == 1, result.stderr[-4000:]  # one step killed: not all steps ok
    report = report_of(cpu_run)
    assert report["mode"] == "cpu" and report["complete"] and not report["all_steps_ok"]
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status.pop(KILLED) == "timeout" and set(status.values()) == {"ok"}, status
    names = [s["name"] for s in report["steps"]]
    # the figures first: the benches before the correctness variants
    assert (names.index("bench_eager") < names.index("bench_graphs") < names.index("bench_compiled")
            < names.index("train_gpucheck_qin_compile"))
    assert {"bench_data_generate", "bench_data_preprocess", "check_data_generate", "check_data_preprocess",
            "environment"} <= set(names)
    assert all(is_finite(s["seconds"]) for s in report["steps"])
    assert report["environment"]["torch"] and is_finite(report["wall_seconds"])


@pytest.mark.slow
def test_rehearsal_writes_at_most_eight_files_and_ends_on_the_summary_line(cpu_run):
    result, out = cpu_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["bench_lines.jsonl", "gpu_check.json", "gpu_check.md", "logs.tgz", "profile.json"]
    assert len(files) <= gpu_check.MAX_OUT_FILES
    with tarfile.open(out / "logs.tgz") as tar:
        logged = {Path(name).name for name in tar.getnames()}
    for step in report_of(cpu_run)["steps"]:
        assert f"{step['name']}.err" in logged and f"{step['name']}.out" in logged, step["name"]
    last = result.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith(gpu_check.SUMMARY_PREFIX)
    line = json.loads(last[len(gpu_check.SUMMARY_PREFIX):])
    assert set(line["qin_epoch_s"]) == set(line["qin_test_predict_s"]) == {"eager", "compiled", "graphs"}
    assert all(is_finite(v) for v in [*line["qin_epoch_s"].values(), line["run_sh_full_projected_s"]])
    assert set(line["bench"]) == {f"{c}/eager" for c in gpu_check.MODES["cpu"]["models"].values()} | {
        "qin_small/compiled", "qin_small/graphs"}
    # step ms, launches per step, GPU idle ms per step (none on a CPU), the traffic model's GB per step
    # and the H200's memory floor of that traffic, of every config's profile
    assert set(line["profile"]) == set(gpu_check.MODES["cpu"]["models"].values())
    assert all(step_ms > 0 and launches > 0 and idle is None and gb > 0 and floor == pytest.approx(gb / 4.8, rel=1e-2)
               for step_ms, launches, idle, gb, floor in line["profile"].values())
    assert line["steps_not_ok"] == [f"{KILLED}: timeout (killed at its 1 s limit)"]
    assert len(last) < 4000  # short enough for the end of a reply


@pytest.mark.slow
def test_rehearsal_correctness_section(cpu_run):
    report = report_of(cpu_run)
    runs = {(r["model"], r["variant"]): r for r in report["correctness"]["runs"]}
    assert sorted(m for m, v in runs if v == "default") == sorted(MODELS)
    assert set(runs) == {(m, "default") for m in MODELS} | {("qin", v) for v in ("fp32", "compile", "rerun")}
    killed = runs.pop(("qin", "rerun"))
    assert not killed["passed"] and killed["problem"].startswith("train.py timeout")
    for run in runs.values():
        assert run["passed"], run
        assert run["train_loss"] and all(is_finite(x) for x in run["train_loss"])
        assert all(is_finite(run[k]) for k in ("fold_auc", "valid_auc", "train_rows_per_s", "test_pred_mean"))
    pairs = {p["variant"]: p for p in report["correctness"]["agreement"]}
    assert pairs["fp32"]["passed"] and pairs["compile"]["passed"], pairs
    assert pairs["rerun"]["problem"] == "a run is missing"
    # on a CPU float32 is the default anyway: the variant trains the very same model
    assert pairs["fp32"]["max_abs_pred_diff"] == 0.0 and pairs["fp32"]["logit_corr"] == pytest.approx(1.0)


@pytest.mark.slow
def test_rehearsal_bench_epoch_and_projection(cpu_run):
    result, out = cpu_run
    report = report_of(cpu_run)
    data = report["data"]
    assert data["rows"] == {"train": 4_000, "valid": 600, "test": 600}  # the tiny preset, generated again
    # its own copy, beside the check data: the bench data step generated and preprocessed it
    assert not data["reused"] and Path(data["raw_dir"]).parent != Path(report["data_root"])
    assert is_finite(data["generate_seconds"]) and is_finite(data["preprocess_seconds"])
    assert [b["model"] for b in report["bench"]] == MODELS
    for bench in report["bench"]:
        measured = ["eager", "compiled", "graphs"] if bench["model"] == "qin" else ["eager"]
        assert bench["status"] == {which: "ok" for which in measured}
        for which in measured:
            for measure in ("train", "predict"):
                figures = bench[which][measure]
                for key in ("rows", "seconds", "rows_per_s", "flops_per_row", "achieved_tflops",
                            "fraction_of_peak", "peak_memory_bytes"):  # --peak-tflops matmul on a CPU
                    assert is_finite(figures[key]), (bench["model"], which, measure, key)
    epoch = report["qin_full_epoch"]
    assert epoch["steps"] == math.ceil(4_000 / 1024)  # qin_small's batch: one whole epoch
    for which in ("eager", "compiled", "graphs"):
        v = epoch["variants"][which]
        assert v["test_predict_rows"] == 600 and v["train_rows_timed"] >= 4_000
        for key in ("train_rows_per_s", "epoch_seconds", "test_predict_seconds", "epoch_plus_predict_seconds"):
            assert is_finite(v[key]), key
    projection = report["projection"]
    assert is_finite(projection["total_seconds"]) and projection["total_seconds"] > 0
    assert [m["model"] for m in projection["models"]] == MODELS
    assert all(t["pass"] in (True, False, None) for t in report["targets"])

    lines = (out / "bench_lines.jsonl").read_text().splitlines()
    assert lines == report["raw_bench_lines"]
    records = [json.loads(line) for line in lines]
    # one eager process for the configs (data loaded once), then QIN with CUDA graphs, then compiled
    assert [(r["measure"], r["config"], r["compile"]) for r in records] == [
        (m, f"configs/{c}.yaml", False) for c in gpu_check.MODES["cpu"]["models"].values()
        for m in ("train", "predict")] + [(m, "configs/qin_small.yaml", compiled) for compiled in (False, True)
                                          for m in ("train", "predict")]
    # the CUDA-graph step's path, rehearsed on the CPU: warm-up, then the epoch replayed
    graphs = records[-4]["cuda_graphs"]
    assert graphs["mode"] == "rehearse" and graphs["graphs"] == [1024] and graphs["failed"] is None
    # 1 warm-up + 4 epoch steps: fit's 3 eager steps, then the capture replayed for the rest
    assert graphs["replays"] == 1 + 4 - 3 and records[0]["cuda_graphs"] is None
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("### GPU check")
    for heading in ("#### Targets", "#### 1. The tiny preset", "#### 2. One QIN epoch", "#### 3. Projected",
                    "#### 4. Correctness", "#### 5. Profile of one training step"):
        assert heading in md, heading
    fenced = md.split("```\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert fenced == lines
    assert "| qin_small compiled / eager |" in md and "| qin_small graphs / eager |" in md
    profile = json.loads((out / "profile.json").read_text())
    assert [c["config"] for c in profile["configs"]] == [
        f"configs/{c}.yaml" for c in gpu_check.MODES["cpu"]["models"].values()]
    assert [c["config"] for c in report["profile"]["configs"]] == [c["config"] for c in profile["configs"]]
    for c in profile["configs"]:
        assert c["profiled_steps"] == gpu_check.MODES["cpu"]["profile_steps"] and c["step_ms"] > 0
        assert c["launches_per_step"] > 0 and c["gpu_idle_ms_per_step"] is None and c["top"]


def test_projection_arithmetic():
    mode = gpu_check.MODES["gpu"]
    rows = {"train": 3_600_000, "valid": 10_000, "test": 379_142}
    benches = {m: {"eager": {"train": {"rows_per_s": 1e6}, "predict": {"rows_per_s": 2e6}}, "compiled": {}}
               for m in mode["models"]}
    data = {"rows": rows, "generate_seconds": 100.0, "preprocess_seconds": 10.0}
    result = gpu_check.projection(benches, mode, data, blend_s=300.0)
    qin = result["models"][0]
    assert qin["epochs"] == 41 and qin["max_epochs"] == 100
    per_epoch = 3_600_000 * 4 / 5 / 1e6 + (720_000 + 10_000) / 2e6
    assert qin["epoch_seconds"] == pytest.approx(per_epoch)
    per_fold = 41 * per_epoch + 379_142 / 2e6 + gpu_check.FOLD_OVERHEAD_S
    assert qin["model_seconds"] == pytest.approx(5 * per_fold + gpu_check.PROCESS_OVERHEAD_S)
    # the refit: every train row an epoch, early stopping on valid, then the test rows
    refit = 41 * (3_600_000 / 1e6 + 10_000 / 2e6) + 379_142 / 2e6 + gpu_check.FOLD_OVERHEAD_S
    assert qin["refit_seconds"] == pytest.approx(refit + gpu_check.PROCESS_OVERHEAD_S)
    # at equal rates the longest schedule (QIN's and SimQIN's 41 epochs) is the slowest refit
    assert result["refit_model"] == "qin" and result["refit_seconds"] == qin["refit_seconds"]
    assert result["total_seconds"] == pytest.approx(
        410.0 + sum(m["model_seconds"] for m in result["models"]) + qin["refit_seconds"])
    # every fold and the refit at max_epochs: the bound
    refit_max = 100 * (3_600_000 / 1e6 + 10_000 / 2e6) + 379_142 / 2e6 + gpu_check.FOLD_OVERHEAD_S
    assert result["total_seconds_max_epochs"] == pytest.approx(
        410.0 + sum(m["model_seconds_max_epochs"] for m in result["models"]) + refit_max + gpu_check.PROCESS_OVERHEAD_S)
    del benches["din_tf"]
    incomplete = gpu_check.projection(benches, mode, data, blend_s=300.0)
    assert incomplete["total_seconds"] is None and "din_tf" in incomplete["problem"]


def test_imports_only_the_plumbing_of_the_repository():
    """The GPU image has no lightgbm, and the stages' internals change: the checks go through
    their command lines; of the package they take only mmctr.common's config loader and first_line."""
    allowed = {"__future__", "argparse", "datetime", "io", "json", "math", "os", "platform", "re", "shlex",
               "shutil", "signal", "statistics", "subprocess", "sys", "tarfile", "threading", "time", "traceback",
               "pathlib", "yaml", "numpy", "pandas", "gpu_check", "gpu_check_runner", "gpu_check_steps",
               "gpu_check_report"}
    paths = sorted((REPO / "tools" / "verify").glob("gpu_check*.py")) + [REPO / "tools" / "verify" / "gpu_speed.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert {name.split(".")[0] for name in imported if name != "mmctr.common"} <= allowed, (path.name, imported)
    for script in ("gpu_check.sh", "gpu_speed.sh"):
        assert "pip" not in (REPO / "tools" / script).read_text().replace("pipefail", "")


def fake_bench_line(measure: str, compiled: bool, rows: int, seconds: float, config: str) -> dict:
    return {"measure": measure, "variant": "baseline", "config": f"configs/{config}.yaml", "compile": compiled,
            "device_name": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "rows": rows, "seconds": seconds,
            "rows_per_s": rows / seconds, "flops_per_row": 1.0e8, "achieved_tflops": 1.0e8 * rows / seconds / 1e12,
            "peak_tflops": 989.0, "fraction_of_peak": 0.1, "peak_memory_bytes": 2**33, "batch_size": 8192,
            "steps": 440, "params": 1}


def test_gpu_shaped_report_compiled_rows_and_verdicts(tmp_path):
    """The parts only a GPU run reaches (compiled QIN, the compile ratio), from bench-shaped lines
    filed the way step_bench files them."""
    mode = gpu_check.MODES["gpu"]
    rows = {"train": 3_600_000, "valid": 10_000, "test": 379_142}
    eager = [fake_bench_line(m, False, *sizes, config) for config in mode["models"].values()
             for m, sizes in (("train", (3_604_480, 4.0)), ("predict", (379_142, 0.5)))]  # 0.9M rows/s: slow
    compiled = [fake_bench_line("train", True, 3_604_480, 2.0, "qin"),
                fake_bench_line("predict", True, 379_142, 0.25, "qin")]
    runner = gpu_check.Runner(tmp_path / "logs", 100.0, {})
    benches = {}
    for name, lines, models, which in (("bench_eager", eager, list(mode["models"]), "eager"),
                                       ("bench_compiled", compiled, ["qin"], "compiled")):
        text = "".join(json.dumps(line) + "\n" for line in lines)
        argv = [sys.executable, "-c", f"import sys; sys.stdout.write({text!r})"]
        raw = gpu_check.step_bench(runner, name, argv, 60, benches, mode, models, which)
        assert [json.loads(line) for line in raw] == lines
    assert benches["qin"]["status"] == {"eager": "ok", "compiled": "ok"}
    assert benches["din_tf"]["status"] == {"eager": "ok"}
    assert gpu_check_steps.ratio_to_eager(benches["qin"], "compiled") == pytest.approx({"train": 2.0, "predict": 2.0})
    epoch = gpu_check.qin_full_epoch(benches["qin"], rows)
    assert epoch["variants"]["eager"]["pass"] == {"train_rows_per_s": False, "epoch_seconds": True,
                                                  "test_predict_seconds": True}
    assert epoch["variants"]["compiled"]["epoch_seconds"] == pytest.approx(3_600_000 / (3_604_480 / 2.0))
    data = {"preset": "full", "rows": rows, "generate_seconds": 90.0, "preprocess_seconds": 8.0,
            "generate_workers": 16, "status": "ok"}
    projected = gpu_check.projection(benches, mode, data, 300.0, "compiled")
    assert [m["rows_per_s"] for m in projected["models"]] == ["compiled"] + ["eager"] * 5
    report = {"mode": "gpu", "command": "bash tools/gpu_check.sh", "started_utc": "2026-11-28T00:00:00+00:00",
              "wall_seconds": 400.0, "budget_seconds": 470, "bench_preset": "full", "models": mode["models"],
              "environment": {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "correctness": {"device": "cuda", "preset": "demo", "overrides": [], "runs": [], "agreement": [],
                              "skipped": []},
              "data": data, "bench": list(benches.values()), "qin_full_epoch": epoch,
              "projection": gpu_check.projection(benches, mode, data, 300.0), "projection_compiled": projected,
              "steps": [{"name": "x", "status": "failed", "seconds": 1.0, "error": "exit code 1: a | b\nmore"}],
              "raw_bench_lines": ['{"measure": "train"}']}
    report["targets"] = gpu_check.targets(report)
    verdicts = {t["target"]: t["pass"] for t in report["targets"]}
    assert verdicts["QIN (eager) train rows/s >= 1,000,000"] is False
    assert verdicts["QIN (compiled) train rows/s >= 1,000,000"] is True
    md = gpu_check.markdown(report)
    assert "### GPU check 2026-11-28: NVIDIA H100 80GB HBM3" in md
    assert "| qin compiled / eager | | | | x2 |" in md
    assert "exit code 1: a \\| b |" in md  # a pipe in a message cannot break the table
    assert md.count("**FAIL**") >= 1 and md.count("**PASS**") >= 3
    assert md.rstrip().endswith('{"measure": "train"}\n```'.rstrip())
    line = gpu_check.summary(report)
    assert line["qin_epoch_s"] == {"eager": round(3_600_000 / (3_604_480 / 4.0), 3),
                                   "compiled": round(3_600_000 / (3_604_480 / 2.0), 3)}
    assert line["bench"]["qin/compiled"]["train_rows_s"] == pytest.approx(3_604_480 / 2.0)


def test_gpu_plan_fits_the_device_call():
    """The GPU mode's budget leaves a device call (600 s) room for the machine's own overheads, and
    every step limit fits inside it."""
    mode = gpu_check.MODES["gpu"]
    assert mode["budget"] <= 480
    assert all(limit <= mode["budget"] for limit in mode["limits"].values())


def test_step_limit_argument():
    assert gpu_check.parse_args(["--step-limit", "bench_eager=30"]).step_limit == [("bench_eager", 30.0)]
    for bad in ("bench_eager", "=3", "x=0", "x=y"):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--step-limit", bad])


# ---------------------------------------------------------------------------------------------
# tools/gpu_speed.sh: the prepared speed check of issue 31
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speed_run(rehearsals):
    return rehearsals("speed_run")


@pytest.mark.slow
def test_speed_rehearsal_measures_every_option_and_returns_five_files(speed_run):
    """gpu_speed.sh --cpu: every step of the GPU mode on the tiny preset (the CUDA-graph path
    rehearsed), five files back, the summary on the last line."""
    result, out = speed_run
    assert result.returncode == 0, result.stderr[-4000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["bench_lines.jsonl", "gpu_speed.json", "gpu_speed.md", "logs.tgz", "profile.json"]
    assert len(files) <= gpu_speed.MAX_OUT_FILES
    report = json.loads((out / "gpu_speed.json").read_text())
    assert report["complete"] and report["all_steps_ok"] and report["same_function_ok"]
    assert [s["name"] for s in report["steps"]] == [
        "environment", "check_data_generate", "check_data_preprocess", "same_function",
        *[f"speed_{m}" for m in gpu_speed.MODES["cpu"]["configs"]]]
    # same function: a rerun and each option per config, loss and gradients bit for bit on a CPU
    pairs = {(r["config"], r["variant"]): r for r in report["same_function"]}
    configs = [f"configs/{c}.yaml" for c, _ in gpu_speed.MODES["cpu"]["configs"].values()]
    assert set(pairs) == {(c, v) for c in configs for v in ["baseline (rerun)", *gpu_speed.OPTIONS]}
    for (config, variant), r in pairs.items():
        assert r["loss_rel_diff"] == 0 and r["grad_rel_diff"] == 0, (config, variant)
        assert variant == "baseline (rerun)" or r["passed"]
    for config in configs:
        assert pairs[(config, "train.cuda_graphs=true")]["cuda_graphs"]["mode"] == "rehearse"
    # speed: every config, the default step and each option, the repeats' medians
    assert list(report["speed"]) == list(gpu_speed.MODES["cpu"]["configs"])
    for model, s in report["speed"].items():
        expected = ["baseline", *gpu_speed.OPTIONS] + gpu_speed.MODES["cpu"]["model_options"].get(model, [])
        assert s["status"] == "ok" and list(s["variants"]) == expected
        for label, v in s["variants"].items():
            assert v["repeats"] == 2 and v["train_rows_per_s"] > 0 and v["predict_seconds"] > 0
            assert label == "baseline" or v["train_ratio"] > 0
        graphs = s["variants"]["train.cuda_graphs=true"]["cuda_graphs"]
        assert graphs["mode"] == "rehearse" and graphs["replays"] >= 1 and graphs["failed"] is None
    assert report["speed"]["qin"]["variants"]["baseline"]["predict_rows"] == 600  # the whole tiny test split
    assert [t["pass"] is not None for t in report["targets"]] == [True] * len(report["targets"])
    profile = json.loads((out / "profile.json").read_text())
    assert [(c["config"], c["variant"]) for c in profile["configs"]] == [
        (c, v) for c in configs for v in gpu_speed.PROFILED]
    md = (out / "gpu_speed.md").read_text()
    for heading in ("#### Targets of issue 31", "#### Train and predict rows/s", "#### Same function",
                    "#### Profile of one training step", "#### Steps"):
        assert heading in md, heading
    last = result.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith(gpu_speed.SUMMARY_PREFIX) and len(last) < 4000
    line = json.loads(last[len(gpu_speed.SUMMARY_PREFIX):])
    assert set(line["train_rows_s_and_ratios"]) == set(gpu_speed.MODES["cpu"]["configs"])
    assert line["steps_not_ok"] == [] and len(line["profile"]) == 10


def test_speed_plan_fits_the_device_call():
    """GPU mode: at most 8 minutes, every option compared with 3 repeats on every config of the
    targets, QIN's whole test split predicted (also in one eval batch), the profile of the default
    step and the CUDA-graph step, the checks on the demo preset while the full one is made."""
    mode = gpu_speed.MODES["gpu"]
    assert mode["budget"] <= 480 and all(limit <= mode["budget"] for limit in mode["limits"].values())
    assert [c for c, _ in mode["configs"].values()] == ["qin", "din_tf", "dcnv2_tf", "simqin", "transformer_dcn_gpu"]
    root = Path("/data")
    checks = gpu_speed.same_function_argv(mode, "python3", root)
    assert checks[:2] == ["python3", "tools/bench.py"] and "--same-function" in checks
    assert checks[checks.index("--preset") + 1] == "demo" and checks[checks.index("--device") + 1] == "cuda"
    assert [a for a in checks if a.endswith("@0")] == [f"configs/{c}.yaml@0" for c, _ in mode["configs"].values()]
    for model in mode["configs"]:
        argv = gpu_speed.speed_argv(mode, "python3", root, model, 3)
        assert argv[argv.index("--preset") + 1] == "full" and argv[argv.index("--repeats") + 1] == "3"
        compared = [argv[i + 1] for i, a in enumerate(argv) if a == "--compare"]
        own = {"qin": ["train.eval_batch_size=393216"], "transformer_dcn": ["train.batch_size=4096"]}
        assert compared == gpu_speed.OPTIONS + own.get(model, [])
        assert ("--predict-rows" in argv) == (model != "qin")  # QIN: the 379,142 test rows, timed
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--profile-variant"] == gpu_speed.PROFILED
        assert argv[argv.index("--profile") + 1] == f"/data/profile_{model}.json"
    assert 393216 >= 379_142  # one eval batch holds the whole full test split
    # while time remains: din_tf and dcnv2_tf compiled, each in a process of its own, one repeat
    assert mode["compiled"] == ["din_tf", "dcnv2_tf"]
    for model in mode["compiled"]:
        argv = gpu_speed.compiled_argv(mode, "python3", root, model)
        assert argv[argv.index("--set") + 1] == "train.compile=true" and argv[argv.index("--repeats") + 1] == "1"
        assert argv[argv.index("--config") + 1] == f"configs/{model}.yaml@40" and "--compare" not in argv
        assert gpu_speed.COMPILED_MIN_LEFT <= mode["limits"][f"compiled_{model}"]


def fake_speed_lines(config: str, rates: dict, predict_s: dict, rows: int = 379_142, graphs=None) -> list[dict]:
    lines = []
    for repeat in range(3):
        for label, rate in rates.items():
            lines.append({"measure": "train", "variant": label, "config": config, "rows_per_s": rate * (1 + repeat / 100),
                          "cuda_graphs": graphs if label == "train.cuda_graphs=true" else None})
            lines.append({"measure": "predict", "variant": label, "config": config, "rows_per_s": rows / predict_s[label],
                          "seconds": predict_s[label], "rows": rows, "batch_size": 65536})
    return lines


def test_speed_targets_verdicts_and_summary_from_gpu_shaped_lines():
    ok_graphs = {"mode": "capture", "graphs": [8192], "replays": 63, "eager_steps": 3, "failed": None}
    qin = gpu_speed.speed_of(fake_speed_lines("configs/qin.yaml", {
        "baseline": 900_000.0, "train.cuda_graphs=true": 1_600_000.0, "train.foreach_l2=true": 950_000.0,
        "train.eval_batch_size=393216": 2_000_000.0},
        {"baseline": 0.08, "train.cuda_graphs=true": 0.08, "train.foreach_l2=true": 0.08,
         "train.eval_batch_size=393216": 0.06}, graphs=ok_graphs), 379_142)
    assert qin["variants"]["baseline"]["train_rows_per_s"] == pytest.approx(909_000.0)  # the median of 3
    assert qin["variants"]["train.cuda_graphs=true"]["train_ratio"] == pytest.approx(1_600_000 / 900_000)
    failed = {**ok_graphs, "graphs": [], "failed": "RuntimeError: operation not permitted"}
    din = gpu_speed.speed_of(fake_speed_lines("configs/din_tf.yaml", {
        "baseline": 300_000.0, "train.cuda_graphs=true": 1_200_000.0, "train.foreach_l2=true": 310_000.0},
        {"baseline": 0.3, "train.cuda_graphs=true": 0.3, "train.foreach_l2=true": 0.3}, graphs=failed), 379_142)
    speed = {"qin": {"config": "qin", "status": "ok", **qin}, "din_tf": {"config": "din_tf", "status": "ok", **din}}
    got = {t["target"]: (t["pass"], t.get("variant")) for t in gpu_speed.targets(speed, 379_142)}
    assert got["qin default step >= 1,000,000 train rows/s"] == (False, None)
    assert got["qin best option >= 1,500,000 train rows/s"] == (True, "train.cuda_graphs=true")  # not the eval batch
    # a failed capture ran the default step: its rate is not an option's
    assert got["din_tf best option >= 1,000,000 train rows/s"] == (False, "train.foreach_l2=true")
    # the compiled process's lines (its baseline, train.compile set) filed as din_tf's compiled variant
    compiled = fake_speed_lines("configs/din_tf.yaml", {"baseline": 1_100_000.0}, {"baseline": 0.2})[:2]
    gpu_speed.file_compiled(speed["din_tf"], compiled)
    filed = speed["din_tf"]["variants"]["train.compile=true"]
    assert filed["repeats"] == 1 and filed["train_ratio"] == pytest.approx(1_100_000 / 303_000)
    assert filed["predict_ratio"] == pytest.approx(0.3 / 0.2)
    got = {t["target"]: (t["pass"], t.get("variant")) for t in gpu_speed.targets(speed, 379_142)}
    assert got["din_tf best option >= 1,000,000 train rows/s"] == (True, "train.compile=true")
    assert got["din_tf default step >= 1,000,000 train rows/s"] == (False, None)
    assert got["qin test prediction of 379,142 rows < 0.1 s"] == (True, "train.eval_batch_size=393216")
    assert got["simqin: train rows/s"] == (None, None)

    same = gpu_speed.judge_same_function([
        {"config": "configs/qin.yaml", "variant": "baseline (rerun)", "loss_rel_diff": 0.0, "grad_rel_diff": 2e-4,
         "update_rel_diff": 1e-3},
        {"config": "configs/qin.yaml", "variant": "train.cuda_graphs=true", "loss_rel_diff": 1e-7,
         "grad_rel_diff": 1.5e-3, "update_rel_diff": 5e-3, "cuda_graphs": ok_graphs},
        {"config": "configs/qin.yaml", "variant": "train.foreach_l2=true", "loss_rel_diff": 1e-3,
         "grad_rel_diff": 0.0, "update_rel_diff": 0.0}])
    assert [r.get("passed") for r in same] == [None, True, False]  # within 10x the noise; a loss that moved
    report = {"mode": "gpu", "command": "bash tools/gpu_speed.sh", "started_utc": "2026-12-06T00:00:00+00:00",
              "wall_seconds": 400.0, "budget_seconds": 470, "repeats": 3, "check_preset": "demo",
              "bench_preset": "full", "environment": {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "speed": speed, "same_function": same, "targets": gpu_speed.targets(speed, 379_142),
              "profile": {"status": "ok", "configs": [{"config": "configs/qin.yaml", "variant": "baseline",
                                                       "step_ms": 12.0, "launches_per_step": 900.0,
                                                       "gpu_idle_ms_per_step": 4.0, "top3": [],
                                                       "traffic_gb_per_step": 17.0, "memory_floor_ms": 5.07,
                                                       "floor_gpu": "NVIDIA H100 80GB HBM3"}]},
              "steps": [{"name": "speed_qin", "status": "ok", "seconds": 60.0}], "raw_bench_lines": ["{}"]}
    md = gpu_speed.markdown(report)
    assert "### GPU speed check 2026-12-06: NVIDIA H100 80GB HBM3" in md
    assert "| configs/qin.yaml | baseline | 12 (—) | 900 | — | — | 4 | 17 | 5.07 (NVIDIA H100 80GB HBM3) |" in md
    line = gpu_speed.summary(report)
    assert line["train_rows_s_and_ratios"]["qin"]["cuda_graphs=true"] == pytest.approx(1_616_000 / 909_000, rel=1e-3)
    assert line["profile"] == {"qin/baseline": [12.0, 900.0, 4.0, 17.0, 5.07]}
    assert line["qin_predict_s"] == {"65536": 0.06}
    assert len(json.dumps(line)) < 4000
