"""Data parallelism for one fold (torch DistributedDataParallel), proven on the CPU with gloo and 2
processes: the training steps equal one process's on the same global batches, and a fold trained
by `torchrun --nproc-per-node 2 src/train.py` writes the same files as one process.

Nothing here runs on a GPU: there the same code takes NCCL and torch's SyncBatchNorm (on the CPU,
fit.CPUSyncBatchNorm, since torch's refuses CPU tensors).
"""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmctr import common
from mmctr.models import fit
from mmctr import model_config
from mmctr import processed_data
from mmctr import train
from mmctr.models.tables import item_tables, row_arrays, to_device

# name: (config, overrides, the step: fuxictr = train.loss fuxictr and emb_l2_in_loss, the default;
# logits = train.loss logits, the L2 by the optimizer). Dropout off: each rank draws its own dropout
# masks, so only a dropout-free model can match one process; every model keeps its BatchNorm (DIN
# with Dice, whose BatchNorm runs over B x L positions). QIN once with each step.
STEP_MODELS = {
    "qin_small": ("qin_small", ["model.dropout=0"], "fuxictr"),
    "dcnv2_tf_small": ("dcnv2_tf_small", ["model.dropout=0"], "fuxictr"),
    "din_tf_small": ("din_tf_small", ["model.dropout=0", "model.attention_dropout=0",
                                      "model.attention_activation=dice"], "fuxictr"),
    "qin_small, loss from logits": ("qin_small", ["model.dropout=0"], "logits"),
}
# one global batch of an odd number of rows: slices of 501 and 500 rows, weighted 1.001 and 0.999
N_ROWS = 1001


def tiny_model_and_data(raw, name: str):
    frames = {split: pd.read_parquet(raw / f"{split}.parquet") for split in ("train", "valid", "test")}
    tables = item_tables(pd.read_parquet(raw / "item_info.parquet"), frames.values())
    data = {split: to_device(row_arrays(frame), "cpu") for split, frame in frames.items()}
    config, overrides, _ = STEP_MODELS[name]
    cfg = common.load_config(common.CONFIG_DIR / f"{config}.yaml", overrides)
    torch.manual_seed(0)
    return model_config.build_model(cfg["model"], tables), data


def one_step(raw, name: str) -> dict:
    """One training step of fit.train_one_epoch (slices, loss weights, DDP, synchronised BatchNorm,
    clipping) on one global batch of N_ROWS train rows, under whatever process group is initialised.

    One step, because a second one starts from parameters that differ by float rounding, which
    flips the odd ReLU (QIN's attention scores) and so moves some gradients by a fixed amount, one
    process or several. The optimizer is plain SGD, not fit's Adam: Adam's first step is
    lr * sign(gradient), which turns float noise in a gradient that is zero in exact arithmetic
    (the bias of a Linear just before a BatchNorm) into a full step of either sign.
    """
    model, data = tiny_model_and_data(raw, name)
    step = STEP_MODELS[name][2]
    settings = fit.FitSettings(seed=5, batch_size=N_ROWS, loss=step, emb_l2=0.5, emb_l2_in_loss=step == "fuxictr")
    loss_fn, _, adam, autocast = fit.make_step_parts(model, settings)
    # fit's parameter groups (the embedding module's is where emb_l2_in_loss adds the L2 gradient)
    optimizer = torch.optim.SGD([{"params": g["params"], "embedding_l2": g.get("embedding_l2", False),
                                  "weight_decay": g["weight_decay"]} for g in adam.param_groups], lr=0.5)
    loss, _ = fit.train_one_epoch(model, loss_fn, optimizer, data["train"], torch.arange(N_ROWS),
                                  torch.Generator().manual_seed(settings.seed), settings, autocast)
    return {"loss": loss, "state": model.state_dict(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def rank_main(rank: int, world: int, store: str, raw, out_dir) -> None:
    """One gloo rank (torch.multiprocessing.spawn): one_step of every model, saved per rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save({name: one_step(raw, name) for name in STEP_MODELS}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("affine", [True, False])
def test_cpu_sync_batch_norm_is_batch_norm_on_the_global_batch(tmp_path, affine):
    """On a group of one process the global batch is the local one: CPUSyncBatchNorm must then be
    BatchNorm1d, in output, gradients and running statistics (the 2-process tests split it)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(6, eps=1e-8, affine=affine)
    if affine:
        torch.nn.init.normal_(bn.weight), torch.nn.init.normal_(bn.bias)
    x, upstream = torch.randn(50, 6) * 3 + 1, torch.randn(50, 6)  # upstream: a gradient varying by row
    results = {}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for name, module in (("one process", bn), ("synchronised", fit.CPUSyncBatchNorm.like(bn))):
            x_m = x.clone().requires_grad_()
            outputs = [module(x_m) for _ in range(2)]  # twice: the running statistics move twice
            sum((out * upstream).sum() for out in outputs).backward()
            results[name] = (outputs[1].detach(), x_m.grad, module)
    finally:
        dist.destroy_process_group()
    (out, x_grad, bn), (sync_out, sync_x_grad, sync) = results.values()
    torch.testing.assert_close(sync_out, out)
    torch.testing.assert_close(sync_x_grad, x_grad, rtol=1e-4, atol=1e-5)
    assert list(sync.state_dict()) == list(bn.state_dict())
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value)
    for sync_param, param in zip(sync.parameters(), bn.parameters()):  # weight and bias when affine
        torch.testing.assert_close(sync_param.grad, param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_ddp_step_on_two_gloo_processes_equals_one_process(tiny_raw, tmp_path):
    mp.spawn(rank_main, args=(2, str(tmp_path / "store"), tiny_raw, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: one_step(tiny_raw, name) for name in STEP_MODELS}
    finally:
        torch.set_num_threads(threads)
    for name, one in single.items():
        ddp = ranks[0][name]
        assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-6), name
        # the same parameter names as one process's (the checkpoint loads into a plain model)
        assert list(ddp["state"]) == list(one["state"]) and set(ddp["grads"]) == set(one["grads"]), name
        # the gradients, the parameters after the step and BatchNorm's running statistics
        for what, tensors in [("gradient", one["grads"]), ("state", one["state"])]:
            for key, want in tensors.items():
                assert_close_in_norm(ddp["grads" if what == "gradient" else "state"][key], want,
                                     f"{name} {what} {key}")
        for key, value in ddp["state"].items():  # the ranks hold one model
            assert torch.equal(ranks[1][name]["state"][key], value), f"{name} {key}"


def assert_close_in_norm(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float rounding: |got - want| <= 1e-4 |want| + 1e-6 (the floor for tensors that
    are zero in exact arithmetic, such as the gradient of a bias just before a BatchNorm)."""
    got, want = got.double(), want.double()
    error, size = (got - want).norm().item(), want.norm().item()
    assert error <= 1e-4 * size + 1e-6, f"{what}: |difference| {error:.3g}, |one process| {size:.3g}"


FOLD_FILES = ["best.pt", "done.json", "history.json", "oof.parquet", "test.parquet", "valid.parquet"]


@pytest.mark.slow
def test_a_fold_under_torchrun_writes_the_files_of_one_process(tiny_cfg, tiny_processed, tmp_path):
    overrides = STEP_MODELS["qin_small"][1] + ["train.max_epochs=1", "train.batch_size=512", "train.eval_batch_size=2048"]

    def cfg_for(name: str) -> dict:
        cfg = common.load_config(common.CONFIG_DIR / "qin_small.yaml", overrides)
        cfg["data"] = dict(tiny_cfg["data"])
        cfg["run"]["name"] = name
        return cfg

    one = train.run_training(cfg_for("ddp_one_process"), folds=[0], device="cpu")
    config = tmp_path / "qin.yaml"
    common.write_yaml(config, cfg_for("ddp_two_processes"))
    # torchrun as `python -m torch.distributed.run`: this interpreter; --standalone: a free port
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(common.REPO_ROOT / "src" / "train.py"), "--config", str(config), "--folds", "0",
                             "--device", "cpu"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = one.parent / "ddp_two_processes"

    for folder in ("fold0", "."):
        assert sorted(p.name for p in (two / folder).iterdir()) == sorted(p.name for p in (one / folder).iterdir())
    assert sorted(p.name for p in (two / "fold0").iterdir()) == FOLD_FILES
    assert result.stdout.count("fold 0 done:") == 1, result.stdout  # one rank logs, one rank writes
    fingerprints = [common.read_json(run / "fingerprint.json")["data_fingerprint"] for run in (one, two)]
    assert fingerprints[1] == fingerprints[0]
    done = {run: common.read_json(run / "fold0" / "done.json") for run in (one, two)}
    assert done[two]["device"] == "2 processes on cpu (DDP)" and set(done[two]) == set(done[one])
    history = {run: common.read_json(run / "fold0" / "history.json") for run in (one, two)}
    assert [h["epoch"] for h in history[two]] == [h["epoch"] for h in history[one]] == [1]
    assert history[two][0]["train_loss"] == pytest.approx(history[one][0]["train_loss"], rel=1e-5)
    for split in ("oof", "valid", "test"):
        frames = [pd.read_parquet(run / "fold0" / f"{split}.parquet") for run in (one, two)]
        assert list(frames[1].columns) == list(frames[0].columns)
        np.testing.assert_array_equal(frames[1].iloc[:, 0], frames[0].iloc[:, 0])  # the same row ids
        np.testing.assert_allclose(frames[1]["pred"], frames[0]["pred"], rtol=0, atol=1e-5, err_msg=split)
    # the checkpoint (a synchronised BatchNorm's state has BatchNorm's names) loads into a plain model
    arrays, manifest = processed_data.load_processed(tiny_processed)
    tables = train.item_tables(arrays, manifest, torch.device("cpu"))
    plain = model_config.build_model(cfg_for("plain")["model"], tables)
    plain.load_state_dict(torch.load(two / "fold0" / "best.pt"))
