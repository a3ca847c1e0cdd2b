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

The schedule is QIN's released one (FuxiCTR's): Adam, L2 on the embedding tables only,
gradient-norm clipping, and after every epoch the AUC of every eval set; an epoch that does not
improve the monitored AUC multiplies the learning rate by ``lr_decay`` and counts toward early
stopping (``patience``); the best epoch's weights are kept and loaded at the end. bfloat16
autocast on CUDA and ``torch.compile`` are switches; on the CPU everything runs in float32 with
deterministic kernels, so the same seed gives the same predictions bit for bit.

Imports torch, numpy and metrics.py only: paste it into a notebook beside the model files.
"""
import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from metrics import log_loss, roc_auc

# The columns a model's batch holds (user_id only for models that use it)
FEATURES = ("user_id", "item_id", "item_seq", "likes_level", "views_level")


# bounds on a setting, for config loaders (common.typed_section checks them)
AT_LEAST_1, POSITIVE = {"min": 1}, {"positive": True}


@dataclass
class FitSettings:
    """The schedule; the defaults are QIN's released settings (docs/spec/qin.md)."""
    seed: int = 20242025                                     # the shuffle order of every epoch
    batch_size: int = field(default=8192, metadata=AT_LEAST_1)  # training rows per Adam step
    # rows per forward pass at evaluation: no gradients, so far larger batches fit
    eval_batch_size: int = field(default=65536, metadata=AT_LEAST_1)
    lr: float = field(default=2.0e-3, metadata=POSITIVE)     # Adam's initial learning rate
    lr_min: float = field(default=1.0e-6, metadata=POSITIVE)  # the learning rate is never decayed below this
    lr_decay: float = field(default=0.5, metadata=POSITIVE)  # lr factor after an epoch that did not improve
    min_delta: float = 1.0e-6                                # improving means beating the best AUC by more
    patience: int = field(default=8, metadata=AT_LEAST_1)    # stop after this many epochs in a row without
    max_epochs: int = field(default=100, metadata=AT_LEAST_1)  # hard cap on epochs
    emb_l2: float = 2.0e-4                                   # L2 emb_l2/2 * ||W||^2 on the embedding module
    grad_clip: float = field(default=10.0, metadata=POSITIVE)  # global gradient-norm clip before each step
    bf16: bool = True                                        # bfloat16 autocast on CUDA (the CPU: float32)
    compile: bool = False                                    # torch.compile the model's loss and forward
    log_every: int = field(default=50, metadata=AT_LEAST_1)  # steps between progress reports (a host sync each)


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


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gather(columns: dict, rows: torch.Tensor) -> dict:
    return {name: columns[name][rows] for name in FEATURES if name in columns}


def bf16_enabled(settings: FitSettings, device: torch.device) -> bool:
    return settings.bf16 and device.type == "cuda"  # the CPU always trains in float32


def autocast_for(bf16: bool, device: torch.device):
    """bfloat16 autocast on CUDA when asked for; otherwise no context at all (an autocast with
    enabled=False would switch off an autocast the caller opened around the call)."""
    if bf16 and device.type == "cuda":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(model: nn.Module, settings: FitSettings) -> torch.optim.Adam:
    # the embedding module, as FuxiCTR's embedding_regularizer sees it: every embedding table and
    # every module marked embedding_l2 (the multimodal projection)
    embedding_weights = {id(p): p for m in model.modules()
                         if isinstance(m, nn.Embedding) or getattr(m, "embedding_l2", False)
                         for p in m.parameters(recurse=False) if p.requires_grad}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in embedding_weights]
    # Adam's weight_decay is the classic coupled L2: it adds emb_l2 * W to the gradient, exactly
    # the gradient of a penalty emb_l2/2 * ||W||^2 in the loss (FuxiCTR's embedding_regularizer),
    # and a param group confines it to the embedding module.
    groups = [{"params": list(embedding_weights.values()), "weight_decay": settings.emb_l2},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=settings.lr,
                            fused=device_of(model).type == "cuda")


def make_step_parts(model: nn.Module, settings: FitSettings):
    """(loss_fn, forward, optimizer, autocast): what fit runs, so a benchmark can time exactly that."""
    loss_fn = torch.compile(model.loss) if settings.compile else model.loss
    forward = torch.compile(model) if settings.compile else model
    autocast = autocast_for(settings.bf16, device_of(model))
    return loss_fn, forward, make_optimizer(model, settings), autocast


def train_one_epoch(model, loss_fn, optimizer, columns, rows, generator, settings, autocast,
                    progress: Optional[Callable] = None) -> tuple[float, float]:
    """One pass over ``rows`` in shuffled order; returns (mean train loss, seconds).

    ``progress(rows_done, rows_total, mean_loss)`` is called at the start (loss NaN), every
    ``log_every`` steps and at the end.
    """
    start = time.time()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    labels = columns["label"]
    # the permutation is drawn on the CPU so that the shuffle is the same on every device
    order = rows[torch.randperm(rows.numel(), generator=generator).to(rows.device)]
    # near-equal batches instead of full ones plus a remainder: no tiny last batch for BatchNorm
    batches = order.tensor_split(math.ceil(rows.numel() / settings.batch_size))
    loss_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
    seen = 0
    if progress is not None:
        progress(0, rows.numel(), float("nan"))  # the epoch starts: a rate is measured from here
    for step, batch_rows in enumerate(batches, 1):
        with autocast():
            loss, _ = loss_fn(gather(columns, batch_rows), labels[batch_rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip, foreach=True)
        optimizer.step()
        loss_sum += loss.detach() * batch_rows.numel()
        seen += batch_rows.numel()
        if progress is not None and step % settings.log_every == 0:
            progress(seen, rows.numel(), loss_sum.item() / seen)  # the loop's only host sync
    mean_loss = loss_sum.item() / seen
    if progress is not None:
        progress(seen, rows.numel(), mean_loss)
    return mean_loss, time.time() - start


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
# the loop
# ---------------------------------------------------------------------------------------------

def fit(model: nn.Module, data: dict, train_rows: torch.Tensor, eval_sets: dict,
        settings: FitSettings = FitSettings(), monitor: Optional[str] = None,
        on_epoch: Optional[Callable] = None, progress: Optional[Callable] = None,
        train_split: str = "train") -> FitResult:
    """Train ``model`` on ``data[train_split]`` rows ``train_rows``; return the best epoch's model.

    eval_sets: name -> (split, rows), scored after every epoch (AUC and log loss). ``monitor``
    names the set whose AUC decides improvement, learning-rate decay and early stopping (default:
    the first); with no eval set every epoch up to max_epochs runs and the last one is kept.
    on_epoch(record) gets each epoch's history record; progress(epoch, rows_done, rows_total,
    mean_loss) reports inside an epoch. Non-finite predictions raise FloatingPointError.
    """
    device = device_of(model)
    configure_backend(device)
    generator = torch.Generator().manual_seed(settings.seed)
    loss_fn, forward, optimizer, autocast = make_step_parts(model, settings)
    monitor = monitor or next(iter(eval_sets), None)
    if monitor is not None and monitor not in eval_sets:
        raise ValueError(f"monitor: {monitor!r} is not an eval set ({', '.join(eval_sets)})")
    eval_labels = {name: data[split]["label"][rows].cpu().numpy() for name, (split, rows) in eval_sets.items()}
    columns = data[train_split]

    lr, best, bad_epochs = settings.lr, None, 0
    result = FitResult(model=model, best_epoch=0)
    for epoch in range(1, settings.max_epochs + 1):
        epoch_start = time.time()
        report = None if progress is None else functools.partial(progress, epoch)
        train_loss, seconds = train_one_epoch(model, loss_fn, optimizer, columns, train_rows, generator,
                                              settings, autocast, report)
        result.train_seconds += seconds
        probs, scores = {}, {}
        for name, (split, rows) in eval_sets.items():
            probs[name] = predict(model, data[split], rows, settings.eval_batch_size, settings.bf16, forward)
            if not np.isfinite(probs[name]).all():
                raise FloatingPointError(f"epoch {epoch} {name}: non-finite predictions, training diverged "
                                         f"(try a lower learning rate)")
            scores[f"{name}_auc"] = roc_auc(eval_labels[name], probs[name])
            scores[f"{name}_logloss"] = log_loss(eval_labels[name], probs[name])
        monitored = scores[f"{monitor}_auc"] if monitor else None
        improved = best is None or monitor is None or monitored > best["monitored"] + settings.min_delta
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
        if on_epoch is not None:
            on_epoch(record)
        if not improved:
            lr = max(lr * settings.lr_decay, settings.lr_min)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if bad_epochs >= settings.patience:
                break

    model.load_state_dict(best["state"])
    model.eval()
    result.best_epoch, result.scores, result.predictions = best["epoch"], best["scores"], best["probs"]
    result.rows_per_s = train_rows.numel() * len(result.history) / result.train_seconds
    return result
