"""The k-fold trainer: run directory contract, resume, reproducibility, stale outputs, schedule.

Every run trains on the tiny synthetic data (2 folds) with the *_small model configs shrunk further
by overrides, on the CPU, under its own run name in the session's shared work folder.

Robustness, on the shared `pipeline` (conftest) or a private work folder, under one torch thread:
user errors change nothing, a run killed (SIGKILL) mid-fold resumes to identical predictions,
changed data or config is recomputed (and blend refuses the stale runs), and no fold model ever
predicts the rows it trained on.
"""
import copy
import functools
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mmctr import blend
from mmctr import common
from mmctr.models import fit
from mmctr.models import schema
from mmctr.models import layers
from mmctr import model_config
from mmctr import preprocess
from mmctr import processed_data
from mmctr import runs
from mmctr import train
from mmctr.models.fit import FitSettings
from helpers import (FASTEST, ONE_THREAD_ENV, SRC, TINY_TRAIN, assert_user_error, edit_value, make_cfg, outputs,
                     replace_column, restored, snapshot, truncate, typo_config, write_config)

MODELS = ("qin_small", "dcnv2_tf_small", "din_tf_small")
FOLD_FILES = ("best.pt", "history.json", "oof.parquet", "valid.parquet", "test.parquet", "done.json")
PREDICTIONS = ("oof.parquet", "valid.parquet", "test.parquet",
               "fold0/oof.parquet", "fold1/oof.parquet", "fold1/valid.parquet", "fold1/test.parquet")


@pytest.fixture(scope="module", autouse=True)
def processed(tiny_processed):
    """The tiny data, preprocessed once: every test here trains on it (train.py never builds it)."""
    return processed_data.load_processed(tiny_processed)


def assert_same_predictions(run_a, run_b, files=PREDICTIONS):
    for name in files:
        pd.testing.assert_frame_equal(pd.read_parquet(run_a / name), pd.read_parquet(run_b / name))


@pytest.mark.parametrize("model", MODELS)
def test_one_fold_writes_the_fold_files(tiny_cfg, processed, model):
    arrays, manifest = processed
    run_dir = train.run_training(make_cfg(tiny_cfg, model, f"one_fold_{model}"), folds=[0], device="cpu")

    assert run_dir == common.data_paths(tiny_cfg)["runs"] / f"one_fold_{model}"
    assert common.load_config(run_dir / "config.yaml")["train"]["max_epochs"] == 2
    assert common.read_json(run_dir / "fingerprint.json")["data_fingerprint"] == manifest["fingerprint"]
    fold_dir = run_dir / "fold0"
    assert all((fold_dir / name).is_file() for name in FOLD_FILES)
    assert not (run_dir / "fold1").exists() and not (run_dir / "oof.parquet").exists()

    history = common.read_json(fold_dir / "history.json")
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "fold_auc", "fold_logloss", "valid_auc", "valid_logloss",
                               "lr", "seconds"}
    done = common.read_json(fold_dir / "done.json")
    assert done["fold"] == 0 and done["best_epoch"] in (1, 2) and 0 < done["fold_auc"] <= 1

    oof = pd.read_parquet(fold_dir / "oof.parquet")
    assert list(oof.columns) == ["row_id", "pred"]
    np.testing.assert_array_equal(oof["row_id"], np.flatnonzero(np.asarray(arrays["train_fold"]) == 0))
    valid = pd.read_parquet(fold_dir / "valid.parquet")
    np.testing.assert_array_equal(valid["row_id"], np.arange(manifest["n_rows"]["valid"]))
    test = pd.read_parquet(fold_dir / "test.parquet")
    assert list(test.columns) == ["ID", "pred"]
    np.testing.assert_array_equal(test["ID"], np.asarray(arrays["test_ID"]))
    for frame in (oof, valid, test):
        assert frame["pred"].between(0, 1).all()

    state = torch.load(fold_dir / "best.pt")
    assert all(tensor.device.type == "cpu" for tensor in state.values())


def test_all_folds_aggregate_and_reproduce(tiny_cfg, processed):
    arrays, _ = processed
    run_a = train.run_training(make_cfg(tiny_cfg, FASTEST, "repro_a"), device="cpu")

    oof = pd.read_parquet(run_a / "oof.parquet")
    assert list(oof.columns) == ["row_id", "fold", "pred"]
    np.testing.assert_array_equal(oof["row_id"], np.arange(len(arrays["train_fold"])))
    np.testing.assert_array_equal(oof["fold"], np.asarray(arrays["train_fold"]))
    fold_tests = [pd.read_parquet(run_a / f"fold{k}" / "test.parquet")["pred"] for k in (0, 1)]
    np.testing.assert_allclose(pd.read_parquet(run_a / "test.parquet")["pred"],
                               (fold_tests[0] + fold_tests[1]) / 2, rtol=1e-6)
    metrics = common.read_json(run_a / "metrics.json")
    assert [m["fold"] for m in metrics["folds"]] == [0, 1]
    assert 0.5 < metrics["oracle_oof_auc"] <= 1 and 0.5 < metrics["oracle_valid_auc"] <= 1
    assert "OOF" in (run_a / "report.md").read_text()

    # the same config under another name: bit-identical predictions on CPU
    run_b = train.run_training(make_cfg(tiny_cfg, FASTEST, "repro_b"), device="cpu")
    assert_same_predictions(run_a, run_b)


def test_resume_skips_done_folds_and_redoes_the_rest_identically(tiny_cfg, monkeypatch):
    reference = train.run_training(make_cfg(tiny_cfg, FASTEST, "resume_reference"), device="cpu")
    cfg = make_cfg(tiny_cfg, FASTEST, "resume")
    run_dir = common.data_paths(cfg)["runs"] / "resume"

    # crash while fold 1 writes its outputs: it is left with some files but no done.json
    write_parquet = common.write_parquet

    def crash_on_fold1_test(path, df):
        if path == run_dir / "fold1" / "test.parquet":
            raise RuntimeError("simulated crash")
        write_parquet(path, df)

    monkeypatch.setattr(common, "write_parquet", crash_on_fold1_test)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run_training(cfg, device="cpu")
    monkeypatch.undo()
    assert (run_dir / "fold0" / "done.json").is_file() and (run_dir / "fold1" / "oof.parquet").is_file()
    assert not (run_dir / "fold1" / "done.json").exists() and not (run_dir / "oof.parquet").exists()

    fold0_mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold0").iterdir()}
    train.run_training(cfg, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold0").iterdir()} == fold0_mtimes
    assert (run_dir / "fold1" / "done.json").is_file()
    assert_same_predictions(reference, run_dir)


def test_a_resume_under_another_thread_count_says_so(tiny_cfg, capsys):
    """Finished folds keep the numerics they were trained under (done.json); a resume under other
    ones is valid but not bit-identical to one uninterrupted run, and says so in one line."""
    cfg = make_cfg(tiny_cfg, FASTEST, "numerics")
    threads = torch.get_num_threads()
    train.run_training(cfg, folds=[0], device="cpu")
    run_dir = common.data_paths(cfg)["runs"] / "numerics"
    recorded = runs.fold_metrics(run_dir, 0)["numerics"]
    assert recorded == {"torch": torch.__version__, "threads": threads, "mkldnn": torch.backends.mkldnn.enabled,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    capsys.readouterr()
    torch.set_num_threads(threads + 1)
    try:
        train.run_training(cfg, folds=[1], device="cpu")
    finally:
        torch.set_num_threads(threads)
    said = capsys.readouterr()
    assert f"note: fold 0 was trained with threads {threads} (now {threads + 1})" in said.out + said.err


def test_changed_config_moves_stale_outputs_aside(tiny_cfg):
    one_epoch = "train.max_epochs=1"
    run_dir = train.run_training(make_cfg(tiny_cfg, FASTEST, "stale", one_epoch), folds=[0], device="cpu")
    done = run_dir / "fold0" / "done.json"
    stamp = done.stat().st_mtime_ns

    # a run-time-only key (log_every) leaves the fingerprint, and so fold 0, alone
    train.run_training(make_cfg(tiny_cfg, FASTEST, "stale", one_epoch, "train.log_every=7"), folds=[0],
                       device="cpu")
    assert done.stat().st_mtime_ns == stamp

    old_hash = common.read_json(run_dir / "fingerprint.json")["config_hash"]
    train.run_training(make_cfg(tiny_cfg, FASTEST, "stale", one_epoch, "train.lr=5e-4"), folds=[1],
                       device="cpu")
    assert not (run_dir / "fold0").exists() and (run_dir / "fold1" / "done.json").is_file()
    assert common.read_json(run_dir / "fingerprint.json")["config_hash"] != old_hash
    assert common.load_config(run_dir / "config.yaml")["train"]["lr"] == 5e-4
    # nothing finished is deleted: the old outputs wait beside the run, as they were
    [aside] = run_dir.parent.glob("stale.old-*")
    assert (aside / "fold0" / "done.json").stat().st_mtime_ns == stamp
    assert common.read_json(aside / "fingerprint.json")["config_hash"] == old_hash



def test_moving_the_data_or_the_work_folder_keeps_finished_folds(tiny_cfg, tmp_path, capsys):
    """A fingerprint holds content, not paths: the same data and work folder under other paths (here
    symlinks; a moved folder or a relative path alike) reuse the finished folds. A run stamped in the
    older form, with the paths in its hash, is restamped, not retrained."""
    cfg = make_cfg(tiny_cfg, FASTEST, "moved", "train.max_epochs=1")
    run_dir = train.run_training(cfg, folds=[0], device="cpu")
    done = run_dir / "fold0" / "done.json"
    stamp = done.stat().st_mtime_ns
    fingerprint = common.read_json(run_dir / "fingerprint.json")
    (tmp_path / "raw_elsewhere").symlink_to(cfg["data"]["raw_dir"])
    (tmp_path / "work_elsewhere").symlink_to(cfg["data"]["work_dir"])
    moved = copy.deepcopy(cfg)
    moved["data"].update(raw_dir=str(tmp_path / "raw_elsewhere"), work_dir=str(tmp_path / "work_elsewhere"))
    train.run_training(moved, folds=[0], device="cpu")
    assert done.stat().st_mtime_ns == stamp and common.read_json(run_dir / "fingerprint.json") == fingerprint

    _, _, manifest = processed_data.load_current(cfg)
    legacy = train.fingerprint_of(train.checked_config(cfg, "cpu"), manifest, legacy=True)
    assert legacy != fingerprint
    common.write_json(run_dir / "fingerprint.json", legacy)
    capsys.readouterr()
    train.run_training(cfg, folds=[0], device="cpu")
    assert done.stat().st_mtime_ns == stamp and common.read_json(run_dir / "fingerprint.json") == fingerprint
    assert "restamped" in capsys.readouterr().out
    assert not list(run_dir.parent.glob("moved.old-*"))


def test_the_older_fingerprint_form_is_the_one_older_code_stamped():
    """Hashes a run folder of the older form carries (computed by the code before paths and
    refit_epochs left the fingerprint), one per refit_epochs value: recognised, so restamped."""
    cfg = train.checked_config({"data": {"raw_dir": "/data/raw", "work_dir": "/data/work"}, "run": {"name": "x"},
                                "model": {"name": "qin"}, "train": {}}, "cpu")
    older = [f["config_hash"] for f in train.legacy_fingerprints(cfg, {"fingerprint": "d"})]
    assert older == ["184ae4150f77d997", "19c2cc6732e4f3f1"]  # refit_epochs valid, folds
    assert train.fingerprint_of(cfg, {"fingerprint": "d"})["config_hash"] not in older


def test_a_refit_done_before_it_recorded_its_setting_is_read_from_how_it_stopped(tmp_path):
    """done.json's refit_epochs, else how the refit stopped; a folds refit from before its epochs
    replayed the folds' learning rates is a setting of its own: moved aside, trained again."""
    older, now = "3 epochs, as the folds' median best epoch", f"3 epochs, as the folds' median best epoch, {runs.FOLDS_LRS}"
    one_rate = "folds at one learning rate (an older refit)"
    assert runs.refit_setting({"early_stopping": "valid"}) == "valid"
    assert runs.refit_setting({"early_stopping": "valid", "refit_epochs": "valid"}) == "valid"
    assert runs.refit_setting({"early_stopping": now, "refit_epochs": "folds"}) == "folds"
    assert runs.refit_setting({"early_stopping": older, "refit_epochs": "folds"}) == one_rate
    assert runs.refit_setting({"early_stopping": older}) == one_rate
    common.write_json(runs.fold_dir(tmp_path, runs.REFIT) / "done.json", {"early_stopping": older, "refit_epochs": "folds"})
    runs.retire_other_refit(tmp_path, "folds")
    assert not runs.fold_done(tmp_path, runs.REFIT) and len(list(tmp_path.glob("refit.old-*"))) == 1


def test_keys_added_later_leave_the_fingerprint_while_off():
    """A run made before data.item_emb, the target-attention or SENet keys or the speed options existed keeps
    its fingerprint (its folds stay valid) while they are off; switched on, they change it."""
    cfg = train.checked_config(common.load_config(common.CONFIG_DIR / "simqin_small.yaml"), "cpu")
    manifest = {"fingerprint": "data"}
    before = copy.deepcopy(cfg)
    del before["data"]["item_emb"]
    for key in ("target_attention_layers", "target_attention_heads", "target_attention_dropout", "senet",
                "senet_reduction", "senet_activation", "user_min_rows"):
        del before["model"][key]
    for key in ("cuda_graphs", "foreach_l2", "adam_impl"):
        del before["train"][key]
    assert train.fingerprint_of(cfg, manifest) == train.fingerprint_of(before, manifest)
    for section, key, value in (("data", "item_emb", {"file": "item_emb.parquet", "column": "v3"}),
                                ("model", "target_attention_layers", 2), ("model", "senet", True),
                                ("model", "user_min_rows", 20),
                                ("train", "cuda_graphs", True),
                                ("train", "foreach_l2", True), ("train", "adam_impl", "fused")):
        on = copy.deepcopy(cfg)
        on[section][key] = value
        assert train.fingerprint_of(on, manifest) != train.fingerprint_of(cfg, manifest)

@pytest.mark.parametrize("monitor, auc_key", [("valid", "valid_auc"), ("holdout", "fold_auc")])
def test_schedule_decays_lr_and_stops_early(tiny_cfg, monkeypatch, monitor, auc_key):
    """Scripted AUCs of the monitored split: the lr halves after each non-improving epoch and
    patience stops the fold; the other split's AUC decides nothing."""
    scripted_aucs = iter([0.60, 0.70, 0.65, 0.7000005, 0.71, 0.70, 0.70, 0.70])
    real_auc, calls = fit.roc_auc, []

    def scripted(labels, probs):
        calls.append(len(calls))  # fit scores its eval sets in order: fold (held-out rows), valid
        monitored = len(calls) % 2 == (1 if monitor == "holdout" else 0)
        return next(scripted_aucs) if monitored else real_auc(labels, probs)

    monkeypatch.setattr(fit, "roc_auc", scripted)
    cfg = make_cfg(tiny_cfg, FASTEST, f"schedule_{monitor}", "train.max_epochs=20", "train.patience=3",
                   "train.lr=4e-3", "train.lr_min=1.5e-3", f"train.early_stopping={monitor}")
    run_dir = train.run_training(cfg, folds=[0], device="cpu")

    history = common.read_json(run_dir / "fold0" / "history.json")
    # epoch 4 beats 0.70 by less than min_delta (no improvement), epoch 5 improves and resets the
    # patience count, epochs 6-8 do not: stop after 8, lr halved each time down to its floor
    assert [h["lr"] for h in history] == pytest.approx([4e-3, 4e-3, 4e-3, 2e-3] + [1.5e-3] * 4)
    done = common.read_json(run_dir / "fold0" / "done.json")
    assert (done["best_epoch"], done["epochs"], done[auc_key]) == (5, 8, 0.71)
    assert done["early_stopping"] == monitor
    assert [h[auc_key] for h in history] == [0.60, 0.70, 0.65, 0.7000005, 0.71, 0.70, 0.70, 0.70]


def test_the_fold_files_hold_the_best_epochs_predictions(tiny_cfg, processed):
    """With early stopping on valid: the best epoch is the first with the highest valid AUC, and the
    fold's OOF and valid files are what its saved weights predict."""
    arrays, manifest = processed
    cfg = make_cfg(tiny_cfg, FASTEST, "best_epoch", "train.max_epochs=3", "train.patience=3")
    assert cfg["train"]["early_stopping"] == "valid"  # the released schedule's default
    run_dir = train.run_training(cfg, folds=[0], device="cpu")

    history = common.read_json(run_dir / "fold0" / "history.json")
    done = common.read_json(run_dir / "fold0" / "done.json")
    valid_aucs = [h["valid_auc"] for h in history]
    assert done["best_epoch"] == 1 + valid_aucs.index(max(valid_aucs))
    assert done["valid_auc"] == max(valid_aucs)
    data = train.load_to_device(arrays, torch.device("cpu"))
    model = model_config.build_model(cfg["model"], train.item_tables(arrays, manifest, torch.device("cpu")))
    model.load_state_dict(torch.load(run_dir / "fold0" / "best.pt"))
    for split, name, features in (("holdout", "oof", "train"), ("valid", "valid", "valid")):
        saved = pd.read_parquet(run_dir / "fold0" / f"{name}.parquet")
        again = fit.predict(model, data[features], torch.tensor(saved["row_id"].to_numpy()), 2048)
        np.testing.assert_array_equal(again, saved["pred"].to_numpy(), err_msg=split)


def test_embedding_l2_matches_an_explicit_penalty():
    """Adam weight_decay on the embedding group == adding emb_l2/2 * ||W||^2 to the loss (no clip)."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))

    ids = torch.tensor([[1, 2], [3, 3]])
    decayed, penalised = make(), make()
    opt_decayed = fit.make_optimizer(decayed, FitSettings(lr=1e-2, emb_l2=0.5, emb_l2_in_loss=False))
    assert [len(g["params"]) for g in opt_decayed.param_groups] == [1, 2]
    opt_penalised = torch.optim.Adam(penalised.parameters(), lr=1e-2)
    for _ in range(3):
        opt_decayed.zero_grad()
        decayed(ids).sum().backward()
        opt_decayed.step()
        opt_penalised.zero_grad()
        (penalised(ids).sum() + 0.5 / 2 * penalised[0].weight.square().sum()).backward()
        opt_penalised.step()
    for a, b in zip(decayed.parameters(), penalised.parameters()):
        torch.testing.assert_close(a, b)


class TinyCTR(layers.CTRModel):
    """An item embedding and the marked multimodal map (the embedding module) beside a Linear head."""

    def __init__(self):
        super().__init__()
        self.item = nn.Embedding(20, 4, padding_idx=0)
        self.mm = layers.MultimodalProjection(3, 4)
        self.head = nn.Linear(8, 1)
        self.register_buffer("mm_table", torch.randn(20, 3))

    def forward(self, batch):
        i = batch["item_id"]
        return self.head(torch.cat([self.item(i), self.mm(self.mm_table[i])], -1)).squeeze(-1)


@pytest.mark.parametrize("emb_l2_in_loss", [False, True])
def test_the_training_step_is_its_literal_form(emb_l2_in_loss):
    """fit's step against the step written out, with a clip that acts at every step:
    emb_l2_in_loss (FuxiCTR's): loss + emb_l2/2 ||W_emb||^2, backward, clip, plain Adam;
    default: loss, backward, clip, then Adam adds emb_l2 * W_emb to the clipped gradient.
    Each is checked against its own literal form and must differ from the other's."""
    emb_l2, lr, clip, n = 0.5, 1e-2, 0.05, 64
    torch.manual_seed(0)
    columns = {"item_id": torch.randint(1, 20, (n,)), "label": (torch.rand(n) < 0.4).float()}
    rows = torch.arange(n)
    settings = FitSettings(batch_size=n, lr=lr, emb_l2=emb_l2, grad_clip=clip, loss="fuxictr",
                           emb_l2_in_loss=emb_l2_in_loss)
    torch.manual_seed(1)
    net = TinyCTR()
    literal = {form: TinyCTR() for form in ("in_loss", "after_clip")}
    for twin in literal.values():
        twin.load_state_dict(net.state_dict())
    optimizers = {"in_loss": torch.optim.Adam(literal["in_loss"].parameters(), lr=lr),
                  "after_clip": torch.optim.Adam([
                      {"params": [literal["after_clip"].item.weight, literal["after_clip"].mm.weight],
                       "weight_decay": emb_l2},
                      {"params": list(literal["after_clip"].head.parameters())}], lr=lr)}
    loss_fn, _, optimizer, autocast = fit.make_step_parts(net, settings)
    shuffle, literal_shuffle = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    norms = []
    for _ in range(3):
        fit.train_one_epoch(net, loss_fn, optimizer, columns, rows, shuffle, settings, autocast)
        order = rows[torch.randperm(n, generator=literal_shuffle)]  # train_one_epoch's shuffle
        for form, twin in literal.items():
            loss = layers.bce(twin({"item_id": columns["item_id"][order]}), columns["label"][order], "fuxictr")
            if form == "in_loss":
                loss = loss + emb_l2 / 2 * (twin.item.weight.square().sum() + twin.mm.weight.square().sum())
            optimizers[form].zero_grad()
            loss.backward()
            norms.append(float(nn.utils.clip_grad_norm_(twin.parameters(), clip)))
            optimizers[form].step()
    assert min(norms) > 2 * clip  # the clip acts at every step, with and without the penalty
    expected, other = ("in_loss", "after_clip") if emb_l2_in_loss else ("after_clip", "in_loss")
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, literal[expected].state_dict()[name], msg=name)
    assert not torch.allclose(net.item.weight, literal[other].item.weight, atol=1e-4)


def train_briefly_then_predict(processed, model: str, train_rows: torch.Tensor, eval_batch_size: int,
                               autocast=None, overrides=(), compile=False):
    """From seed 0: fit.py's step over ``train_rows`` once, then its prediction of the valid split;
    returns (model, mean train loss, valid probabilities, the data on the device)."""
    arrays, manifest = processed
    cpu = torch.device("cpu")
    data = train.load_to_device(arrays, cpu)
    cfg = common.load_config(common.CONFIG_DIR / f"{model}.yaml", ["train.batch_size=512", *overrides])
    settings = FitSettings(batch_size=512, compile=compile, grad_clip=cfg["train"]["grad_clip"],
                           lr=cfg["train"]["lr"], emb_l2=cfg["train"]["emb_l2"])
    common.seed_everything(0)
    net = model_config.build_model(cfg["model"], train.item_tables(arrays, manifest, cpu))
    loss_fn, forward, optimizer, trainer_autocast = fit.make_step_parts(net, settings)
    autocast = autocast or trainer_autocast
    loss, _ = fit.train_one_epoch(net, loss_fn, optimizer, data["train"], train_rows,
                                  torch.Generator().manual_seed(0), settings, autocast)
    net.eval()
    valid_rows = torch.arange(data["valid"]["label"].numel())
    with autocast():  # the CPU's bfloat16 autocast where the test asks for it (fit's is CUDA-only)
        probs = fit.predict(net, data["valid"], valid_rows, eval_batch_size, forward=forward)
    return net, loss, probs, data


@pytest.mark.parametrize("model", MODELS)
def test_bf16_autocast_training_and_prediction_track_float32(processed, model):
    """train.bf16 wraps the step and prediction in bfloat16 autocast on CUDA. The same code under
    the CPU's bfloat16 autocast, from the same initial weights and batches: the matmuls do run in
    bfloat16, the predictions come back float32, and loss and predictions stay close to float32's."""
    runs = {bf16: train_briefly_then_predict(
                processed, model, torch.arange(4 * 512), 2048,
                functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16))
            for bf16 in (False, True)}
    (_, loss32, probs32, data), (net16, loss16, probs16, _) = runs[False], runs[True]
    assert probs16.dtype == np.float32 and np.isfinite(probs16).all()
    assert abs(loss16 - loss32) < 0.01 * loss32
    assert np.abs(probs16 - probs32).mean() < 0.01 and np.corrcoef(probs16, probs32)[0, 1] > 0.98

    linear_dtypes = set()
    for module in net16.modules():
        if type(module) is nn.Linear:  # Float32Linear (the logits) stays float32 by design
            module.register_forward_hook(lambda m, i, out: linear_dtypes.add(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net16(fit.gather(data["valid"], torch.arange(8)))
    assert linear_dtypes == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_and_prediction_equal_eager(processed):
    """train.compile runs the same function. Dropout is off: compiled code draws its own random
    masks, so with dropout the two runs would train on different noise, not compute differently.
    The embedding L2 is off too: an item row that a batch barely touches has a gradient of rounding
    size beside its decay emb_l2 * W (about 2e-8 here), Adam's normalised step turns the sign of that
    sum into a whole +-lr step, and a compiled backward rounds differently, so with the L2 on, the
    two runs part by a full step (2e-3) on a few such coordinates within eight steps."""
    # 3999 rows in batches of 500 and a last of 499, then the 600 valid rows in batches of 256,
    # 256 and 88: two batch sizes in both, one graph each (the rows dimension is dynamic)
    (_, loss_eager, probs_eager, _), (_, loss_compiled, probs_compiled, _) = (
        train_briefly_then_predict(processed, "qin_small", torch.arange(3999), 256,
                                   overrides=["model.dropout=0.0", "train.emb_l2=0.0"], compile=compiled)
        for compiled in (False, True))
    # Eight Adam steps amplify the compiled code's other rounding of the same sums: measured at most
    # 1.8e-5 relative in the loss and 7e-4 in a prediction with ATEN_CPU_CAPABILITY=default, where
    # inductor writes scalar code (below 1e-4 with AVX-512)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-4)
    np.testing.assert_allclose(probs_compiled, probs_eager, atol=2e-3)
    assert np.abs(probs_compiled - probs_eager).mean() < 2e-4


def test_on_cpu_the_device_data_is_the_mapped_files_not_a_copy(processed):
    arrays, manifest = processed
    data = train.load_to_device(arrays, torch.device("cpu"))
    tables = train.item_tables(arrays, manifest, torch.device("cpu"))
    uploaded = {f"{split}_{name}": tensor for split, columns in data.items() for name, tensor in columns.items()}
    uploaded.update({name: tables[name] for name in schema.ITEM_TABLES})
    assert len(uploaded) == 3 * len(schema.FEATURES) + 2 + len(schema.ITEM_TABLES)
    for name, tensor in uploaded.items():
        assert np.shares_memory(tensor.numpy(), arrays[name]), name


@pytest.mark.parametrize("override, fragment", [("model.emb_dim=0", "model.emb_dim"),
                                                ("model.qnn_activation=tanh", "qnn_activation"),
                                                ("train.device=cuda", "no CUDA device")])
def test_a_bad_value_fails_before_finished_folds_are_discarded(tiny_cfg, override, fragment):
    if override == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = train.run_training(make_cfg(tiny_cfg, "qin_small", "kept", "train.max_epochs=1"), folds=[0])
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold0").iterdir()}
    with pytest.raises(common.UserError, match=fragment):
        train.run_training(make_cfg(tiny_cfg, "qin_small", "kept", "train.max_epochs=1", override), folds=[0])
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold0").iterdir()} == before


def test_folds_out_of_range_is_a_user_error(tiny_cfg):
    with pytest.raises(common.UserError, match="folds 0..1"):
        train.run_training(make_cfg(tiny_cfg, FASTEST, "bad_folds"), folds=[2], device="cpu")


@pytest.mark.parametrize("text", ["", " ", ",", "0,a"])
def test_folds_that_name_no_fold_are_refused_by_the_parser(text, capsys):
    # an empty --folds used to train nothing and exit 0
    with pytest.raises(SystemExit) as stopped:
        train.parse_cli(["--config", str(common.CONFIG_DIR / "qin_small.yaml"), "--folds", text])
    assert stopped.value.code == 2 and "expected comma-separated fold numbers" in capsys.readouterr().err
    assert train.parse_folds("0, 2,") == [0, 2]


@pytest.mark.slow
def test_cli_unknown_key_is_one_line_error():
    result = subprocess.run(
        [sys.executable, str(common.REPO_ROOT / "src" / "train.py"), "--config",
         str(common.CONFIG_DIR / "qin_small.yaml"), "--set", "train.no_such_key=1"],
        capture_output=True, text=True, cwd=common.REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "no_such_key" in result.stderr


def test_refit_trains_one_model_on_every_row_beside_the_folds(tiny_cfg, processed):
    arrays, manifest = processed
    cfg = make_cfg(tiny_cfg, FASTEST, "refit", "train.refit_epochs=valid")  # as released (the demo: folds)
    run_dir = train.run_training(cfg, device="cpu")
    folds = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    train.run_training(cfg, device="cpu", refit=True)
    refit = run_dir / "refit"
    assert {p.name for p in refit.iterdir()} == {"best.pt", "history.json", "valid.parquet", "test.parquet",
                                                 "done.json"}
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.parent != refit} == folds
    done = common.read_json(refit / "done.json")
    assert done["fold"] == "refit" and done["train_rows"] == len(arrays["train_fold"])
    history = common.read_json(refit / "history.json")
    assert "valid_auc" in history[0] and "fold_auc" not in history[0]
    assert done["valid_auc"] == max(h["valid_auc"] for h in history)
    test = pd.read_parquet(refit / "test.parquet")
    np.testing.assert_array_equal(test["ID"], np.asarray(arrays["test_ID"]))
    # different rows and seed than any fold: other predictions than the fold mean
    assert not np.allclose(test["pred"], pd.read_parquet(run_dir / "test.parquet")["pred"])

    stamp = (refit / "done.json").stat().st_mtime_ns
    train.run_training(cfg, device="cpu", refit=True)  # done: skipped
    assert (refit / "done.json").stat().st_mtime_ns == stamp
    train.run_training(make_cfg(tiny_cfg, FASTEST, "refit", "train.refit_epochs=valid", "train.lr=5e-4"), folds=[0],
                       device="cpu")
    assert not refit.exists(), "another config: the refit is moved aside with the folds"
    assert [(p / "refit" / "done.json").is_file() for p in run_dir.parent.glob("refit.old-*")] == [True]


def test_a_refit_from_folds_replays_their_median_learning_rates(tmp_path):
    """Folds whose best epochs are 3, 5 and 2 and whose learning rates halved after epochs without
    improvement: the refit trains 3 epochs, each at the median of the folds' rates for that epoch
    (a fold that stopped early counts for the epochs it ran)."""
    histories = {0: [2e-3, 2e-3, 1e-3, 5e-4, 2.5e-4], 1: [2e-3, 1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4],
                 2: [2e-3, 2e-3]}
    for fold, best in zip(histories, (3, 5, 2)):
        common.write_json(runs.fold_dir(tmp_path, fold) / "done.json", {"best_epoch": best, "fold": fold})
        runs.write_history(tmp_path, fold, [{"epoch": e, "lr": lr} for e, lr in enumerate(histories[fold], 1)])
    assert all(runs.fold_done(tmp_path, k) for k in histories)
    assert train.refit_lrs_from_folds(tmp_path, 3) == [2e-3, 2e-3, 1e-3]
    # a fold that stopped after its first epoch: epochs 2 and 3 are the other two folds' medians
    common.write_json(runs.fold_dir(tmp_path, 2) / "done.json", {"best_epoch": 1, "fold": 2})
    runs.write_history(tmp_path, 2, [{"epoch": 1, "lr": 2e-3}])
    assert train.refit_lrs_from_folds(tmp_path, 3) == [2e-3, 1.5e-3, 1e-3]


def test_refit_of_the_folds_median_best_epoch(tiny_cfg, monkeypatch):
    cfg = make_cfg(tiny_cfg, FASTEST, "refit_folds", "train.refit_epochs=folds", "train.max_epochs=3",
                   "train.patience=3")
    with pytest.raises(common.UserError, match="folds .0, 1. are not done"):
        train.run_training(cfg, device="cpu", refit=True)
    run_dir = train.run_training(cfg, device="cpu")
    best = sorted(common.read_json(run_dir / f"fold{k}" / "done.json")["best_epoch"] for k in (0, 1))
    train.run_training(cfg, device="cpu", refit=True)
    done = common.read_json(run_dir / "refit" / "done.json")
    assert done["epochs"] == done["best_epoch"] == int(np.floor(np.mean(best) + 0.5))
    assert [r["lr"] for r in runs.read_history(run_dir, "refit")] == train.refit_lrs_from_folds(run_dir, 2)
    assert "valid_auc" in done and "median best epoch" in done["early_stopping"]
    assert done["refit_epochs"] == "folds"
    folds = {p: p.stat().st_mtime_ns for k in (0, 1) for p in (run_dir / f"fold{k}").iterdir()}

    # a refit command that must fail fails before anything moves: its folds would be another config's
    other = make_cfg(tiny_cfg, FASTEST, "refit_folds", "train.refit_epochs=folds", "train.max_epochs=3",
                     "train.patience=3", "train.lr=5e-4")
    def run_files():  # the lock's record of its holders changes with every process that holds it
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
                if p.is_file() and not p.name.startswith(runs.LOCK_FILE)}
    before = run_files()
    with pytest.raises(common.UserError, match="folds were made with another config"):
        train.run_training(other, device="cpu", refit=True)
    assert run_files() == before
    stamp = (run_dir / "fingerprint.json").read_bytes()  # nor can it tell whose folds these are
    (run_dir / "fingerprint.json").unlink()
    with pytest.raises(common.UserError, match="fingerprint.json is unreadable"):
        train.run_training(cfg, device="cpu", refit=True)
    (run_dir / "fingerprint.json").write_bytes(stamp)
    assert run_files().keys() == before.keys()

    # a refit-only setting redoes the refit alone: the folds stay, the old refit waits beside them
    valid = make_cfg(tiny_cfg, FASTEST, "refit_folds", "train.refit_epochs=valid", "train.max_epochs=3",
                     "train.patience=3")
    train.run_training(valid, device="cpu", refit=True)
    assert {p: p.stat().st_mtime_ns for p in folds} == folds
    assert common.read_json(run_dir / "refit" / "done.json")["refit_epochs"] == "valid"
    [aside] = run_dir.glob("refit.old-*")
    assert common.read_json(aside / "done.json") == done

    # a refit another process trained meanwhile with the other setting is not taken for this one
    monkeypatch.setattr(runs, "retire_other_refit", lambda run, refit_epochs: None)  # it finished after the check
    with pytest.raises(common.UserError, match="trained meanwhile by another process, with train.refit_epochs=valid"):
        train.run_training(cfg, device="cpu", refit=True)


def test_compiled_step_and_prediction_compile_once_for_every_batch_size(processed, monkeypatch):
    """train.compile marks the rows dimension dynamic: the two training batch sizes that
    tensor_split makes and the partial last prediction batch reuse the first graph of each
    callable instead of compiling again (torch's own fallback compiles a second, dynamic graph)."""
    from torch._dynamo.testing import CompileCounter
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    # 3999 rows: batches of 500 and a last of 499; then 600 valid rows in batches of 256, 256, 88
    train_briefly_then_predict(processed, "qin_small", torch.arange(3999), 256, compile=True)
    torch._dynamo.reset()
    assert counter.frame_count == 2  # one graph for the loss, one for the forward


# ---------------------------------------------------------------------------------------------
# robustness: user errors, a kill mid-fold, changed data or config, no leak across folds
# ---------------------------------------------------------------------------------------------

def without_aggregates(p) -> None:
    for name in runs.AGGREGATE_FILES:  # as after an interrupted run: the folds are read again
        (p.run_dir / name).unlink()


def corrupt_fold_file(p) -> None:
    without_aggregates(p)
    truncate(p.run_dir / "fold1" / "test.parquet")


def fold_file_without_pred(p) -> None:
    without_aggregates(p)
    replace_column(p.run_dir / "fold0" / "oof.parquet", "pred", None)


TRAIN_CASES = {
    # case: (damage to the pipeline, the config to train with, expected fragments)
    "corrupt fold output": (corrupt_fold_file, lambda p: p.model_cfg,
                            ["fold1/test.parquet", "not a readable parquet file", "delete", "fold1"]),
    "fold output without its column": (fold_file_without_pred, lambda p: p.model_cfg,
                                       ["fold0/oof.parquet", "column 'pred': missing"]),
    "unknown key in a config file": (None, lambda p: common.load_config(typo_config(p)),
                                     ["unknown key train.learning_rate"]),
    "unknown key on the command line": (None, ["train.learnig_rate=1e-3"], ["unknown config key 'learnig_rate'"]),
    "NaN learning rate": (None, ["train.lr=.nan"], ["train.lr must be positive, got nan"]),
    "infinite learning rate": (None, ["train.lr=.inf"], ["train.lr must be a finite number, got inf"]),
    # the test trains with device="cpu" (--device): the config's own value is still checked
    "a device --device replaces": (None, ["train.device=gpu"],
                                   ["train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"]),
    "negative embedding L2": (None, ["train.emb_l2=-1"], ["train.emb_l2 must be at least 0, got -1"]),
    "lr decay above 1": (None, ["train.lr_decay=1.5"], ["train.lr_decay must be at most 1, got 1.5"]),
    "negative min_delta": (None, ["train.min_delta=-1"], ["train.min_delta must be at least 0, got -1"]),
    "lr floor above the lr": (None, ["train.lr_min=5"], ["train.lr_min (5) must not exceed train.lr (0.001)"]),
    "text where a number belongs": (None, ["train.batch_size=big"], ["train.batch_size must be an integer"]),
    "a list where a number belongs": (None, ["train.max_epochs=[1,2]"], ["train.max_epochs must be an integer"]),
    "run name with a path": (None, ["run.name=../elsewhere"], ["run.name must be a plain folder name"]),
    "other folds than the processed data": (None, ["data.n_folds=50"],
                                            ["built with data.n_folds=2", "says 50", "src/preprocess.py"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_user_errors_change_nothing(pipeline, case, one_thread):
    p = pipeline
    damage, config, fragments = TRAIN_CASES[case]
    with restored(p.raw, *outputs(p)):
        if damage:
            damage(p)
        def run():  # --set overrides are checked while loading, the rest while training
            cfg = config(p) if callable(config) else common.load_config(p.model_yaml, config)
            train.run_training(cfg, device="cpu")
        before = snapshot(*outputs(p))
        assert_user_error(run, *fragments)
        assert snapshot(*outputs(p)) == before
        assert sorted(q.name for q in p.work.iterdir()) == ["blend", "processed", "runs"]


@pytest.mark.slow
def test_a_run_killed_mid_fold_resumes_to_identical_predictions(tiny_raw, tmp_path, one_thread):
    data = {"raw_dir": str(tiny_raw), "work_dir": str(tmp_path / "work"), "n_folds": 3}
    # the kill comes after fold 1's first epoch (about 40 steps), and no early stopping leaves it
    # two more epochs to run: a window of a second or more, and longer on a loaded machine
    config = write_config(tmp_path / "qin.yaml", "qin_small.yaml", {"data": data, "train": {
        "max_epochs": 3, "patience": 3, "batch_size": 64, "eval_batch_size": 2048}})
    preprocess.run_preprocess(common.load_config(config))  # the processed data exists for all three
    runs_root = tmp_path / "work" / "runs"

    def command(name: str) -> list[str]:
        return [sys.executable, str(SRC / "train.py"), "--config", str(config), "--set", f"run.name={name}",
                "--device", "cpu"]

    reference = subprocess.run(command("reference"), capture_output=True, text=True, timeout=600,
                               env=ONE_THREAD_ENV)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = runs_root / "resumed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command("resumed"), stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD_ENV)
        try:
            deadline = time.time() + 600
            # fold 1 has finished an epoch (its folder holds history.json) but is not done
            while not (run_dir / "fold1" / "history.json").exists() and process.poll() is None:
                assert time.time() < deadline, "fold 1 never started"
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (run_dir / "fold0" / "done.json").is_file()
    assert not (run_dir / "fold1" / "done.json").exists(), "killed too late: fold 1 had finished"
    assert not (run_dir / "fold2").exists() and not (run_dir / "oof.parquet").exists()
    fold0 = snapshot(run_dir / "fold0")

    resumed = subprocess.run(command("resumed"), capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "folds [0] already done, skipped" in resumed.stdout
    assert snapshot(run_dir / "fold0") == fold0, "the finished fold was kept as it was"
    predictions = ["oof.parquet", "valid.parquet", "test.parquet"] + [
        f"fold{k}/{name}" for k in range(3) for name in ("oof.parquet", "valid.parquet", "test.parquet")]
    for name in predictions:
        assert (run_dir / name).read_bytes() == (runs_root / "reference" / name).read_bytes(), name
    assert not [q for q in run_dir.rglob("*") if q.name.endswith(".tmp")], "no temporaries left"


def test_changed_data_or_config_is_recomputed_and_blend_refuses_stale_runs(copy_raw, tmp_path, one_thread):
    """preprocess after the raw data changed, train after the data or the config changed, and blend
    after a run was retrained: nothing stale is ever reused."""
    raw = copy_raw()
    data = {"raw_dir": str(raw), "work_dir": str(tmp_path / "work"), "n_folds": 2}
    model_yaml = write_config(tmp_path / "model.yaml", "dcnv2_tf_small.yaml", {
        "data": data, "run": {"name": "r"}, "train": {**TINY_TRAIN, "max_epochs": 1}})
    blend_yaml = write_config(tmp_path / "blend.yaml", "blend.yaml", {"data": data, "blend": {
        "runs": ["r"], "methods": ["logit_mean"], "submission": {"dir": str(tmp_path / "subs")}}})
    data_cfg = common.load_config(model_yaml)
    preprocess.run_preprocess(data_cfg)
    run_dir = train.run_training(common.load_config(model_yaml), device="cpu")
    blend.run_blend(common.load_config(blend_yaml))
    submission = snapshot(tmp_path / "subs")
    old = common.read_json(run_dir / "fingerprint.json")
    done_stamp = (run_dir / "fold0" / "done.json").stat().st_mtime_ns

    # the raw data changes: blend refuses the processed folder and the run made from the old data
    level = pq.read_table(raw / "valid.parquet")["likes_level"][0].as_py()
    edit_value(raw / "valid.parquet", "likes_level", 0, (level + 1) % 11)
    assert_user_error(lambda: blend.run_blend(common.load_config(blend_yaml)),
                      "raw files", "(valid.parquet changed since it was built)")
    assert snapshot(tmp_path / "subs") == submission
    # so does train, naming the command that rebuilds; after it, train retrains every fold
    assert_user_error(lambda: train.run_training(common.load_config(model_yaml), device="cpu"),
                      "changed since it was built", "rerun src/preprocess.py")
    preprocess.run_preprocess(data_cfg)
    train.run_training(common.load_config(model_yaml), device="cpu")
    new = common.read_json(run_dir / "fingerprint.json")
    manifest = common.read_json(tmp_path / "work" / "processed" / "manifest.json")
    assert new["data_fingerprint"] == manifest["fingerprint"] != old["data_fingerprint"]
    assert new["config_hash"] == old["config_hash"]
    assert (run_dir / "fold0" / "done.json").stat().st_mtime_ns != done_stamp, "fold 0 retrained"
    assert np.asarray(processed_data.load_processed(tmp_path / "work" / "processed")[0]["valid_likes_level"])[0] \
        == pq.read_table(raw / "valid.parquet")["likes_level"][0].as_py()
    blend.run_blend(common.load_config(blend_yaml))
    submission = snapshot(tmp_path / "subs")

    # the config changes and only fold 0 is retrained so far: the old fold 1 is gone, and blend
    # refuses the unfinished run instead of mixing old and new folds
    train.run_training(common.load_config(model_yaml, ["train.lr=5e-4"]), folds=[0], device="cpu")
    assert not (run_dir / "fold1").exists()
    assert_user_error(lambda: blend.run_blend(common.load_config(blend_yaml)), "fold 1 is not done")
    assert snapshot(tmp_path / "subs") == submission


def test_a_fold_model_never_predicts_rows_it_trained_on(pipeline, one_thread):
    p = pipeline
    arrays, manifest = processed_data.load_processed(p.processed)
    fold_of_row = np.asarray(arrays["train_fold"])
    n_rows = len(fold_of_row)
    cfg = train.checked_config(p.model_cfg, "cpu")
    data = train.load_to_device(arrays, torch.device("cpu"))
    tables = train.item_tables(arrays, manifest, torch.device("cpu"))
    aggregate = pd.read_parquet(p.run_dir / "oof.parquet")
    np.testing.assert_array_equal(aggregate["row_id"], np.arange(n_rows))
    np.testing.assert_array_equal(aggregate["fold"], fold_of_row)

    assert sorted(p.trained_rows) == [0, 1]
    for k in (0, 1):
        held_out = np.flatnonzero(fold_of_row == k)
        trained_on = np.array(sorted(p.trained_rows[k]))
        # the fold model trained on exactly the other folds' rows, never on its own
        np.testing.assert_array_equal(trained_on, np.flatnonzero(fold_of_row != k))
        oof = pd.read_parquet(p.run_dir / f"fold{k}" / "oof.parquet")
        np.testing.assert_array_equal(oof["row_id"], held_out)
        assert not np.isin(oof["row_id"], trained_on).any()
        # the stored OOF predictions are exactly the saved fold model's predictions on its rows
        model = model_config.build_model(cfg["model"], tables)
        model.load_state_dict(torch.load(p.run_dir / f"fold{k}" / "best.pt"))
        again = fit.predict(model, data["train"], torch.from_numpy(held_out), cfg["train"]["eval_batch_size"])
        np.testing.assert_array_equal(again, oof["pred"].to_numpy())
        np.testing.assert_array_equal(aggregate["pred"].to_numpy()[held_out], oof["pred"].to_numpy())
