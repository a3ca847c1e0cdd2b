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
import torch

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


def test_profile_writes_one_file_with_each_configs_step(tiny_cfg, tiny_processed, tmp_path):
    """--profile on a CPU: one JSON file, one entry per config (after its measurements), with the
    step time, the leaf aten ops per step as the CPU's launches (labelled so), no GPU idle time, and
    the top ops by self time whose figures add up. stdout keeps its train and predict lines only."""
    path = tmp_path / "out" / "profile.json"
    lines = bench_records("--config", "configs/qin_small.yaml", "--config", "configs/dcnv2_tf_small.yaml",
                          *tiny_data_args(tiny_cfg), "--device", "cpu", "--set", "train.batch_size=256",
                          "--set", "train.eval_batch_size=600", "--steps", "2", "--warmup", "1",
                          "--profile", str(path), "--profile-steps", "2")
    assert [line["measure"] for line in lines] == ["train", "predict"] * 2
    profile = json.loads(path.read_text())
    assert profile["schema"] == 1 and profile["torch"] == bench.torch.__version__
    assert [(c["config"], c["variant"]) for c in profile["configs"]] == [
        ("configs/qin_small.yaml", "baseline"), ("configs/dcnv2_tf_small.yaml", "baseline")]
    for c in profile["configs"]:
        assert c["device"] == "cpu" and c["profiled_steps"] == 2 and c["batch_size"] == 256
        assert c["step_ms"] > 0 and c["unprofiled_step_ms"] > 0
        assert c["launches_what"].startswith("cpu: leaf aten ops")
        assert 0 < c["launches_per_step"] <= c["aten_ops_per_step"]
        assert c["gpu_idle_ms_per_step"] is None and c["gpu_busy_ms_per_step"] is None
        # self times exclude the children: together they fit in the profiled wall time
        assert 0 < c["cpu_self_ms_per_step"] <= 1.05 * c["step_ms"]
        top = c["top"]
        assert 1 <= len(top) <= bench.TOP_N
        assert [t["total_ms"] for t in top] == sorted((t["total_ms"] for t in top), reverse=True)
        for t in top:
            assert t["calls"] >= 1 and t["total_ms"] > 0
            assert t["calls_per_step"] == pytest.approx(t["calls"] / 2, rel=1e-3)
            assert t["ms_per_step"] == pytest.approx(t["total_ms"] / 2, rel=1e-3)
            assert t["pct_of_step"] == pytest.approx(100 * t["ms_per_step"] / c["step_ms"], rel=1e-3)
        assert sum(t["pct_of_step"] for t in top) <= 105
        # the traffic model of one step of the batch, in the dtypes of CUDA (bf16: the configs' default)
        traffic = c["traffic"]
        assert traffic["dtype"] == "bfloat16" and traffic["rows"] == 256
        assert traffic["ops_per_step"] > 0 and traffic["no_traffic_ops_per_step"] > 0
        assert traffic["gb_per_step"] > 0 and traffic["tflop_per_step"] > 0
        assert 1 <= len(traffic["top"]) <= bench.TRAFFIC_TOP_N
        assert sum(t["gb"] for t in traffic["top"]) <= traffic["gb_per_step"] * 1.0001
        assert set(traffic["floors"]) == set(bench.FLOOR_GPUS)
        h200 = traffic["floors"]["NVIDIA H200"]
        assert h200["memory_ms"] == pytest.approx(traffic["gb_per_step"] / 4.8, rel=1e-3)
        assert h200["matmul_ms"] == pytest.approx(1000 * traffic["tflop_per_step"] / 989.0, rel=1e-3)


def test_traffic_counts_each_ops_tensors_once_in_place_updates_twice_and_gathered_rows():
    a, b, table = torch.ones(1000), torch.ones(1000), torch.ones(50, 8)
    ids, first = torch.tensor([1, 2]), torch.tensor([0])
    with bench.EagerTraffic() as counter:
        a + b                                  # reads 2, writes 1: 3 x 4,000 bytes
        a.add_(b)                              # a read and written, b read
        torch.empty(1000).zero_()              # an allocation moves nothing; zero_ only writes
        a.view(10, 100).t()                    # views move nothing
        torch.nn.functional.embedding(ids, table)  # 2 rows of 8 floats read and written; the ids
        ids[first]                             # 1 id read and written, 1 index read
    assert counter.moved == {"add": 12_000, "add_": 12_000, "zero_": 4_000, "embedding": 2 * 2 * 8 * 4 + 2 * 8,
                             "index": 2 * 8 + 8}
    assert counter.calls == {"add": 1, "add_": 1, "zero_": 1, "embedding": 1, "index": 1}
    assert counter.no_traffic_ops == 3  # empty, view, t
    # fused Adam reads and writes the weights and both moments, and only reads the gradients
    weight = torch.nn.Parameter(torch.ones(100))
    weight.grad = torch.ones(100)
    adam = torch.optim.Adam([weight], fused=True)
    adam.step()  # its state made
    with bench.EagerTraffic() as counter:
        adam.step()
    assert counter.moved["_fused_adam_"] == 7 * 400 + 4  # and the 4 bytes of the step count


@pytest.mark.parametrize("name, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100-SXM4-40GB", 1.555),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_datasheet_bandwidths(name, bandwidth):
    assert bench.datasheet_memory_tb_s(name) == bandwidth


def test_gpu_idle_time_is_the_gaps_between_busy_stretches():
    assert bench.idle_between([]) == (0.0, 0.0)
    # overlapping and nested kernels count once; before the first and after the last is not idle
    busy, idle = bench.idle_between([(20, 25), (0, 10), (5, 12), (6, 7), (30, 31)])
    assert (busy, idle) == (12 + 5 + 1, 8 + 5)


def test_a_failed_profile_costs_no_measurement(tiny_cfg, tiny_processed, tmp_path, monkeypatch, capsys):
    """A profiler that fails (a CUDA profiler of another torch, a capture gone wrong) is logged: the
    config's train and predict lines, measured before it, are emitted all the same, and the next
    config is measured and profiled."""
    calls = []
    real = bench.profile_training

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise AttributeError("'FunctionEvent' object has no attribute 'activity_type'")
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, "profile_training", first_fails)
    path = tmp_path / "profile.json"
    lines = bench_records("--config", "configs/qin_small.yaml@1", "--config", "configs/dcnv2_tf_small.yaml@1",
                          *tiny_data_args(tiny_cfg), "--device", "cpu", "--set", "train.batch_size=256",
                          "--set", "train.eval_batch_size=600", "--warmup", "0", "--profile", str(path),
                          "--profile-steps", "1")
    assert [(line["measure"], line["run"]) for line in lines] == [
        ("train", "qin_small"), ("predict", "qin_small"), ("train", "dcnv2_tf_small"), ("predict", "dcnv2_tf_small")]
    assert [c["config"] for c in json.loads(path.read_text())["configs"]] == ["configs/dcnv2_tf_small.yaml"]
    logged = capsys.readouterr()
    assert "the profile of qin_small failed, its measurements stand: AttributeError" in logged.out + logged.err


def test_device_events_are_told_apart_with_or_without_activity_type():
    """torch 2.13's events name their activity; torch 2.11's (the GPU image's) only carry the device:
    there names tell memcpy and memset, and a user annotation is no kernel."""
    from types import SimpleNamespace
    cuda, cpu = "CUDA", "CPU"
    event = lambda name, device=cuda, **more: SimpleNamespace(name=name, device_type=device, **more)
    old_torch = [event("void gemm_kernel<...>"), event("Memcpy HtoD (Pageable -> Device)"), event("Memset (Device)"),
                 event("## train step ##", is_user_annotation=True), event("aten::mm", cpu)]
    assert [bench.device_activity(e, cuda) for e in old_torch] == ["kernel", "gpu_memcpy", "gpu_memset", None, None]
    new_torch = [event("k", activity_type="kernel"), event("m", activity_type="gpu_memcpy"),
                 event("u", activity_type="gpu_user_annotation"), event("aten::mm", cpu, activity_type="cpu_op")]
    assert [bench.device_activity(e, cuda) for e in new_torch] == ["kernel", "gpu_memcpy", None, None]


def test_profile_summary_of_cuda_events():
    """The CUDA branch (no GPU here): kernels per step, memcpy apart, the GPU's busy and idle time
    per step, the top kernels by GPU time, the launch calls on the CPU side."""
    gpu = [{"name": "gemm", "kind": "kernel", "start_us": 0.0, "end_us": 30.0},
           {"name": "gemm", "kind": "kernel", "start_us": 40.0, "end_us": 70.0},
           {"name": "elementwise", "kind": "kernel", "start_us": 75.0, "end_us": 80.0},
           {"name": "Memcpy HtoD", "kind": "gpu_memcpy", "start_us": 100.0, "end_us": 110.0}]
    cpu = [{"name": "cudaLaunchKernel", "self_us": 5.0, "aten": False, "leaf": True}] * 3 + [
        {"name": "aten::mm", "self_us": 20.0, "aten": True, "leaf": False}]
    got = bench.profile_summary({"cpu": cpu, "gpu": gpu}, steps=2, wall_s=0.0002, device_type="cuda")
    assert got["step_ms"] == pytest.approx(0.1)
    assert got["launches_per_step"] == 1.5 and got["memcpy_memset_per_step"] == 0.5
    assert got["launch_calls_per_step"] == 1.5 and got["launches_what"].startswith("cuda: kernels")
    assert got["gpu_busy_ms_per_step"] == pytest.approx(75 / 1000 / 2)
    assert got["gpu_idle_ms_per_step"] == pytest.approx((10 + 5 + 20) / 1000 / 2)
    assert [(t["name"], t["calls"], t["total_ms"]) for t in got["top"]] == [
        ("gemm", 2, 0.06), ("Memcpy HtoD", 1, 0.01), ("elementwise", 1, 0.005)]
    assert got["top"][0]["pct_of_step"] == pytest.approx(100 * 0.03 / 0.1)
    assert got["top_cpu_ops"][0]["name"] == "aten::mm"
    # a profile in which CUPTI saw no GPU activity says so, not "0 launches, 0 ms idle"
    blind = bench.profile_summary({"cpu": cpu, "gpu": []}, steps=2, wall_s=0.0002, device_type="cuda")
    assert blind["launches_what"] == bench.NO_GPU_EVENTS and blind["top"] == []
    assert blind["launches_per_step"] is blind["gpu_idle_ms_per_step"] is blind["gpu_busy_ms_per_step"] is None
    assert blind["launch_calls_per_step"] == 1.5


def test_cuda_graphs_variant_on_a_cpu_runs_the_plain_loop_or_its_rehearsal(tiny_cfg, tiny_processed):
    """train.cuda_graphs is not in configs/train.yaml, yet --compare reaches it (bench completes the
    train section with its defaults). On a CPU it is the plain loop, and the line says why; with
    --rehearse-cuda-graphs fit's graph path runs (warm-up, then replays of the captured function);
    --same-function puts the baseline's rerun (the noise) and the variant beside the baseline."""
    args = ["--config", "configs/qin_small.yaml", *tiny_data_args(tiny_cfg), "--device", "cpu",
            "--set", "train.batch_size=256", "--set", "train.eval_batch_size=600", "--steps", "2",
            "--warmup", "4", "--predict-rows", "100", "--compare", "train.cuda_graphs=true"]
    plain = bench_records(*args)
    assert plain[0]["cuda_graphs"] is None
    assert plain[2]["cuda_graphs"] == {"mode": "off", "why": "CUDA only: the plain eager loop ran"}
    rehearsed = bench_records(*args, "--rehearse-cuda-graphs", "--same-function")
    assert [(line["measure"], line["variant"]) for line in rehearsed[:2]] == [
        ("same_function", "baseline (rerun)"), ("same_function", "train.cuda_graphs=true")]
    for line in rehearsed[:2]:
        assert line["steps"] == bench.SAME_FUNCTION_STEPS and line["loss_rel_diff"] == 0
        assert line["grad_rel_diff"] == 0
    assert rehearsed[0]["update_rel_diff"] == 0  # a CPU is deterministic
    # 4 warm-up steps and 2 timed ones: 3 eager, the capture, and the others replayed
    assert rehearsed[4]["cuda_graphs"] == {"mode": "rehearse", "graphs": [256], "replays": 3, "eager_steps": 3,
                                           "failed": None}
    assert bench.fit.CPU_GRAPHS == "eager"  # the rehearsal ends with the run
