"""The training loop, in memory: fit a model on rows of device tensors, get it back with its predictions.

    torch.manual_seed(seed)                       # fit draws its shuffles from settings.seed; the
    model = QIN(tables).to(device)                # global RNG (weight init, dropout) is the caller's
    result = fit(model, data, train_rows, {"valid": ("valid", valid_rows)}, FitSettings())
    result.model, result.best_epoch, result.history, result.predictions["valid"]
    test_probs = predict(result.model, data["test"])

``data`` maps a split name to its columns, tensors on the model's device: the features a model
reads (FEATURES: [N] ids and levels, item_seq [N, 64]) and, for splits that are fitted or scored,
``label`` [N] float 0/1. A batch is a gather of row indices on the device: no data loader, no
per-batch host work, and no host sync inside the step loop (except a progress report every
``log_every`` steps when asked for one), so a GPU is fed as fast as it computes.

The schedule is QIN's released one (FuxiCTR's): Adam; BCE computed as FuxiCTR does, from the
float32 probabilities; an L2 penalty on the embedding module only (the tables and the multimodal
map) whose gradient joins the loss's before gradient-norm clipping; after every epoch the AUC of
every eval set; an epoch that does not improve the monitored AUC multiplies the learning rate by
``lr_decay`` and counts toward early stopping (``patience``); the best epoch's weights are kept and
loaded at the end. ``loss="logits"`` and ``emb_l2_in_loss=False`` give the numerically sounder
step (BCE from the logits, the L2 added by Adam after the clip); docs/REPRODUCTION.md measures
both. bfloat16 autocast on CUDA and ``torch.compile`` are switches; on the CPU everything runs in
float32 with deterministic kernels, so the same seed gives the same predictions bit for bit.

Speed options, all off by default (docs/BENCHMARKS.md, "The speed options"), each the same function as
the default step up to float rounding (tests/test_fit.py measures how close): ``cuda_graphs``
replays the whole step (gather, forward, loss, backward, L2 gradient, clip, Adam) as one CUDA graph
per batch size (CUDA only: on a CPU the plain loop runs); ``foreach_l2`` adds the embedding L2's
gradient with one foreach op; ``adam_impl`` picks Adam's implementation.

Under torch.distributed (``torchrun``: one process per GPU, or gloo processes on a CPU) every rank
calls fit with the same arguments and data and trains one model: each rank draws the same shuffle,
takes its slice of every global batch (the batch size and learning rate stay those of one device),
DistributedDataParallel sums the gradients into those of the global batch's mean loss, and
BatchNorm layers normalise with the global batch's statistics. Rank 0 alone scores the eval sets,
decides improvement and early stopping for all ranks, and reports; its FitResult alone holds
scores and predictions.

Imports torch, numpy and metrics.py only: paste it into a notebook beside the model files.
"""
import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .metrics import log_loss, roc_auc
from .schema import FEATURES

# bounds on a setting, for config loaders (common.typed_section checks them)
AT_LEAST_1, POSITIVE, NON_NEGATIVE, FACTOR = {"min": 1}, {"positive": True}, {"min": 0}, {"positive": True, "max": 1}


@dataclass
class FitSettings:
    """The schedule; the defaults are QIN's released settings (docs/spec/qin.md)."""
    seed: int = 20242025                                     # the shuffle order of every epoch
    batch_size: int = field(default=8192, metadata=AT_LEAST_1)  # training rows per Adam step
    # rows per forward pass at evaluation: no gradients, so far larger batches fit
    eval_batch_size: int = field(default=65536, metadata=AT_LEAST_1)
    lr: float = field(default=2.0e-3, metadata=POSITIVE)     # Adam's initial learning rate
    lr_min: float = field(default=1.0e-6, metadata=POSITIVE)  # the learning rate is never decayed below this
    lr_decay: float = field(default=0.5, metadata=FACTOR)    # lr factor after an epoch that did not improve
    min_delta: float = field(default=1.0e-6, metadata=NON_NEGATIVE)  # improving: beating the best AUC by more
    patience: int = field(default=8, metadata=AT_LEAST_1)    # stop after this many epochs in a row without
    max_epochs: int = field(default=100, metadata=AT_LEAST_1)  # hard cap on epochs
    emb_l2: float = field(default=2.0e-4, metadata=NON_NEGATIVE)  # L2 emb_l2/2 * ||W||^2 on the embedding module
    grad_clip: float = field(default=10.0, metadata=POSITIVE)  # global gradient-norm clip before each step
    # FuxiCTR's training step, which the released models train with (docs/REPRODUCTION.md): BCE
    # from the float32 probabilities (layers.bce; "logits": from the logits, where a negative with a
    # logit above ~16.6 still gets its gradient), and the L2's gradient added before the clip, as
    # for a penalty in the loss (False: Adam adds it after the clip). The reported train loss never
    # includes the L2.
    loss: Literal["logits", "fuxictr"] = "fuxictr"
    emb_l2_in_loss: bool = True
    bf16: bool = True                                        # bfloat16 autocast on CUDA (the CPU: float32)
    compile: bool = False                                    # torch.compile the model's loss and forward
    log_every: int = field(default=50, metadata=AT_LEAST_1)  # steps between progress reports (a host sync each)
    # speed options: the same function as the default step (up to float rounding), off by default.
    # cuda_graphs: on CUDA (one process, not compiled) the whole step is captured in a CUDA graph
    # per batch size and replayed (Adam capturable, its lr a device tensor); elsewhere the plain loop
    cuda_graphs: bool = False
    foreach_l2: bool = False  # the embedding L2's gradient added by one torch._foreach_add_, not a loop
    # Adam's implementation: auto = fused on CUDA, the for-loop on CPU (torch's defaults there)
    adam_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


@dataclass
class FitResult:
    model: nn.Module                          # the best epoch's weights, in eval mode
    best_epoch: int                           # 1-based; the last epoch when there is no eval set
    history: list = field(default_factory=list)       # one dict per epoch: train_loss, {set}_auc, ...
    scores: dict = field(default_factory=dict)        # the best epoch's {set}_auc and {set}_logloss
    predictions: dict = field(default_factory=dict)   # eval set -> the best epoch's probabilities
    train_seconds: float = 0.0                # time in the training steps, evaluation excluded
    rows_per_s: float = 0.0                   # training rows per second over all epochs


# ---------------------------------------------------------------------------------------------
# the parts of a step
# ---------------------------------------------------------------------------------------------

def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        # float32 matmuls that autocast leaves alone run on tensor cores: ~10 bits of mantissa is
        # plenty for a CTR model and several times faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # the same call twice gives bit-identical predictions on CPU (CUDA keeps its fast,
        # atomics-based kernels: a GPU run is reproducible only up to float rounding)
        torch.use_deterministic_algorithms(True)
        # ...without its debugging aid of filling every new tensor with NaN before use: no kernel
        # here reads memory it has not written, and the fills were 5 % of a CPU step (docs/BENCHMARKS.md)
        torch.utils.deterministic.fill_uninitialized_memory = False


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gather(columns: dict, rows: torch.Tensor) -> dict:
    return {name: columns[name][rows] for name in FEATURES if name in columns}


def bf16_enabled(settings: FitSettings, device: torch.device) -> bool:
    return settings.bf16 and device.type == "cuda"  # the CPU always trains in float32


def autocast_for(bf16: bool, device: torch.device, cache: bool = True):
    """bfloat16 autocast on CUDA when asked for; otherwise no context at all (an autocast with
    enabled=False would switch off an autocast the caller opened around the call). ``cache=False``:
    no cache of the weights' casts, as a CUDA graph capture needs (the same values, recast)."""
    if bf16 and device.type == "cuda":  # the CPU always runs float32
        if not cache:
            return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, cache_enabled=False)
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def embedding_parameters(model: nn.Module) -> list:
    """The embedding module, as FuxiCTR's embedding_regularizer sees it: the trainable weights of
    every embedding table and of every module marked embedding_l2 (the multimodal projection)."""
    weights = {id(p): p for m in model.modules()
               if isinstance(m, nn.Embedding) or getattr(m, "embedding_l2", False)
               for p in m.parameters(recurse=False) if p.requires_grad}
    return list(weights.values())


def make_optimizer(model: nn.Module, settings: FitSettings) -> torch.optim.Adam:
    embedding_weights = embedding_parameters(model)
    embedding_ids = {id(p) for p in embedding_weights}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in embedding_ids]
    # Adam's weight_decay is the classic coupled L2: it adds emb_l2 * W to the gradient, exactly
    # the gradient of a penalty emb_l2/2 * ||W||^2 in the loss (FuxiCTR's embedding_regularizer),
    # and a param group confines it to the embedding module. With emb_l2_in_loss the step adds that
    # gradient itself, before the clip (add_embedding_l2_gradient), and Adam adds nothing.
    groups = [{"params": embedding_weights, "embedding_l2": True,
               "weight_decay": 0.0 if settings.emb_l2_in_loss else settings.emb_l2},
              {"params": other, "weight_decay": 0.0}]
    device = device_of(model)
    if settings.adam_impl == "auto":  # today's choice, argument for argument
        impl = {"fused": device.type == "cuda"}
    else:
        impl = {"fused": settings.adam_impl == "fused", "foreach": settings.adam_impl == "foreach"}
    lr = settings.lr
    graphs = graph_mode(settings, device)
    if graphs == "capture" or (graphs == "rehearse" and settings.adam_impl != "foreach"):
        # a captured step reads the lr from device memory: a float would be baked into the graph, so
        # the lr is a tensor that set_lr fills in place (float32: what fused Adam's kernel computes
        # in anyway). The rehearsal on a CPU uses the same tensor (torch refuses a tensor lr to a
        # foreach Adam that is not capturable, and capturable only on CUDA)
        lr = torch.tensor(settings.lr, dtype=torch.float32, device=device)
        impl["capturable"] = graphs == "capture"
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, **impl)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a tensor lr (cuda_graphs) is filled in place, so that a captured
    step reads the new value."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def add_embedding_l2_gradient(optimizer: torch.optim.Optimizer, emb_l2: float, foreach: bool = False) -> None:
    """grad += emb_l2 * W on the embedding group: the gradient of the penalty emb_l2/2 * ||W||^2,
    as if it were part of the loss (then the clip scales it with the data gradient, as FuxiCTR's).
    ``foreach``: one torch._foreach_add_ over the group (one multi-tensor kernel on CUDA)."""
    for group in optimizer.param_groups:
        if group.get("embedding_l2"):
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if not foreach:
                    p.grad.add_(p.detach(), alpha=emb_l2)
            if foreach:
                torch._foreach_add_([p.grad for p in group["params"]], [p.detach() for p in group["params"]],
                                    alpha=emb_l2)


def compiled_for_batches(fn: Callable) -> Callable:
    """torch.compile(fn) for fn(batch, *tensors), every argument's first dimension (the rows)
    dynamic from the first call. Training batches come in two sizes (tensor_split: n and n + 1
    rows) and the last prediction batch is partial: with static shapes each new size is another
    compile (minutes on a GPU image) before torch falls back to dynamic shapes by itself."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        # ATen's CPU kernels without SIMD (a CPU without AVX2, or ATEN_CPU_CAPABILITY=default):
        # inductor would still emit ATen's vector types in its C++ code, which then fails to compile
        from torch._inductor import config as inductor_config
        inductor_config.cpp.simdlen = 1
    compiled = torch.compile(fn)

    def call(batch: dict, *tensors):
        for t in (*batch.values(), *tensors):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(batch, *tensors)
    return call


def make_step_parts(model: nn.Module, settings: FitSettings):
    """(loss_fn, forward, optimizer, autocast): what fit runs, so a benchmark can time exactly that.

    Under torch.distributed, the model's BatchNorm layers become synchronised ones (in place) and
    loss_fn runs the loss through DistributedDataParallel."""
    loss_fn, device = functools.partial(model.loss, form=settings.loss), device_of(model)
    if rank_and_world()[1] > 1:
        sync_batch_norm(model)
        # the BatchNorm statistics are equal on every rank already, and the other buffers are the
        # constant item tables: far too big to broadcast at every step
        ddp = functools.partial(DistributedDataParallel, LossOf(model, settings.loss),
                                device_ids=[device.index] if device.type == "cuda" else None)
        try:  # newer torch (2.13 here) names it forward_sync_buffers and deprecates broadcast_buffers
            loss_fn = ddp(forward_sync_buffers=False)
        except TypeError:
            loss_fn = ddp(broadcast_buffers=False)
    loss_fn = compiled_for_batches(loss_fn) if settings.compile else loss_fn
    forward = compiled_for_batches(model) if settings.compile else model
    autocast = autocast_for(settings.bf16, device, cache=graph_mode(settings, device) != "capture")
    return loss_fn, forward, make_optimizer(model, settings), autocast


def make_train_step(model, loss_fn, optimizer, columns, settings, autocast) -> Callable:
    """step(batch_rows) -> the batch's mean loss (detached): the whole training step of one global
    batch of row indices (this rank's slice of it under torch.distributed): gather, forward, loss,
    backward, the embedding L2's gradient, the clip and Adam's step. train_one_epoch calls it, and
    with cuda_graphs it is the function a CUDA graph captures."""
    rank, world = rank_and_world()
    params = [p for p in model.parameters() if p.requires_grad]
    labels = columns["label"]

    def train_step(batch_rows: torch.Tensor) -> torch.Tensor:
        rows_here = batch_rows.tensor_split(world)[rank]  # with one process, the whole batch
        with autocast():
            loss, _ = loss_fn(gather(columns, rows_here), labels[rows_here])
        optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: weighting each rank's mean loss by world x its share of
        # the batch turns that average into the gradient of the global batch's mean loss, also when
        # the batch does not split evenly (with one process the weight is exactly 1)
        (loss * (world * rows_here.numel() / batch_rows.numel())).backward()
        if settings.emb_l2_in_loss:
            add_embedding_l2_gradient(optimizer, settings.emb_l2, settings.foreach_l2)
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip, foreach=True)
        optimizer.step()
        return loss.detach()
    return train_step


def training_step(model, loss_fn, optimizer, columns, settings, autocast) -> Callable:
    """The step train_one_epoch runs: make_train_step's, replayed from CUDA graphs with cuda_graphs
    (the graphs are kept with the optimizer, so every epoch replays the same ones)."""
    step = make_train_step(model, loss_fn, optimizer, columns, settings, autocast)
    mode = graph_mode(settings, device_of(model))
    if mode is None:
        return step
    return graphed_steps(optimizer, step, mode, device_of(model), (columns, loss_fn, autocast, settings))


def train_one_epoch(model, loss_fn, optimizer, columns, rows, generator, settings, autocast,
                    progress: Optional[Callable] = None) -> tuple[float, float]:
    """One pass over ``rows`` in shuffled order; returns (mean train loss, seconds).

    ``progress(rows_done, rows_total, mean_loss)`` is called at the start (loss NaN), every
    ``log_every`` steps and at the end.
    """
    start = time.time()
    model.train()
    rank, world = rank_and_world()
    # the permutation is drawn on the CPU so that the shuffle is the same on every device and rank
    order = rows[torch.randperm(rows.numel(), generator=generator).to(rows.device)]
    # near-equal batches instead of full ones plus a remainder: no tiny last batch for BatchNorm
    batches = order.tensor_split(math.ceil(rows.numel() / settings.batch_size))
    if batches[-1].numel() < world:
        raise ValueError(f"batches of {batches[-1].numel()} rows cannot be split among {world} ranks")
    step = training_step(model, loss_fn, optimizer, columns, settings, autocast)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
    seen = seen_here = 0  # rows of the global batches, rows of this rank's slices
    if progress is not None:
        progress(0, rows.numel(), float("nan"))  # the epoch starts: a rate is measured from here
    for step_number, batch_rows in enumerate(batches, 1):
        loss = step(batch_rows)
        n_here = batch_rows.tensor_split(world)[rank].numel()
        loss_sum += loss * n_here
        seen, seen_here = seen + batch_rows.numel(), seen_here + n_here
        if progress is not None and step_number % settings.log_every == 0:
            progress(seen, rows.numel(), loss_sum.item() / seen_here)  # the loop's only host sync
    if world > 1:
        dist.all_reduce(loss_sum)  # the loss summed over every rank's rows
    mean_loss = loss_sum.item() / seen
    if progress is not None:
        progress(seen, rows.numel(), mean_loss)
    return mean_loss, time.time() - start


# ---------------------------------------------------------------------------------------------
# cuda_graphs: the training step captured once per batch size and replayed
# ---------------------------------------------------------------------------------------------

# What cuda_graphs does on a CPU: "eager" runs the plain loop (graphs are CUDA-only); "rehearse" runs
# the graph path with each capture replaced by the captured function, called at every replay on
# the static rows buffer (tests/test_fit.py, tools/bench.py --rehearse-cuda-graphs)
CPU_GRAPHS: Literal["eager", "rehearse"] = "eager"


def graph_mode(settings: FitSettings, device: torch.device) -> Optional[str]:
    """How settings.cuda_graphs runs: "capture" (CUDA, one process, not compiled: torch.compile has
    its own graphs), "rehearse" (a CPU under CPU_GRAPHS = "rehearse"), or None: the plain loop."""
    if not settings.cuda_graphs or settings.compile or rank_and_world()[1] > 1:
        return None
    if device.type == "cuda":
        return "capture"
    return "rehearse" if CPU_GRAPHS == "rehearse" else None


class _CudaGraphs:
    """Warm-up on a side stream, capture into a graph pool that every size's graph shares (they
    never run at once, and each writes what it reads first), replay on the current stream."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def side_stream(self):
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def capture(self, fn: Callable) -> Callable:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.stream.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()  # recorded, not run
        except Exception:
            self.recover(current)
            raise

        def replay():
            graph.replay()
            return out
        return replay

    @staticmethod
    def recover(current: "torch.cuda.Stream") -> None:
        """After a failed capture torch leaves its capture stream current and the CUDA generator
        marked as capturing (the next eager dropout would fail): the caller's stream back, then one
        trivial capture, whose end clears the generator's mark. Best effort: what still fails shows
        in the eager steps that follow."""
        torch.cuda.set_stream(current)
        with contextlib.suppress(Exception):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                torch.zeros(1, device=current.device).add_(1)


class _Rehearsal:
    """The CPU's stand-in: a "capture" keeps the function, a "replay" calls it (on the static rows)."""

    @staticmethod
    def side_stream():
        return contextlib.nullcontext()

    @staticmethod
    def capture(fn: Callable) -> Callable:
        return fn


class GraphedSteps:
    """step(batch_rows) run from CUDA graphs. Per batch size: WARMUP_STEPS eager steps (real steps of
    real batches, on a side stream: lazy initialisation and Adam's state happen outside a capture),
    then the step is captured reading its rows from a static buffer, and every later batch of that
    size is copied into the buffer and replayed. tensor_split makes at most two sizes per epoch
    (n and n + 1 rows); a size beyond MAX_GRAPHS runs eagerly. A capture that fails (an op that
    syncs with the host) is reported once and the steps run eagerly from then on."""
    WARMUP_STEPS = 3
    MAX_GRAPHS = 2

    def __init__(self, step: Callable, mode: str, device: torch.device, key: tuple):
        self.step, self.mode, self.key = step, mode, key
        self.backend = _CudaGraphs(device) if mode == "capture" else _Rehearsal()
        self.graphs: dict = {}      # rows -> (static rows buffer, replay)
        self.eager_steps: dict = {}  # rows -> eager steps run so far
        self.replays = 0
        self.failed: Optional[str] = None

    def __call__(self, batch_rows: torch.Tensor) -> torch.Tensor:
        n = batch_rows.numel()
        if n in self.graphs:
            static_rows, replay = self.graphs[n]
            static_rows.copy_(batch_rows)
            self.replays += 1
            return replay()
        done = self.eager_steps.get(n, 0)
        self.eager_steps[n] = done + 1
        if self.failed or len(self.graphs) >= self.MAX_GRAPHS:
            return self.step(batch_rows)
        if done < self.WARMUP_STEPS:
            with self.backend.side_stream():
                return self.step(batch_rows)
        static_rows = batch_rows.clone()
        try:
            replay = self.backend.capture(lambda: self.step(static_rows))
        except Exception as exc:  # noqa: BLE001 - the step itself is sound: it ran eagerly just before
            self.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            warnings.warn(f"train.cuda_graphs: capturing the training step failed ({self.failed}); "
                          f"training goes on eagerly", RuntimeWarning, stacklevel=2)
            if self.mode == "capture":
                torch.cuda.synchronize()
            self.eager_steps[n] -= 1
            return self(batch_rows)
        self.eager_steps[n] -= 1  # this batch is the first replay
        self.graphs[n] = (static_rows, replay)
        self.replays += 1
        return replay()

    def status(self) -> dict:
        return {"mode": self.mode, "graphs": sorted(self.graphs), "replays": self.replays,
                "eager_steps": sum(self.eager_steps.values()), "failed": self.failed}


def graphed_steps(optimizer, step: Callable, mode: str, device: torch.device, key: tuple) -> GraphedSteps:
    """The optimizer's GraphedSteps (its graphs live as long as it does and serve every epoch), new
    when the columns, loss function, autocast or settings differ from the ones it was built for."""
    runner = getattr(optimizer, "_graphed_steps", None)
    if runner is None or len(runner.key) != len(key) or any(a is not b for a, b in zip(runner.key, key)):
        runner = GraphedSteps(step, mode, device, key)
        optimizer._graphed_steps = runner
    return runner


def graph_status(optimizer) -> Optional[dict]:
    """What cuda_graphs did with this optimizer's steps (None: the plain loop ran)."""
    runner = getattr(optimizer, "_graphed_steps", None)
    return None if runner is None else runner.status()


@torch.inference_mode()
def predict(model: nn.Module, columns: dict, rows: Optional[torch.Tensor] = None,
            batch_size: int = 65536, bf16: bool = True, forward=None) -> np.ndarray:
    """Click probabilities of ``rows`` (default: every row) of one split, in that order, as float32
    numpy. ``forward`` replaces ``model`` as the callable (a compiled model)."""
    model.eval()
    device = columns["item_id"].device
    if rows is None:
        rows = torch.arange(columns["item_id"].numel(), device=device)
    autocast = autocast_for(bf16, device)
    forward = model if forward is None else forward
    probs = torch.empty(rows.numel(), dtype=torch.float32, device=device)
    for start in range(0, rows.numel(), batch_size):
        batch_rows = rows[start:start + batch_size]
        with autocast():
            logits = forward(gather(columns, batch_rows))
        probs[start:start + batch_rows.numel()] = torch.sigmoid(logits.float())
    return probs.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# several processes (torchrun): one model, each rank a slice of every batch
# ---------------------------------------------------------------------------------------------

def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) under torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LossOf(nn.Module):
    """``model.loss`` as a module's forward: DistributedDataParallel synchronises the gradients of
    what runs through the forward of the module it wraps, and a model's loss is another method."""

    def __init__(self, model: nn.Module, form: str = "logits"):
        super().__init__()
        self.model, self.form = model, form

    def forward(self, batch, label):
        return self.model.loss(batch, label, self.form)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce (sum) that autograd goes through: every rank's loss reads the sum, so the gradient
    of each rank's addend is the sum of every rank's gradient of it."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm1d):
    """nn.SyncBatchNorm for CPU tensors (gloo), which SyncBatchNorm refuses: in training, [N, C]
    input is normalised with the mean and (biased) variance of every rank's rows together, and the
    running statistics move as BatchNorm1d's would on the global batch."""

    @classmethod
    def like(cls, bn: nn.BatchNorm1d) -> "CPUSyncBatchNorm":
        if bn.momentum is None or not bn.track_running_stats:
            raise NotImplementedError("CPUSyncBatchNorm: only BatchNorm1d with a momentum and running statistics")
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine).train(bn.training)
        sync.load_state_dict(bn.state_dict())
        return sync

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if x.dim() != 2:
            raise NotImplementedError(f"CPUSyncBatchNorm: [N, C] input only, got {list(x.shape)}")
        count = x.new_tensor(float(x.shape[0]))
        dist.all_reduce(count)
        mean = _SumOverRanks.apply(x.sum(0)) / count
        centred = x - mean
        var = _SumOverRanks.apply((centred * centred).sum(0)) / count
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as BatchNorm's
            self.num_batches_tracked += 1
        out = centred * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def sync_batch_norm(model: nn.Module) -> None:
    """Every BatchNorm layer of ``model`` (replaced in place) normalises with the statistics of the
    global batch: torch's SyncBatchNorm on GPUs, CPUSyncBatchNorm on the CPU."""
    if device_of(model).type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces every BatchNorm below the top module
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm1d:
                setattr(parent, name, CPUSyncBatchNorm.like(child))


def from_rank0(values: list) -> list:
    """Rank 0's ``values`` (picklable) on every rank: what rank 0 alone decided."""
    if rank_and_world()[1] > 1:
        dist.broadcast_object_list(values, src=0)
    return values


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def fit(model: nn.Module, data: dict, train_rows: torch.Tensor, eval_sets: dict,
        settings: FitSettings = FitSettings(), monitor: Optional[str] = None,
        on_epoch: Optional[Callable] = None, progress: Optional[Callable] = None,
        train_split: str = "train", lr_by_epoch: Optional[list] = None) -> FitResult:
    """Train ``model`` on ``data[train_split]`` rows ``train_rows``; return the best epoch's model.

    eval_sets: name -> (split, rows), scored after every epoch (AUC and log loss). ``monitor``
    names the set whose AUC decides improvement, learning-rate decay and early stopping (default:
    the first); with no eval set every epoch up to max_epochs runs and the last one is kept.
    lr_by_epoch: the learning rate of each epoch (at least max_epochs of them) in place of the
    decay on a plateau (a refit replaying its folds' schedule).
    on_epoch(record) gets each epoch's history record; progress(epoch, rows_done, rows_total,
    mean_loss) reports inside an epoch (both on rank 0 only). Non-finite predictions raise
    FloatingPointError.
    """
    device = device_of(model)
    configure_backend(device)
    generator = torch.Generator().manual_seed(settings.seed)
    loss_fn, forward, optimizer, autocast = make_step_parts(model, settings)
    rank, _ = rank_and_world()
    if rank > 0:
        # dropout draws from the global RNG, which the caller seeded alike on every rank: without a
        # seed of its own, each rank's slice of a batch would get rank 0's dropout masks
        torch.manual_seed(settings.seed + rank)
    monitor = monitor or next(iter(eval_sets), None)
    if monitor is not None and monitor not in eval_sets:
        raise ValueError(f"monitor: {monitor!r} is not an eval set ({', '.join(eval_sets)})")
    eval_labels = {name: data[split]["label"][rows].cpu().numpy() for name, (split, rows) in eval_sets.items()}
    columns = data[train_split]

    lr, best, bad_epochs = settings.lr, None, 0
    result = FitResult(model=model, best_epoch=0)
    for epoch in range(1, settings.max_epochs + 1):
        epoch_start = time.time()
        if lr_by_epoch is not None:  # a given schedule (a refit replaying its folds') instead of the decay
            lr = lr_by_epoch[epoch - 1]
            set_lr(optimizer, lr)
        report = None if progress is None or rank > 0 else functools.partial(progress, epoch)
        train_loss, seconds = train_one_epoch(model, loss_fn, optimizer, columns, train_rows, generator,
                                              settings, autocast, report)
        result.train_seconds += seconds
        probs, scores, monitored, improved = {}, {}, None, None
        if rank == 0:  # rank 0 alone scores the epoch (its error ends the run: torchrun stops the others)
            for name, (split, rows) in eval_sets.items():
                probs[name] = predict(model, data[split], rows, settings.eval_batch_size, settings.bf16, forward)
                if not np.isfinite(probs[name]).all():
                    raise FloatingPointError(f"epoch {epoch} {name}: non-finite predictions, training diverged "
                                             f"(try a lower learning rate)")
                scores[f"{name}_auc"] = roc_auc(eval_labels[name], probs[name])
                scores[f"{name}_logloss"] = log_loss(eval_labels[name], probs[name])
            monitored = scores[f"{monitor}_auc"] if monitor else None
            improved = best is None or monitor is None or monitored > best["monitored"] + settings.min_delta
        [improved] = from_rank0([improved])
        if improved:
            # the best epoch's predictions are kept rather than predicted again after training
            best = {"monitored": monitored, "epoch": epoch, "scores": scores, "probs": probs,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        record = {"epoch": epoch, "train_loss": train_loss, **scores, "lr": lr,
                  "seconds": time.time() - epoch_start, "improved": improved}
        result.history.append(record)
        if on_epoch is not None and rank == 0:
            on_epoch(record)
        if not improved:
            lr = max(lr * settings.lr_decay, settings.lr_min)
            set_lr(optimizer, lr)
            if bad_epochs >= settings.patience:
                break

    model.load_state_dict(best["state"])
    model.eval()
    result.best_epoch, result.scores, result.predictions = best["epoch"], best["scores"], best["probs"]
    result.rows_per_s = train_rows.numel() * len(result.history) / result.train_seconds
    return result
