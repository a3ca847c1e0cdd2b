"""Every shipped config loads, follows the run-name convention and builds a working model."""
from pathlib import Path

import pytest
import torch

import common
import fit
import model_config
import preprocess
import train

CONFIGS = sorted(common.CONFIG_DIR.glob("*.yaml"))
MODEL_CONFIGS = [p for p in CONFIGS if "model" in common.load_config(p)]


def test_every_config_loads():
    assert {p.name for p in CONFIGS} >= {"data.yaml", "train.yaml", "blend.yaml", "qin.yaml"}
    for path in CONFIGS:
        assert "data" in common.load_config(path), path


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_run_name_is_the_file_name(path: Path):
    # run.sh and configs/blend.yaml name runs by their config file
    assert common.load_config(path)["run"]["name"] == path.stem


def test_blend_defaults_name_the_demo_runs():
    runs = common.load_config(common.CONFIG_DIR / "blend.yaml")["blend"]["runs"]
    assert all((common.CONFIG_DIR / f"{run}.yaml").is_file() for run in runs)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_builds_and_predicts(path: Path, tiny_processed):
    cfg = common.load_config(path)
    arrays, manifest = preprocess.load_processed(tiny_processed)
    data = train.load_to_device(arrays, torch.device("cpu"))
    model = model_config.build_model(cfg["model"], train.item_tables(arrays, manifest, torch.device("cpu"))).eval()
    rows = torch.arange(16)
    with torch.no_grad():
        logits = model(fit.gather(data["valid"], rows))
    assert logits.shape == (16,) and torch.isfinite(logits).all()
