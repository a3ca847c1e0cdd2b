"""Benchmark a model config: training and prediction rows/s, FLOPs per row, fraction of peak, memory.

    PYTHONPATH=src python tools/bench.py --config configs/qin.yaml --preset demo --steps 50 --warmup 10
        [--config OTHER.yaml[@STEPS] ...] [--set KEY=VALUE ...] [--device cpu|cuda]
        [--compare KEY=VALUE ...] [--repeats N] [--preprocess] [--peak-tflops TFLOPS|matmul]
        [--predict-rows N] [--profile FILE [--profile-steps N] [--profile-variant LABEL ...]]
        [--same-function] [--rehearse-cuda-graphs]

Prints one JSON line per measurement on stdout (everything else goes to stderr, so `| jq` works),
each as soon as it is measured. Several --config run one after the other in one process on data
loaded once (configs with the same data section share the upload); ``CONFIG@STEPS`` gives that
config its own step count, and a step count of ``epoch`` means one pass over the train split
(ceil(train rows / batch size) steps).

- train: --warmup steps, synchronise, --steps timed steps, synchronise. The steps are fit.py's
  own (fit.train_one_epoch over steps x batch_size shuffled train rows: gather on the device,
  autocast, loss, backward, clipping, Adam), built by fit.make_step_parts as fit() builds them.
- predict: the test split (or its first --predict-rows rows) in eval batches with fit.predict,
  once to warm up, once timed.
- preprocess (--preprocess): preprocess.run_preprocess(cfg, force=True), wall time and peak RSS.
  --steps 0 measures nothing else, so `--config configs/data.yaml --preprocess --steps 0` works.
- compare (--compare KEY=VALUE, repeatable): the config plus that override is a variant measured
  after the baseline; this line holds variant / baseline rows/s (above 1: the variant is faster).
  --repeats N measures baseline and variants in turn N times and compares the medians.

- profile (--profile FILE): after a config's (and each variant's, first repeat) measurements,
  torch.profiler over --profile-steps more training steps of the warmed model (CPU activity, and
  CUDA on CUDA); FILE, one JSON object rewritten after each, holds per config: the top 15 kernels
  (CUDA) or ops (CPU) by self time with calls, total ms and % of the step, kernel launches per step
  (on a CPU, which launches none: the leaf aten ops per step, labelled so), the step time, on
  CUDA the GPU's idle time between kernels per step (null on CPU), and the traffic model of one
  more step (eager_traffic: the ops it dispatches, the bytes they move, the memory and matmul
  floors on an H100 and an H200; on a CPU in CUDA's ops and dtypes). No line on stdout.
- same_function (--same-function): before measuring, each variant and a rerun of the baseline
  train SAME_FUNCTION_STEPS steps beside the baseline from the same weights, the variant's weights,
  buffers and Adam state set to the baseline's before every step: the largest relative difference
  of the loss, of the (clipped) gradients and of the update. The rerun's is the device's own noise.
  With --steps 0 (or CONFIG@0) a config gets these checks only.
- train.cuda_graphs is CUDA-only: on a CPU its variant runs the plain loop (its train line says so
  in cuda_graphs), unless --rehearse-cuda-graphs runs fit's graph path with every capture replaced
  by a call of the captured function (the rehearsal of tools/gpu_check.sh --cpu).

FLOPs per row are counted with torch.utils.flop_counter.FlopCounterMode (matmuls, i.e. the model
FLOPs; elementwise ops and gathers are not counted) on one forward+backward of a training batch
and one forward of an eval batch. achieved_tflops = flops_per_row x rows/s; fraction_of_peak
divides it by --peak-tflops: by default the datasheet figure of a known GPU for the run's dtype,
null on CPU; 'matmul' measures a large matmul on the device instead.

Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS (VmHWM, reset before
each measurement) on CPU; both include the data, which is uploaded once (data_bytes).

Data: the config's data section (preprocessed first if needed), or --preset tiny|demo|full, which
uses {data-root}/{preset} and {data-root}/work/{preset} as run.sh does, generating the synthetic
preset first if it is not there.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

try:
    import mmctr  # noqa: F401  (src/mmctr: pip install -e . once, or PYTHONPATH=src)
except ModuleNotFoundError:
    sys.exit(f"{Path(__file__).name}: the repo's package mmctr is not importable: run `pip install -e .` in the "
             f"repo once, or prefix the command with PYTHONPATH=src")
from mmctr import common  # noqa: E402
from mmctr.models import fit  # noqa: E402
from mmctr import make_synthetic  # noqa: E402
from mmctr import model_config  # noqa: E402
from mmctr import preprocess  # noqa: E402
from mmctr import processed_data  # noqa: E402
from mmctr import train  # noqa: E402

PRESET_SEED = 20242025  # the seed run.sh generates presets with: the same files as a run.sh run
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s. float32 runs count
# TF32 tensor cores, which fit.configure_backend enables. The first matching name wins.
GPU_PEAK_TFLOPS = (
    (r"\bH200\b", {"bfloat16": 989.0, "float32": 494.0}),
    (r"\bH100\b.*\bNVL\b", {"bfloat16": 835.0, "float32": 418.0}),
    (r"\bH100\b.*\bPCIe\b", {"bfloat16": 756.0, "float32": 378.0}),
    (r"\bH100\b", {"bfloat16": 989.0, "float32": 494.0}),
    (r"\bA100\b", {"bfloat16": 312.0, "float32": 156.0}),
    (r"\bL40S\b", {"bfloat16": 362.0, "float32": 183.0}),
    (r"\bL4\b", {"bfloat16": 121.0, "float32": 60.0}),
)
# Memory bandwidth from the same datasheets, TB/s (the traffic model's floors); first match wins
GPU_MEMORY_TB_S = (
    (r"\bH200\b", 4.8),
    (r"\bH100\b.*\bNVL\b", 3.9),
    (r"\bH100\b.*\bPCIe\b", 2.0),
    (r"\bH100\b", 3.35),
    (r"\bA100\b.*\b80GB\b.*\bPCIe\b", 1.935),
    (r"\bA100\b.*\b80GB\b", 2.039),
    (r"\bA100\b", 1.555),
    (r"\bL40S\b", 0.864),
    (r"\bL4\b", 0.3),
)
# The GPUs every traffic model states its floors for (on a CPU too): the two this repo is measured on
FLOOR_GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA H200")


# ---------------------------------------------------------------------------------------------
# device: synchronisation, memory, names, peak
# ---------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: a timer must wait for the queue


def proc_status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) if match else None
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM, the peak RSS, to the current RSS
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak_kb = proc_status_kb("VmHWM")
    return None if peak_kb is None else peak_kb * 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return f"{match.group(1).strip()}, {os.cpu_count()} cores"
    return f"cpu, {os.cpu_count()} cores"


def datasheet_entry(table: tuple, name: str):
    """The value of the first (pattern, value) row of a datasheet table whose pattern the GPU's name matches."""
    return next((value for pattern, value in table if re.search(pattern, name)), None)


def datasheet_peak_tflops(name: str, dtype: str) -> float | None:
    peaks = datasheet_entry(GPU_PEAK_TFLOPS, name)
    return None if peaks is None else peaks[dtype]


def datasheet_memory_tb_s(name: str) -> float | None:
    return datasheet_entry(GPU_MEMORY_TB_S, name)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul: a practical peak where no datasheet figure applies (CPU).

    The fastest of several runs, because a peak is what the hardware can do when nothing else
    competes for it (other jobs only ever slow a run down)."""
    n, repeats = (8192, 20) if device.type == "cuda" else (2048, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: library initialisation, CUDA context and kernel selection
    fastest = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest / 1e12


class PeakTflops:
    """--peak-tflops: a given number, 'matmul' (measured once per device and dtype), or the default
    (the datasheet table on CUDA, unknown on CPU)."""

    def __init__(self, spec: float | str | None):
        self.spec, self.measured = spec, {}

    def __call__(self, device: torch.device, dtype: torch.dtype) -> float | None:
        if isinstance(self.spec, float):
            return self.spec
        if self.spec is None:
            on_gpu = device.type == "cuda"
            return datasheet_peak_tflops(device_name(device), DTYPE_NAMES[dtype]) if on_gpu else None
        key = (str(device), dtype)
        if key not in self.measured:
            self.measured[key] = measured_matmul_tflops(device, dtype)
        return self.measured[key]


EPOCH = "epoch"


def parse_steps(text: str) -> int | str:
    if text == EPOCH:
        return text
    with contextlib.suppress(ValueError):
        if int(text) >= 0:
            return int(text)
    raise argparse.ArgumentTypeError(f"expected a number of steps >= 0 or 'epoch', got {text!r}")


def parse_peak(text: str) -> float | str:
    if text == "matmul":
        return text
    with contextlib.suppress(ValueError):
        if float(text) > 0:
            return float(text)
    raise argparse.ArgumentTypeError(f"expected a positive number of TFLOP/s or 'matmul', got {text!r}")


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

def load_1m() -> float:
    return os.getloadavg()[0]  # other jobs on the machine skew a CPU figure: every line records it


def throughput(rows: int, seconds: float, flops_per_row: float, peak: float | None) -> dict:
    rows_per_s = rows / seconds
    achieved = flops_per_row * rows_per_s / 1e12
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows_per_s, "flops_per_row": flops_per_row,
            "achieved_tflops": achieved, "peak_tflops": peak,
            "fraction_of_peak": None if peak is None else achieved / peak}


def counted_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def fit_settings(cfg: dict) -> fit.FitSettings:
    train_cfg = cfg["train"]
    return common.typed_section(train.TrainConfig, train_cfg, "train").fit_settings(train_cfg["seed"])


def cuda_graphs_field(settings: fit.FitSettings, device: torch.device, optimizer) -> dict | None:
    """What train.cuda_graphs did (None when it is off): fit.graph_status, or why the plain loop ran."""
    if not settings.cuda_graphs:
        return None
    status = fit.graph_status(optimizer)
    if status is not None:
        return status
    why = ("train.compile: torch.compile has its own graphs" if settings.compile else
           "CUDA only: the plain eager loop ran" if device.type != "cuda" else "several processes")
    return {"mode": "off", "why": why}


def measure_model(cfg: dict, data: dict, tables: dict, device: torch.device, steps: int | str, warmup: int,
                  peak_tflops: PeakTflops, predict_rows: int | None = None,
                  profile_steps: int = 0) -> tuple[dict, dict, dict | None]:
    """(train record, predict record, profile or None) of the config's model on ``data``; steps
    "epoch": one pass over the train split; profile_steps > 0: profile_training of that many more
    steps after the measurements."""
    train_cfg = cfg["train"]
    settings = fit_settings(cfg)
    common.seed_everything(train_cfg["seed"])
    model = model_config.build_model(cfg["model"], tables).to(device)
    loss_fn, forward, optimizer, autocast = fit.make_step_parts(model, settings)
    dtype = torch.bfloat16 if fit.bf16_enabled(settings, device) else torch.float32
    peak = peak_tflops(device, dtype)
    common_fields = {
        "run": cfg["run"]["name"], "model": cfg["model"]["name"], "params": model_config.count_parameters(model),
        "device": device.type, "device_name": device_name(device), "dtype": DTYPE_NAMES[dtype],
        "compile": train_cfg["compile"], "threads": torch.get_num_threads(), "data": cfg["data"]["raw_dir"],
        "data_bytes": data_bytes(data, tables),
        "memory": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
    }

    columns = data["train"]
    labels = columns["label"]
    batch_size = train_cfg["batch_size"]
    n_train = labels.numel()
    if steps == EPOCH:
        steps = math.ceil(n_train / batch_size)
    generator = torch.Generator().manual_seed(train_cfg["seed"])

    def train_rows(n_steps: int) -> torch.Tensor:
        # train_one_epoch splits these into exactly n_steps full batches (rows repeat when the
        # train split is smaller than the steps need: throughput does not care)
        return torch.arange(n_steps * batch_size, device=device) % n_train

    def one_training_batch():
        rows = train_rows(1)
        with autocast():
            loss, _ = model.loss(fit.gather(columns, rows), labels[rows])
        loss.backward()

    model.train()
    train_flops_per_row = counted_flops(one_training_batch) / batch_size  # uncompiled: same FLOPs
    optimizer.zero_grad(set_to_none=True)
    load_at_start = load_1m()
    if warmup:
        fit.train_one_epoch(model, loss_fn, optimizer, columns, train_rows(warmup), generator, settings,
                            autocast)
    timed_rows = train_rows(steps)
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    fit.train_one_epoch(model, loss_fn, optimizer, columns, timed_rows, generator, settings, autocast)
    synchronize(device)
    seconds = time.perf_counter() - start
    train_record = {"measure": "train", **common_fields, "batch_size": batch_size, "steps": steps,
                    "warmup": warmup,
                    **throughput(timed_rows.numel(), seconds, train_flops_per_row, peak),
                    "peak_memory_bytes": peak_memory_bytes(device), "load_1m": load_at_start,
                    "cuda_graphs": cuda_graphs_field(settings, device, optimizer)}

    model.eval()
    test_features = data["test"]
    n_test = test_features["item_id"].numel()
    test_rows = torch.arange(n_test if predict_rows is None else min(predict_rows, n_test), device=device)
    eval_batch_size = train_cfg["eval_batch_size"]
    first_batch = test_rows[:eval_batch_size]

    @torch.inference_mode()
    def one_eval_batch():
        with autocast():
            model(fit.gather(test_features, first_batch))

    predict_flops_per_row = counted_flops(one_eval_batch) / first_batch.numel()
    load_at_start = load_1m()
    fit.predict(model, test_features, test_rows, eval_batch_size, settings.bf16, forward)  # warm-up, compile
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    fit.predict(model, test_features, test_rows, eval_batch_size, settings.bf16, forward)  # ends on the host
    seconds = time.perf_counter() - start
    predict_record = {"measure": "predict", **common_fields, "batch_size": eval_batch_size,
                      **throughput(test_rows.numel(), seconds, predict_flops_per_row, peak),
                      "peak_memory_bytes": peak_memory_bytes(device), "load_1m": load_at_start}
    profile = None
    if profile_steps:  # last: the profiler's own memory and overhead touch no figure above
        try:
            profile = {"run": common_fields["run"], "model": common_fields["model"], "device": device.type,
                       "dtype": common_fields["dtype"], "batch_size": batch_size,
                       "unprofiled_step_ms": 1000 * seconds_per_step(train_record),
                       **profile_training(model, loss_fn, optimizer, columns, train_rows(profile_steps), generator,
                                          settings, autocast, device, profile_steps),
                       "cuda_graphs": cuda_graphs_field(settings, device, optimizer),
                       "traffic": eager_traffic(model, loss_fn, optimizer, columns, train_rows(1), settings, device,
                                                train_flops_per_row)}
        except Exception as exc:  # noqa: BLE001 - a profiler's failure must not cost the measurements above
            common.log(f"bench: the profile of {common_fields['run']} failed, its measurements stand: "
                       f"{type(exc).__name__}: {common.first_line(exc)}")
    return train_record, predict_record, profile


def seconds_per_step(train_record: dict) -> float:
    return train_record["seconds"] / train_record["steps"]


# ---------------------------------------------------------------------------------------------
# --profile: torch.profiler over a few training steps
# ---------------------------------------------------------------------------------------------

TOP_N = 15
NAME_CHARS = 160  # CUDA kernel names are whole C++ template signatures
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")  # what occupies a GPU stream (not annotations)
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchKernelExC", "cuLaunchKernelEx")
CPU_LAUNCHES_WHAT = ("cpu: leaf aten ops per step (aten ops with no aten op inside them), the analogue of "
                     "kernel launches; a CPU launches no kernels")
CUDA_LAUNCHES_WHAT = "cuda: kernels run on the GPU per step (memcpy and memset not counted)"
NO_GPU_EVENTS = "cuda: no GPU activity recorded by the profiler (CUPTI): launches and idle time unknown"


def profile_training(model, loss_fn, optimizer, columns, rows, generator, settings, autocast,
                     device: torch.device, steps: int) -> dict:
    """torch.profiler over ``steps`` training steps of fit.train_one_epoch (the model warmed):
    profile_summary of its events."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fit.train_one_epoch(model, loss_fn, optimizer, columns, rows, generator, settings, autocast)
        synchronize(device)
        wall = time.perf_counter() - start
    return profile_summary(profile_events(prof.events()), steps, wall, device.type)


def profile_events(events) -> dict:
    """The profiler's FunctionEvents as plain records: CPU-side (name, self time, leaf aten op or
    not) and device-side (kind, name, start and end in microseconds)."""
    from torch.autograd import DeviceType
    cpu, gpu = [], []
    for e in events:
        if e.device_type == DeviceType.CPU:
            cpu.append({"name": e.name, "self_us": e.self_cpu_time_total, "aten": e.name.startswith("aten::"),
                        "leaf": not any(c.name.startswith("aten::") for c in e.cpu_children)})
        elif (kind := device_activity(e, DeviceType.CUDA)) is not None:
            gpu.append({"name": e.name, "kind": kind, "start_us": e.time_range.start, "end_us": e.time_range.end})
    return {"cpu": cpu, "gpu": gpu}


def device_activity(event, cuda) -> str | None:
    """What a profiler event occupied a GPU stream with (one of DEVICE_ACTIVITIES), or None. Newer
    torch names it (FunctionEvent.activity_type); torch 2.11, the GPU image's, has no such field and
    only marks the device: there a CUDA event that is not a user annotation (a record_function range
    on the GPU timeline, which would cover the idle gaps) is a memcpy or memset by its name, else a
    kernel."""
    kind = getattr(event, "activity_type", None)
    if kind is None and event.device_type == cuda and not getattr(event, "is_user_annotation", False):
        kind = ("gpu_memcpy" if event.name.startswith("Memcpy") else
                "gpu_memset" if event.name.startswith("Memset") else "kernel")
    return kind if kind in DEVICE_ACTIVITIES else None


def idle_between(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, idle) of a GPU timeline, in the intervals' unit: busy is the length of their union,
    idle the sum of the gaps between consecutive busy stretches (before the first and after the
    last interval does not count)."""
    busy = idle = 0.0
    end = None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            if end is not None:
                idle += start - end
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy, idle


def top_by(records: list[dict], value: str, steps: int, step_ms: float) -> list[dict]:
    totals: dict = {}
    for r in records:
        name = r["name"][:NAME_CHARS]
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += r[value]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:TOP_N]
    return [{"name": name, "calls": calls, "calls_per_step": calls / steps, "total_ms": us / 1000,
             "ms_per_step": us / 1000 / steps, "pct_of_step": 100 * us / 1000 / steps / step_ms}
            for name, (calls, us) in ranked]


def profile_summary(events: dict, steps: int, wall_s: float, device_type: str) -> dict:
    """Per step: time, launches and (CUDA) the GPU's busy and idle time, and the top 15 by self
    time: kernels on CUDA (the CPU side's top ops beside them), ops on CPU."""
    step_ms = 1000 * wall_s / steps
    cpu_ops = [dict(r, value=r["self_us"]) for r in events["cpu"]]
    out = {"profiled_steps": steps, "step_ms": step_ms, "cpu_self_ms_per_step": sum(
        r["self_us"] for r in events["cpu"]) / 1000 / steps, "aten_ops_per_step": sum(
        r["aten"] for r in events["cpu"]) / steps}
    if device_type == "cuda":
        kernels = [r for r in events["gpu"] if r["kind"] == "kernel"]
        for r in events["gpu"]:
            r["us"] = r["end_us"] - r["start_us"]
        busy, idle = idle_between([(r["start_us"], r["end_us"]) for r in events["gpu"]])
        out.update(launches_per_step=len(kernels) / steps, launches_what=CUDA_LAUNCHES_WHAT,
                   memcpy_memset_per_step=(len(events["gpu"]) - len(kernels)) / steps,
                   launch_calls_per_step=sum(r["name"].startswith(LAUNCH_CALLS) for r in events["cpu"]) / steps,
                   gpu_busy_ms_per_step=busy / 1000 / steps, gpu_idle_ms_per_step=idle / 1000 / steps,
                   top=top_by(events["gpu"], "us", steps, step_ms),
                   top_cpu_ops=top_by(cpu_ops, "value", steps, step_ms))
        if not events["gpu"]:
            # CUPTI recorded no GPU activity (seen with kernels replayed from CUDA graphs under some
            # CUDA versions): no figure is better than launches and idle time of 0
            out.update(launches_per_step=None, launches_what=NO_GPU_EVENTS, memcpy_memset_per_step=None,
                       gpu_busy_ms_per_step=None, gpu_idle_ms_per_step=None)
    else:
        out.update(launches_per_step=sum(r["aten"] and r["leaf"] for r in events["cpu"]) / steps,
                   launches_what=CPU_LAUNCHES_WHAT, memcpy_memset_per_step=None, launch_calls_per_step=None,
                   gpu_busy_ms_per_step=None, gpu_idle_ms_per_step=None,
                   top=top_by(cpu_ops, "value", steps, step_ms))
    return out


class ProfileFile:
    """--profile FILE: one JSON object, rewritten whole after each profiled config."""

    def __init__(self, path: str, argv: list[str]):
        self.path = Path(path)
        self.report = {"schema": 1, "command": argv, "torch": torch.__version__, "top_n": TOP_N,
                       "configs": []}

    def add(self, entry: dict) -> None:
        self.report["configs"].append(rounded(entry))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------------
# the traffic model (with --profile): what one eager step moves through memory, and its floors
# ---------------------------------------------------------------------------------------------

TRAFFIC_TOP_N = 10
# ops that move no data: views and aliases (torch tags most of them is_view), allocations, markers
NO_TRAFFIC_OPS = frozenset({"detach", "_unsafe_view", "alias", "lift_fresh", "empty", "empty_like", "empty_strided",
                            "new_empty", "new_empty_strided", "_record_function_enter_new",
                            "_record_function_exit"})
# gathers read only the rows they take (an embedding table is far larger than what a batch reads)
GATHER_OPS = frozenset({"index", "index_select", "gather", "embedding", "_embedding_bag"})
# in-place ops that write their argument without reading it
WRITE_ONLY_OPS = frozenset({"zero_", "fill_", "copy_", "bernoulli_", "uniform_", "normal_", "random_"})
TRAFFIC_WHAT = ("every op one eager training step dispatches below autograd and autocast (eager mode runs each "
                "as one or a few kernels), and the bytes each reads and writes: every distinct tensor argument "
                "and result once, an argument an op updates in place twice (read and written), a gather twice "
                "the rows it takes and its indices; a lower bound on the step's memory traffic")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def updated_in_place(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op reads and then writes: the arguments its schema marks as written (Tensor(a!)),
    unless the op only writes them. A fused optimizer's schema marks its gradients as written for the
    unscaling it does with a grad_scale; without one it only reads them."""
    name = func.overloadpacket.__name__
    if name in WRITE_ONLY_OPS:
        return []
    read_only = {"grads"} if name.startswith("_fused_") and kwargs.get("grad_scale") is None else set()
    updated = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.name in read_only:
            continue
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            updated += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return updated


class EagerTraffic(TorchDispatchMode):
    """Counts what each dispatched op moves (TRAFFIC_WHAT), by op name."""

    def __init__(self):
        super().__init__()
        self.calls, self.moved = collections.Counter(), collections.Counter()
        self.no_traffic_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or torch.Tag.inplace_view in func.tags or name in NO_TRAFFIC_OPS:
            self.no_traffic_ops += 1
            return out
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in GATHER_OPS:  # the source (the first argument) is read only where the indices point
            moved = 2 * sum(map(tensor_bytes, outputs)) + sum(map(tensor_bytes, inputs[1:]))
        else:  # an in-place op returns its argument: the same tensor, read and written
            touched = {id(t): t for t in inputs + outputs}
            updated = {id(t): t for t in updated_in_place(func, args, kwargs)}
            moved = sum(map(tensor_bytes, touched.values())) + sum(map(tensor_bytes, updated.values()))
        self.calls[name] += 1
        self.moved[name] += moved
        return out


def traffic_floors(gb: float, tflop: float, dtype: str, device: torch.device) -> dict:
    """ms per step that the traffic alone (at the datasheet bandwidth) and the matmuls alone (at the
    datasheet peak) take on each of FLOOR_GPUS and on this GPU: no step of that GPU can be faster."""
    names = list(FLOOR_GPUS) + ([device_name(device)] if device.type == "cuda" else [])
    floors = {}
    for name in dict.fromkeys(names):
        bandwidth, peak = datasheet_memory_tb_s(name), datasheet_peak_tflops(name, dtype)
        floors[name] = {"memory_ms": None if bandwidth is None else gb / bandwidth,
                        "matmul_ms": None if peak is None else 1000 * tflop / peak}
    return floors


@contextlib.contextmanager
def dropout_as_on_cuda():
    """On a CPU, F.dropout (nn.Dropout's) as CUDA runs it: one fused op that writes the output and
    the mask (native_dropout), where the CPU draws the mask, scales it and multiplies, three passes."""
    original = torch.nn.functional.dropout

    def fused(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)
    torch.nn.functional.dropout = fused
    try:
        yield
    finally:
        torch.nn.functional.dropout = original


def eager_traffic(model, loss_fn, optimizer, columns, rows, settings, device: torch.device,
                  flops_per_row: float) -> dict:
    """The traffic model of fit's training step (make_train_step, eager) on one batch of ``rows``,
    counted at the second of two steps (Adam's state exists).

    In the ops and dtypes the step has on CUDA. On a CPU: a config that trains in bfloat16 there
    runs under the CPU's bfloat16 autocast (whose op lists are nearly CUDA's: CUDA keeps sum and
    softmax in float32), dropout as CUDA's one fused op, and adam_impl auto as CUDA's fused Adam. Not
    the attention's dropout inside scaled_dot_product_attention (nn.MultiheadAttention), which runs
    the CPU's math path: [B, H, L, L] masks, under 2 % of transformer_dcn_gpu's bytes. A compiled
    model is not modelled (its kernels are fused)."""
    if settings.compile:
        return {"what": "not modelled: a compiled step fuses its ops"}
    bf16 = settings.bf16  # as on CUDA, where fit trains in bfloat16 when asked
    on_cpu = device.type != "cuda"
    if not on_cpu:
        autocast = fit.autocast_for(bf16, device)
    elif bf16:
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    if on_cpu and settings.adam_impl == "auto":
        optimizer = fit.make_optimizer(model, dataclasses.replace(settings, adam_impl="fused"))
    step = fit.make_train_step(model, loss_fn, optimizer, columns, settings, autocast)
    counter = EagerTraffic()
    with dropout_as_on_cuda() if on_cpu else contextlib.nullcontext():
        step(rows)
        with counter:
            step(rows)
    synchronize(device)
    gb = sum(counter.moved.values()) / 1e9
    tflop = flops_per_row * rows.numel() / 1e12
    dtype = "bfloat16" if bf16 else "float32"
    top = counter.moved.most_common(TRAFFIC_TOP_N)
    return {"what": TRAFFIC_WHAT, "dtype": dtype, "rows": rows.numel(),
            "ops_per_step": sum(counter.calls.values()), "no_traffic_ops_per_step": counter.no_traffic_ops,
            "gb_per_step": gb, "tflop_per_step": tflop,
            "top": [{"op": name, "calls": counter.calls[name], "gb": moved / 1e9,
                     "pct_of_gb": 100 * moved / 1e9 / gb} for name, moved in top],
            "floors": traffic_floors(gb, tflop, dtype, device),
            # whose floors a one-line summary quotes: this GPU's, or on a CPU the H200's
            "floor_gpu": device_name(device) if device.type == "cuda" else FLOOR_GPUS[-1]}


# ---------------------------------------------------------------------------------------------
# --same-function: a variant's step against the baseline's, from the same weights at every step
# ---------------------------------------------------------------------------------------------

SAME_FUNCTION_STEPS = fit.GraphedSteps.WARMUP_STEPS + 3  # cuda_graphs: warm-up, then capture and replays


def adam_state_pairs(base_opt, base_model, other_opt, other_model):
    for p, q in zip(base_model.parameters(), other_model.parameters()):
        a, b = base_opt.state.get(p, {}), other_opt.state.get(q, {})
        for key in a.keys() & b.keys():
            yield a[key], b[key]


def same_function(cfg: dict, variant_cfg: dict, data: dict, tables: dict, device: torch.device,
                  steps: int = SAME_FUNCTION_STEPS) -> dict:
    """The largest relative differences between the baseline's training step and the variant's over
    ``steps`` full batches, both from the same weights, buffers and Adam state at every step and
    the same RNG seed: loss (|dl| / |l|), gradients after the clip and the update (max |d| over all
    parameters / max |value| over all parameters)."""
    settings, variant_settings = fit_settings(cfg), fit_settings(variant_cfg)
    common.seed_everything(cfg["train"]["seed"])
    base = model_config.build_model(cfg["model"], tables).to(device)
    other = copy.deepcopy(base)
    columns = data["train"]
    steppers, optimizers = [], []
    for model, s in ((base, settings), (other, variant_settings)):
        loss_fn, _, optimizer, autocast = fit.make_step_parts(model, s)
        model.train()
        steppers.append(fit.training_step(model, loss_fn, optimizer, columns, s, autocast))
        optimizers.append(optimizer)
    n_train, batch_size = columns["label"].numel(), settings.batch_size
    worst = {"loss_rel_diff": 0.0, "grad_rel_diff": 0.0, "update_rel_diff": 0.0}
    for step in range(steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size, device=device) % n_train
        with torch.no_grad():  # the variant starts this step where the baseline does
            for a, b in zip(base.state_dict().values(), other.state_dict().values()):
                b.copy_(a)
            for a, b in adam_state_pairs(optimizers[0], base, optimizers[1], other):
                b.copy_(a)
        before = [p.detach().clone() for p in base.parameters()]
        losses = []
        for stepper in steppers:
            torch.manual_seed(cfg["train"]["seed"] + step)  # the same dropout masks (CPU and CUDA)
            losses.append(stepper(rows).double())
        grads = [[p.grad.detach().double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                  for p in m.parameters()] for m in (base, other)]
        with torch.no_grad():
            loss_diff = float((losses[1] - losses[0]).abs() / losses[0].abs().clamp_min(1e-30))
            grad_scale = max(float(g.abs().max()) for g in grads[0])
            grad_diff = max(float((a - b).abs().max()) for a, b in zip(*grads)) / max(grad_scale, 1e-30)
            update_scale = max(float((p.double() - q.double()).abs().max()) for p, q in zip(base.parameters(), before))
            update_diff = max(float((p.double() - q.double()).abs().max())
                              for p, q in zip(base.parameters(), other.parameters())) / max(update_scale, 1e-30)
        for key, value in zip(worst, (loss_diff, grad_diff, update_diff)):
            worst[key] = max(worst[key], value)
    return {"steps": steps, "batch_size": batch_size, **worst,
            "cuda_graphs": cuda_graphs_field(variant_settings, device, optimizers[1])}


def data_bytes(data: dict, tables: dict) -> int:
    tensors = [t for split in data.values() for t in split.values()]
    tensors += [t for t in tables.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_preprocess(cfg: dict) -> dict:
    """Wall time and peak RSS of rebuilding the config's processed folder from its raw files."""
    reset_peak_memory(torch.device("cpu"))
    rss_before = proc_status_kb("VmRSS")
    load_at_start = load_1m()
    start = time.perf_counter()
    processed = preprocess.run_preprocess(cfg, force=True)
    seconds = time.perf_counter() - start
    cpu = torch.device("cpu")
    peak = peak_memory_bytes(cpu)
    rows = sum(common.read_json(processed / "manifest.json")["n_rows"].values())
    return {"measure": "preprocess", "data": cfg["data"]["raw_dir"], "device_name": device_name(cpu),
            "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_bytes": peak,
            # the process held torch and its libraries before preprocessing started
            "rss_before_bytes": None if rss_before is None else rss_before * 1024, "load_1m": load_at_start}


def compare_record(variant: str, train_rates: dict, predict_rates: dict) -> dict:
    def ratio(rates):
        return statistics.median(rates[variant]) / statistics.median(rates["baseline"])
    return {"measure": "compare", "variant": variant, "repeats": len(train_rates[variant]),
            "train_rows_per_s": {"baseline": statistics.median(train_rates["baseline"]),
                                 "variant": statistics.median(train_rates[variant])},
            "predict_rows_per_s": {"baseline": statistics.median(predict_rates["baseline"]),
                                   "variant": statistics.median(predict_rates[variant])},
            "train_ratio": ratio(train_rates), "predict_ratio": ratio(predict_rates)}


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def rounded(value):
    """Four significant digits: the noise of a benchmark is larger than that."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def preset_paths(preset: str, data_root: Path) -> tuple[Path, Path]:
    return data_root / preset, data_root / "work" / preset  # run.sh's layout


def with_train_defaults(cfg: dict) -> dict:
    """The train section completed with train.TrainConfig's defaults, so that --set and --compare
    reach every key of it (e.g. a speed option that configs/train.yaml does not list)."""
    if isinstance(cfg.get("train"), dict):
        for f in dataclasses.fields(train.TrainConfig):
            if f.init and f.default is not dataclasses.MISSING:
                cfg["train"].setdefault(f.name, f.default)
    return cfg


def config_of(args: argparse.Namespace, path: str) -> dict:
    cfg = with_train_defaults(common.load_config(path))
    if args.preset:
        raw_dir, work_dir = preset_paths(args.preset, Path(args.data_root))
        cfg["data"].update(raw_dir=str(raw_dir), work_dir=str(work_dir))
    for assignment in args.overrides:  # after the preset: an explicit --set wins
        common.apply_override(cfg, assignment)
    return cfg


def run_benchmark(args: argparse.Namespace, emit) -> None:
    previous = fit.CPU_GRAPHS
    if args.rehearse_cuda_graphs:
        fit.CPU_GRAPHS = "rehearse"
    try:
        benchmark_configs(args, emit)
    finally:
        fit.CPU_GRAPHS = previous


def benchmark_configs(args: argparse.Namespace, emit) -> None:
    configs = [(path, config_of(args, path), steps) for path, steps in args.configs]
    base_cfg = configs[0][1]
    raw_dir = Path(base_cfg["data"]["raw_dir"])
    if args.preset and not (raw_dir / "item_info.parquet").is_file():  # written last: the set is complete
        common.log(f"bench: generating the {args.preset} preset into {raw_dir}")
        make_synthetic.generate(args.preset, raw_dir, PRESET_SEED, workers=os.cpu_count() or 1)

    if args.preprocess:
        context = {"config": configs[0][0], "preset": args.preset, "overrides": args.overrides}
        emit({"measure": "preprocess", **context, **measure_preprocess(base_cfg)})
    loaded = {}  # (data section, device) -> (data, tables): configs and variants share the upload
    for path, cfg, steps in configs:
        if steps != 0 or args.same_function:  # steps 0 with --same-function: the checks alone
            bench_config(args, path, cfg, steps, loaded, emit)


def bench_config(args: argparse.Namespace, path: str, base_cfg: dict, steps: int | str, loaded: dict,
                 emit) -> None:
    """The train and predict records of one config and of its --compare variants."""
    context = {"config": path, "preset": args.preset, "overrides": args.overrides}
    variants = {"baseline": base_cfg}
    for assignment in args.compare:
        variants[assignment] = copy.deepcopy(base_cfg)
        try:
            common.apply_override(variants[assignment], assignment)
        except common.UserError as exc:  # the message names --set, the flag that shares the syntax
            raise common.UserError(str(exc).replace("--set", "--compare", 1)) from None
    variants = {label: train.checked_config(cfg, args.device) for label, cfg in variants.items()}

    peak_tflops = args.peak
    train_rates = {label: [] for label in variants}
    predict_rates = {label: [] for label in variants}

    def device_and_data(cfg: dict):
        device = train.resolve_device(cfg["train"]["device"])
        fit.configure_backend(device)
        key = (common.config_hash(cfg["data"]), str(device))
        if key not in loaded:
            if args.preset and not (common.data_paths(cfg)["processed"] / "manifest.json").is_file():
                preprocess.run_preprocess(cfg)  # a preset bench makes its data; it never rebuilds it
            _, arrays, manifest = processed_data.load_current(cfg)
            loaded[key] = (train.load_to_device(arrays, device), train.item_tables(arrays, manifest, device))
        return device, loaded[key]

    if args.same_function:  # first: a variant that does not compute the same function is no speed-up
        checks = {"baseline (rerun)": variants["baseline"],
                  **{label: cfg for label, cfg in variants.items() if label != "baseline"}}
        for label, cfg in checks.items():
            device, (data, tables) = device_and_data(cfg)
            emit({"measure": "same_function", "variant": label, **context,
                  "run": cfg["run"]["name"], "device": device.type, "device_name": device_name(device),
                  **same_function(variants["baseline"], cfg, data, tables, device)})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for repeat in range(args.repeats if steps != 0 else 0):
        for label, cfg in variants.items():
            device, (data, tables) = device_and_data(cfg)
            profiled = args.profile_file is not None and repeat == 0 and (
                not args.profile_variants or label in args.profile_variants)
            profile_steps = args.profile_steps if profiled else 0
            train_record, predict_record, profile = measure_model(
                cfg, data, tables, device, steps, args.warmup, peak_tflops, args.predict_rows, profile_steps)
            for record in (train_record, predict_record):
                emit({"measure": record["measure"], "variant": label, **context, **record})
            if profile is not None:
                args.profile_file.add({"config": path, "variant": label, "overrides": args.overrides, **profile})
                traffic = profile["traffic"]
                moved = f", {traffic['gb_per_step']:.3g} GB moved" if "gb_per_step" in traffic else ""
                launches, idle = profile["launches_per_step"], profile["gpu_idle_ms_per_step"]
                common.log(f"bench: profiled {path} ({label}): {profile['step_ms']:.4g} ms per step, "
                           f"{'unknown' if launches is None else f'{launches:.0f}'} launches per step, GPU idle "
                           f"{'n/a' if idle is None else f'{idle:.4g} ms'} per step{moved} -> {args.profile_file.path}")
            train_rates[label].append(train_record["rows_per_s"])
            predict_rates[label].append(predict_record["rows_per_s"])
            gc.collect()  # the finished model's memory must not count toward the next peak
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for label in args.compare if steps != 0 else ():
        emit({**compare_record(label, train_rates, predict_rates), "config": path})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", dest="configs", action="append", default=[], metavar="CONFIG[@STEPS]",
                        help="YAML config to measure (default: configs/qin.yaml); repeatable: the configs "
                             "run in turn on data loaded once; @STEPS: this config's timed steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every config, e.g. --set train.batch_size=1024")
    parser.add_argument("--preset", choices=sorted(make_synthetic.PRESETS), default=None,
                        help="use the synthetic preset under --data-root (generated if missing) "
                             "instead of the config's data.raw_dir / data.work_dir")
    parser.add_argument("--data-root", default="data", help="folder of the presets (default: data)")
    parser.add_argument("--steps", type=parse_steps, default=50,
                        help="timed training steps (default 50), or 'epoch': one pass over the train "
                             "split; 0 measures no model (only --same-function's checks, if asked)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed training steps first (default 10)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="force the device (default: train.device, auto = CUDA when present)")
    parser.add_argument("--predict-rows", type=int, default=None, metavar="N",
                        help="predict only the first N test rows (default: the whole test split; "
                             "a published config on a CPU needs minutes for 379k rows)")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="also measure the config with this override and print the rows/s ratio "
                             "variant / baseline (repeatable: one variant each)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure baseline and variants in turn this many times; ratios of medians")
    parser.add_argument("--preprocess", action="store_true",
                        help="also measure preprocess.run_preprocess(cfg, force=True): seconds, peak RSS")
    parser.add_argument("--peak-tflops", type=parse_peak, default=None, metavar="TFLOPS|matmul",
                        help="the hardware peak for fraction_of_peak (default: datasheet table for "
                             "known GPUs, null on CPU; matmul: measure a large matmul)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also profile --profile-steps training steps of every config and variant "
                             "(first repeat) with torch.profiler; the summary goes to FILE (JSON)")
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="training steps profiled per config with --profile (default 5)")
    parser.add_argument("--profile-variant", dest="profile_variants", action="append", default=[],
                        metavar="LABEL", help="with --profile, profile only this variant: baseline or a "
                                              "--compare KEY=VALUE (repeatable; default: every one)")
    parser.add_argument("--same-function", action="store_true",
                        help="first check that every --compare variant (and a rerun of the baseline: "
                             "the noise) computes the baseline's step: same_function lines")
    parser.add_argument("--rehearse-cuda-graphs", action="store_true",
                        help="on a CPU, run train.cuda_graphs=true through fit's graph path, each capture "
                             "replaced by a call of the captured function (no effect on CUDA)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    configs = []
    for text in args.configs or [str(common.CONFIG_DIR / "qin.yaml")]:
        path, at, steps = text.partition("@")
        try:
            configs.append((path, parse_steps(steps) if at else args.steps))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--config {text}: {exc}")
    args.configs = configs
    args.peak = PeakTflops(args.peak_tflops)  # one per run: a measured peak is measured once
    if args.predict_rows is not None and args.predict_rows < 1:
        parser.error("--predict-rows must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.profile_steps < 1:
        parser.error("--profile-steps must be at least 1")
    unknown = set(args.profile_variants) - {"baseline", *args.compare}
    if unknown:
        parser.error(f"--profile-variant {sorted(unknown)[0]}: not baseline nor a --compare of this command")
    args.profile_file = None if args.profile is None else ProfileFile(
        args.profile, ["tools/bench.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main() -> None:
    args = parse_args()
    json_out = sys.stdout
    def emit(record: dict) -> None:
        print(json.dumps(rounded(record)), file=json_out, flush=True)

    with contextlib.redirect_stdout(sys.stderr):  # the stages' logs must not mix with the JSON lines
        run_benchmark(args, emit)


if __name__ == "__main__":
    common.run_main(main)
