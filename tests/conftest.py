"""Shared fixtures: one tiny synthetic dataset and its processed arrays per test session.

Tests that modify data copy it first (see `copy_raw`), so the session fixtures stay pristine.
"""
import getpass
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit

# torch.compile's kernel cache does not key on ATEN_CPU_CAPABILITY: a suite run as another CPU
# (README, "Tests") on a machine that compiled before would load kernels built for the first
# capability and fail. One cache per capability, for this process and the commands it starts.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
# pytest puts src/ and tools/ on this process's path (pyproject.toml); the commands tests start
# (python -c, tools/*.py) find the package the way an installed checkout would
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))

from mmctr import common, processed_data  # noqa: E402
from helpers import FAST_LIGHTGBM, write_run  # noqa: E402


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    from mmctr import make_synthetic
    out = tmp_path_factory.mktemp("tiny_raw")
    make_synthetic.generate("tiny", out, seed=0)
    return out


def make_data_cfg(raw_dir: Path, work_dir: Path, n_folds: int = 2) -> dict:
    cfg = common.load_config(common.CONFIG_DIR / "data.yaml")
    cfg["data"].update(raw_dir=str(raw_dir), work_dir=str(work_dir), n_folds=n_folds)
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg(tiny_raw, tmp_path_factory) -> dict:
    return make_data_cfg(tiny_raw, tmp_path_factory.mktemp("tiny_work"))


@pytest.fixture(scope="session")
def tiny_processed(tiny_cfg) -> Path:
    from mmctr import preprocess
    return preprocess.run_preprocess(tiny_cfg)


@pytest.fixture
def copy_raw(tiny_raw, tmp_path):
    """A private, modifiable copy of the tiny raw data."""
    def _copy() -> Path:
        dst = tmp_path / "raw"
        shutil.copytree(tiny_raw, dst)
        return dst
    return _copy


def pytest_configure(config):
    # .ci/run runs everything; `python3 -m pytest -q -m "not slow" tests` is the quick tier
    config.addinivalue_line("markers", "slow: end to end, subprocesses, kills, fuzzing or compile "
                                       "(skipped by -m 'not slow')")


@pytest.fixture
def workspace(tmp_path, tiny_raw, tiny_processed):
    """A private work folder (processed data symlinked) with three hand-made finished runs."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "processed").symlink_to(tiny_processed, target_is_directory=True)
    arrays, manifest = processed_data.load_processed(tiny_processed)
    rng = np.random.default_rng(0)

    def noisy_oracle(noise_sd: float) -> dict[str, np.ndarray]:
        preds = {}
        for split, raw_split in (("oof", "train"), ("valid", "valid"), ("test", "test")):
            prob = common.read_oracle_prob(tiny_raw, raw_split)
            preds[split] = expit(logit(prob) + rng.normal(0, noise_sd, len(prob)))
        return preds

    good, fair = noisy_oracle(0.8), noisy_oracle(1.2)
    runs = {"good": good, "fair": fair, "noise": {split: rng.random(len(p)) for split, p in good.items()}}
    for name, preds in runs.items():
        write_run(work / "runs" / name, preds, arrays, manifest)
    cfg = common.load_config(common.CONFIG_DIR / "blend.yaml", FAST_LIGHTGBM)
    cfg["data"].update(raw_dir=str(tiny_raw), work_dir=str(work), n_folds=manifest["n_folds"])
    cfg["blend"]["runs"] = ["good", "fair", "noise"]
    cfg["blend"]["submission"]["dir"] = str(tmp_path / "submissions")
    return cfg, runs
