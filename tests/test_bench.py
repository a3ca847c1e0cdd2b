"""tools/bench.py: the records it prints and what they hold, on the tiny data, a couple of steps.

No timing assertions: how fast a model runs is the benchmark's output, not something to test. The
measurements run in-process (a subprocess would spend seconds importing torch again); the CLI runs
once, to check that its stdout holds nothing but JSON lines.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from mmctr import common

REPO = Path(__file__).resolve().parent.parent
MODEL_FIELDS = {
    "measure", "variant", "config", "preset", "overrides", "run", "model", "params", "device",
    "device_name", "dtype", "compile", "threads", "data", "data_bytes", "memory", "batch_size",
    "rows", "seconds", "rows_per_s", "flops_per_row", "achieved_tflops", "peak_tflops",
    "fraction_of_peak", "peak_memory_bytes", "load_1m",
}


def bench_records(*args: str) -> list[dict]:
    records = []
    bench.run_benchmark(bench.parse_args(list(args)), emit=records.append)
    return records


def run_bench_cli(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds JSON lines only


def tiny_data_args(tiny_cfg) -> list[str]:
    data = tiny_cfg["data"]  # the fixture's processed folder is reused, never rebuilt
    return [f"--set=data.{key}={data[key]}" for key in ("raw_dir", "work_dir", "n_folds")]


def test_measures_train_predict_and_compares(tiny_cfg, tiny_processed):
    lines = bench_records("--config", "configs/qin_small.yaml", *tiny_data_args(tiny_cfg), "--device", "cpu",
                      "--set", "train.batch_size=256", "--set", "train.eval_batch_size=256",
                      "--steps", "2", "--warmup", "1", "--peak-tflops", "2.0",
                      "--compare", "model.asta_fast=false")

    assert [(line["measure"], line["variant"]) for line in lines] == [
        ("train", "baseline"), ("predict", "baseline"),
        ("train", "model.asta_fast=false"), ("predict", "model.asta_fast=false"),
        ("compare", "model.asta_fast=false")]
    measured = lines[:4]
    for line in measured:
        assert MODEL_FIELDS <= set(line)
        assert line["device"] == "cpu" and line["dtype"] == "float32" and line["model"] == "qin"
        assert line["rows_per_s"] > 0 and line["flops_per_row"] > 0 and line["peak_memory_bytes"] > 0
        assert line["peak_tflops"] == 2.0
        assert line["fraction_of_peak"] == pytest.approx(line["achieved_tflops"] / 2.0)
    train_fast, predict_fast, train_literal, _ = measured
    assert train_fast["rows"] == 2 * 256 and train_fast["steps"] == 2 and train_fast["batch_size"] == 256
    assert predict_fast["rows"] == 600  # the whole tiny test split, in three eval batches
    # the literal ASTA projects all 64 history items: more FLOPs per row, the same parameters
    assert train_literal["flops_per_row"] > train_fast["flops_per_row"]
    assert train_literal["params"] == train_fast["params"]

    compare = lines[4]
    assert compare["repeats"] == 1
    assert compare["train_rows_per_s"] == {"baseline": train_fast["rows_per_s"],
                                           "variant": train_literal["rows_per_s"]}
    assert compare["train_ratio"] == pytest.approx(train_literal["rows_per_s"] / train_fast["rows_per_s"])
    assert compare["predict_ratio"] > 0


def test_predict_rows_limits_the_predicted_test_rows(tiny_cfg, tiny_processed):
    lines = bench_records("--config", "configs/dcnv2_tf_small.yaml", *tiny_data_args(tiny_cfg),
                          "--device", "cpu", "--set", "train.batch_size=128", "--set",
                          "train.eval_batch_size=100", "--steps", "1", "--warmup", "0", "--predict-rows", "250")
    assert [(line["measure"], line["rows"]) for line in lines] == [("train", 128), ("predict", 250)]


def test_several_configs_in_turn_on_data_uploaded_once(tiny_cfg, tiny_processed, monkeypatch):
    uploads = []
    real_upload = bench.train.load_to_device
    monkeypatch.setattr(bench.train, "load_to_device", lambda *a: uploads.append(1) or real_upload(*a))
    lines = bench_records("--config", "configs/qin_small.yaml@epoch", "--config", "configs/din_tf_small.yaml",
                          *tiny_data_args(tiny_cfg), "--device", "cpu", "--set", "train.batch_size=1024",
                          "--steps", "1", "--warmup", "0")
    assert [(line["measure"], line["config"]) for line in lines] == [
        ("train", "configs/qin_small.yaml"), ("predict", "configs/qin_small.yaml"),
        ("train", "configs/din_tf_small.yaml"), ("predict", "configs/din_tf_small.yaml")]
    # epoch: ceil(the 4,000 train rows / 1,024) = 4 steps
    assert (lines[0]["steps"], lines[0]["rows"]) == (4, 4 * 1024)
    assert (lines[2]["steps"], lines[2]["rows"]) == (1, 1024)
    assert len(uploads) == 1


@pytest.mark.parametrize("bad", ["--config=configs/qin_small.yaml@many", "--steps=-1", "--steps=eon"])
def test_bad_step_counts_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([bad])
    assert "steps" in capsys.readouterr().err


@pytest.mark.slow
def test_preprocess_only_on_a_generated_preset(tmp_path):
    lines = run_bench_cli("--config", "configs/data.yaml", "--preset", "tiny", "--data-root", str(tmp_path),
                      "--preprocess", "--steps", "0")

    assert len(lines) == 1
    line = lines[0]
    assert line["measure"] == "preprocess" and line["preset"] == "tiny"
    assert line["rows"] == 4000 + 600 + 600
    assert line["seconds"] > 0 and line["peak_rss_bytes"] >= line["rss_before_bytes"] > 0
    assert (tmp_path / "tiny" / "item_info.parquet").is_file()
    assert (tmp_path / "work" / "tiny" / "processed" / "manifest.json").is_file()


def test_unknown_compare_key_is_a_user_error(tiny_cfg):
    args = bench.parse_args(["--config", "configs/qin_small.yaml", *tiny_data_args(tiny_cfg),
                             "--compare", "model.asta_fats=false"])
    with pytest.raises(common.UserError, match="--compare model.asta_fats: unknown config key 'asta_fats'"):
        bench.run_benchmark(args, emit=lambda record: None)


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "float32", 494.0),
    ("NVIDIA L40S", "bfloat16", 362.0),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA GeForce GTX 1080", "bfloat16", None),
])
def test_datasheet_peaks(name, dtype, peak):
    assert bench.datasheet_peak_tflops(name, dtype) == peak
