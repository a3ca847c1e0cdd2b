"""Shared fixtures: one tiny synthetic dataset and its processed arrays per test session.

Tests that modify data copy it first (see `copy_raw`), so the session fixtures stay pristine.
"""
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
sys.path[:0] = [str(SRC), str(REPO / "tools")]  # the stages and the tools; common adds src/models

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    import make_synthetic
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
    import preprocess
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
