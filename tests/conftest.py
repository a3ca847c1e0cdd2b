"""Shared fixtures: one tiny synthetic dataset and its processed arrays per test session, and one
finished pipeline on a copy of it (processed data, a 2-fold run, a blend and its submission) that
the robustness tests damage and restore.

Tests that modify data copy it first (see `copy_raw`), or damage the pipeline inside
helpers.restored(), so the session fixtures stay pristine.
"""
import getpass
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.special import expit, logit

# torch.compile's kernel cache does not key on ATEN_CPU_CAPABILITY: a suite run as another CPU
# (docs/REPRODUCTION.md, "Running the tests as another CPU") on a machine that compiled before
# would load kernels built for the first capability and fail. One cache per capability, for this
# process and the commands it starts.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))

# Under pytest-xdist (.ci/run: one worker per core) a worker and every command it starts get one
# core's worth, one thread: two threads per worker on as many cores as workers spin in OpenMP
# barriers and run several times slower. The suite holds on any thread count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)  # in case a plugin imported torch before this file

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
# pytest puts src/ and tools/ on this process's path (pyproject.toml); the commands tests start
# (python -c, tools/*.py) find the package the way an installed checkout would
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))

from mmctr import common, processed_data  # noqa: E402
from helpers import FAST_LIGHTGBM, RUN, TINY_TRAIN, restored, single_thread, write_config, write_run  # noqa: E402


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
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist --dist loadgroup runs the group on one worker")


# module fixtures that take a minute or more to build: under pytest-xdist (.ci/run: --dist
# loadgroup) the tests that use one share a worker, which builds it once
EXPENSIVE_FIXTURES = ("cpu_run", "speed_run", "sequential")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """The tests of one expensive fixture in one xdist group; the slow tier first, so that on two
    workers the long tests start early and the quick ones fill the gaps at the end (every worker
    collects the same order, as xdist requires). Without xdist both change nothing a test sees."""
    for item in items:
        for name in EXPENSIVE_FIXTURES:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each tier


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


@pytest.fixture
def one_thread():
    """One torch thread for a test that trains (or blends) in this process.

    Training here uses one CPU thread, in this process and in the subprocesses
    (helpers.ONE_THREAD_ENV): the models are tiny, and two threads on a machine whose 2 cores are
    busy with other jobs spin in OpenMP barriers and run 10-20x slower. Reference and resumed runs
    share the setting, so their bits still compare."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def finished_pipeline(tiny_raw, tmp_path_factory):
    """A private copy of the tiny data taken through preprocess, train (2 folds, recording the rows
    every fold model trains on), blend and the submission. Tests may damage it inside restored().
    Built once per session, under one torch thread; tests take it through `pipeline`."""
    from mmctr import blend, preprocess, train
    with single_thread():
        root = tmp_path_factory.mktemp("pipeline")
        raw, work, subs = root / "raw", root / "work", root / "submissions"
        shutil.copytree(tiny_raw, raw)
        data = {"raw_dir": str(raw), "work_dir": str(work), "n_folds": 2}
        data_yaml = write_config(root / "data.yaml", "data.yaml", {"data": data})
        model_yaml = write_config(root / "model.yaml", "dcnv2_tf_small.yaml",
                                  {"data": data, "run": {"name": RUN}, "train": TINY_TRAIN})
        blend_yaml = write_config(root / "blend.yaml", "blend.yaml", {"data": data, "blend": {
            "runs": [RUN], "methods": ["logit_mean"], "submission": {"dir": str(subs)}}})

        trained_rows: dict[int, set[int]] = {}
        real_fit = train.fit

        def recording_fit(model, data, train_rows, *args, **kwargs):
            trained_rows[len(trained_rows)] = set(train_rows.cpu().numpy().tolist())  # folds run in order
            return real_fit(model, data, train_rows, *args, **kwargs)

        preprocess.run_preprocess(common.load_config(data_yaml))
        model_cfg = common.load_config(model_yaml)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "fit", recording_fit)
            run_dir = train.run_training(model_cfg, device="cpu")
        metrics = blend.run_blend(common.load_config(blend_yaml))
        return SimpleNamespace(
            root=root, raw=raw, work=work, subs=subs, processed=work / "processed", run_dir=run_dir,
            blend_dir=work / "blend", submission=Path(metrics["submission"]["zip"]),
            data_yaml=data_yaml, model_yaml=model_yaml, blend_yaml=blend_yaml, model_cfg=model_cfg,
            blend_cfg=common.load_config(blend_yaml), trained_rows=trained_rows)


@pytest.fixture
def pipeline(finished_pipeline):
    """The session's finished pipeline, as built, for every test that uses it: tests restore what
    they damage themselves; whatever one leaves beside its outputs (a planted staging folder in the
    work folder, a config it wrote) is undone after it too, so no test sees another's leftovers."""
    with restored(finished_pipeline.root):
        yield finished_pipeline
