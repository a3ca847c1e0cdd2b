"""tools/gpu_check.sh: its CPU mode (tiny preset, *_small configs, a few steps) end to end, so the
GPU check cannot rot between the rare GPU slots; plus the projection's arithmetic and the rule that
the check imports nothing from the repository (the GPU image has no lightgbm).

No figure is judged here: the CPU mode's speeds are not the GPU targets; only that every section
holds finite numbers, every step ran, and the markdown carries bench.py's lines as printed.
"""
import ast
import json
import math
import subprocess
from pathlib import Path

import pytest

import gpu_check

REPO = Path(__file__).resolve().parent.parent
MODELS = ["qin", "dcnv2_tf", "din_tf", "transformer_dcn"]


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu", "--out", str(out),
                             "--data-root", str(tmp / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    return result, out


@pytest.mark.slow
def test_cpu_mode_runs_every_step(cpu_run):
    result, out = cpu_run
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    for section in ("environment", "correctness", "data", "bench", "qin_full_epoch", "projection",
                    "targets", "steps", "raw_bench_lines"):
        assert section in report, section
    assert report["mode"] == "cpu" and report["all_steps_ok"] and report["correctness_ok"]
    assert {s["status"] for s in report["steps"]} == {"ok"}
    assert all(is_finite(s["seconds"]) for s in report["steps"])
    assert report["environment"]["torch"] and is_finite(report["wall_seconds"])


@pytest.mark.slow
def test_cpu_mode_correctness_section(cpu_run):
    report = json.loads((cpu_run[1] / "gpu_check.json").read_text())
    runs = report["correctness"]["runs"]
    assert sorted(r["model"] for r in runs if r["variant"] == "default") == sorted(MODELS)
    for run in runs:
        assert run["passed"], run
        assert run["train_loss"] and all(is_finite(x) for x in run["train_loss"])
        assert all(is_finite(run[k]) for k in ("fold_auc", "valid_auc", "train_rows_per_s", "test_pred_mean"))
        assert run["fold_auc"] > gpu_check.AUC_ABOVE_CHANCE and run["valid_auc"] > gpu_check.AUC_ABOVE_CHANCE
    pairs = report["correctness"]["agreement"]
    assert pairs, "no agreement pair"
    for pair in pairs:
        assert pair["passed"], pair
        for key in ("fold_auc_diff", "valid_auc_diff", "mean_pred_diff", "mean_abs_pred_diff",
                    "max_abs_pred_diff", "logit_corr"):
            assert is_finite(pair[key]), key
    # on a CPU float32 is the default: the variant trains the very same model
    fp32 = next(p for p in pairs if p["variant"] == "fp32")
    assert fp32["max_abs_pred_diff"] == 0.0 and fp32["logit_corr"] == pytest.approx(1.0)


@pytest.mark.slow
def test_cpu_mode_bench_epoch_and_projection(cpu_run):
    report = json.loads((cpu_run[1] / "gpu_check.json").read_text())
    data = report["data"]
    assert data["rows"] == {"train": 4000, "valid": 600, "test": 600}
    assert is_finite(data["generate_seconds"]) and is_finite(data["preprocess_seconds"])
    assert [b["model"] for b in report["bench"]] == MODELS
    for bench in report["bench"]:
        assert bench["status"] == "ok"
        for measure in ("train", "predict"):
            figures = bench["eager"][measure]
            for key in ("rows", "seconds", "rows_per_s", "flops_per_row", "achieved_tflops",
                        "fraction_of_peak", "peak_memory_bytes"):  # --peak-tflops matmul on a CPU
                assert is_finite(figures[key]), (bench["model"], measure, key)
    epoch = report["qin_full_epoch"]
    assert epoch["steps"] == math.ceil(4000 / 1024)  # qin_small's batch: one whole epoch
    eager = epoch["variants"]["eager"]
    assert eager["test_predict_rows"] == 600 and eager["train_rows_timed"] >= 4000
    for key in ("train_rows_per_s", "epoch_seconds", "test_predict_seconds", "epoch_plus_predict_seconds"):
        assert is_finite(eager[key]), key
    projection = report["projection"]
    assert is_finite(projection["total_seconds"]) and projection["total_seconds"] > 0
    assert [m["model"] for m in projection["models"]] == MODELS
    for model in projection["models"]:
        assert 1 <= model["epochs"] <= model["max_epochs"] and model["epochs_source"]
        assert is_finite(model["epoch_seconds"]) and is_finite(model["model_seconds"])
    assert all(t["pass"] in (True, False, None) for t in report["targets"])


@pytest.mark.slow
def test_cpu_mode_keeps_bench_lines_as_printed(cpu_run):
    out = cpu_run[1]
    report = json.loads((out / "gpu_check.json").read_text())
    lines = (out / "bench_lines.jsonl").read_text().splitlines()
    assert lines == report["raw_bench_lines"]
    assert len(lines) == 2 * len(MODELS)  # train + predict per config, no compile in CPU mode
    assert [json.loads(line)["measure"] for line in lines] == ["train", "predict"] * len(MODELS)
    assert (out / "logs" / "bench_qin.out").read_text().splitlines() == lines[:2]  # each command's log
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("### GPU check")
    for heading in ("#### Targets", "#### 1. Correctness", "#### 2. The tiny preset", "#### 3. One QIN epoch",
                    "#### 4. Projected"):
        assert heading in md, heading
    fenced = md.split("```\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert fenced == lines
    assert "PASS" in md


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
    assert result["total_seconds"] == pytest.approx(410.0 + sum(m["model_seconds"] for m in result["models"]))
    del benches["din_tf"]
    incomplete = gpu_check.projection(benches, mode, data, blend_s=300.0)
    assert incomplete["total_seconds"] is None and "din_tf" in incomplete["problem"]


def test_imports_nothing_from_the_repository():
    """The GPU image has no lightgbm, and the stages' internals change: the check goes through
    their command lines only."""
    tree = ast.parse((REPO / "tools" / "gpu_check.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    allowed = {"__future__", "argparse", "datetime", "json", "math", "os", "platform", "re", "shlex", "shutil",
               "signal", "subprocess", "sys", "threading", "time", "traceback", "pathlib",
               "yaml", "numpy", "pandas"}
    assert imported <= allowed, imported - allowed
    assert "pip" not in (REPO / "tools" / "gpu_check.sh").read_text().replace("pipefail", "")


def fake_bench_line(measure: str, variant: str, rows: int, seconds: float) -> dict:
    return {"measure": measure, "variant": variant, "device_name": "NVIDIA H100 80GB HBM3",
            "dtype": "bfloat16", "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "flops_per_row": 1.0e8, "achieved_tflops": 1.0e8 * rows / seconds / 1e12, "peak_tflops": 989.0,
            "fraction_of_peak": 0.1, "peak_memory_bytes": 2**33, "batch_size": 8192, "params": 1}


def test_gpu_shaped_report_compiled_rows_and_verdicts():
    """The parts only a GPU run reaches (compiled variants, compare lines), from bench-shaped records."""
    mode = gpu_check.MODES["gpu"]
    rows = {"train": 3_600_000, "valid": 10_000, "test": 379_142}
    benches = {}
    for model, config in mode["models"].items():
        records = [fake_bench_line("train", "baseline", 3_604_480, 4.0),       # 0.9M rows/s: too slow
                   fake_bench_line("predict", "baseline", 379_142, 0.5)]
        if model in gpu_check.PUBLISHED:
            records += [fake_bench_line("train", "train.compile=true", 3_604_480, 2.0),
                        fake_bench_line("predict", "train.compile=true", 379_142, 0.25),
                        {"measure": "compare", "variant": "train.compile=true", "train_ratio": 2.0,
                         "predict_ratio": 2.0}]
        benches[model] = {"model": model, "config": config, "status": "ok", "steps": 440, "warmup": 10,
                          "compile_compared": model in gpu_check.PUBLISHED, **gpu_check.bench_figures(records)}
    epoch = gpu_check.qin_full_epoch(benches["qin"], rows)
    assert epoch["variants"]["eager"]["pass"] == {"train_rows_per_s": False, "epoch_seconds": True,
                                                  "test_predict_seconds": True}
    assert epoch["variants"]["compiled"]["epoch_seconds"] == pytest.approx(3_600_000 / (3_604_480 / 2.0))
    data = {"preset": "full", "rows": rows, "generate_seconds": 90.0, "preprocess_seconds": 8.0,
            "status": "ok", "background": True}
    compiled = gpu_check.projection(benches, mode, data, 300.0, "compiled")
    assert [m["rows_per_s"] for m in compiled["models"]] == ["compiled"] * 3 + ["eager"]
    report = {"mode": "gpu", "command": "bash tools/gpu_check.sh", "started_utc": "2026-11-28T00:00:00+00:00",
              "wall_seconds": 400.0, "budget_seconds": 460, "bench_preset": "full",
              "environment": {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
              "correctness": {"device": "cuda", "preset": "demo", "overrides": [], "runs": [], "agreement": [],
                              "skipped": []},
              "data": data, "bench": list(benches.values()), "qin_full_epoch": epoch,
              "projection": gpu_check.projection(benches, mode, data, 300.0), "projection_compiled": compiled,
              "steps": [{"name": "x", "status": "failed", "seconds": 1.0, "error": "exit code 1: a | b\nmore"}],
              "raw_bench_lines": ['{"measure": "train"}']}
    report["targets"] = gpu_check.targets(report)
    verdicts = {t["target"]: t["pass"] for t in report["targets"]}
    assert verdicts["QIN (eager) train rows/s >= 1,000,000"] is False
    assert verdicts["QIN (compiled) train rows/s >= 1,000,000"] is True
    md = gpu_check.markdown(report)
    assert "### GPU check 2026-11-28: NVIDIA H100 80GB HBM3" in md
    assert "| qin compiled / eager | | | x2 |" in md
    assert "exit code 1: a \\| b |" in md  # a pipe in a message cannot break the table
    assert md.count("**FAIL**") >= 1 and md.count("**PASS**") >= 3
    assert md.rstrip().endswith('{"measure": "train"}\n```'.rstrip())
