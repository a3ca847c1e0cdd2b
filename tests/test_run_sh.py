"""Smoke test of the whole pipeline: `bash run.sh` on the tiny preset ends in two valid, scored zips:
the blend (a leaderboard probe) and one network's refit (the prize-eligible submission). Bad options
and unwritable outputs stop it before its first stage."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmctr import common
from mmctr import experiments
from mmctr.models.metrics import roc_auc
from mmctr.submission import validate_submission
from helpers import snapshot

REPO = Path(__file__).resolve().parent.parent
MODELS = ("qin_small", "dcnv2_tf_small", "din_tf_small")
DATA_ROOT = "data #1: it's"  # a folder name YAML would cut at " #", read as a mapping, or end at "'"


def run_sh(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    # called from tmp_path with relative paths: they are the caller's, not the repository's
    cmd = ["bash", str(REPO / "run.sh"), "--preset", "tiny", "--data-root", DATA_ROOT, "--submissions", "sub",
           "--train-set", "train.max_epochs=2", "--models", ",".join(MODELS), *extra]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--models", "qin_small,nonexistent"], "--models: no model config configs/nonexistent.yaml"),
    (["--name", "../evil"], "--name must be a plain file stem"),
    (["--single", "dcnv2"], "--single must be auto or one of the models"),
    (["--data", "no/such/folder"], "no such folder"),
    (["--preset", "huge"], "--preset must be tiny, demo or full"),
    (["--train-set", "data.n_folds=2"], "--train-set data.n_folds=2: a data setting goes to every stage"),
    (["--data-set", "train.lr=1e-3"], "--data-set takes data.KEY=VALUE, got 'train.lr=1e-3'"),
    (["--data-set", "data.item_feature = x.parquet"], "--data-set takes data.KEY=VALUE"),
    (["--data-set", "data.n_folds=4"], "--data-set data.n_folds: give it with --data, --data-root or --folds"),
    # refused before setup, not after every model trained (or read as octal 8)
    (["--models", "qin_small,din_tf_small,qin_small"], "--models: qin_small is named twice"),
    (["--models", "qin_small,din_tf_small", "--single", "qin_small,din_tf_small"],
     "--single must be auto or one of the models"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
    (["--folds", "010"], "--folds must be an integer from 2 to 127, got '010'"),
    (["--folds", "08"], "--folds must be an integer from 2 to 127, got '08'"),
    (["--folds", "128"], "--folds must be an integer from 2 to 127"),
])
def test_bad_options_stop_before_the_first_stage(tmp_path, args, message):
    result = subprocess.run(["bash", str(REPO / "run.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "=== setup" not in result.stdout and list(tmp_path.iterdir()) == []


def test_run_sh_refuses_unwritable_outputs_before_setup(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for option, value, fragment in [("--submissions", a_file, "a file, not a folder"),
                                    ("--data-root", a_file / "below", "cannot write there")]:
        result = subprocess.run(["bash", "run.sh", "--preset", "tiny", option, str(value)], capture_output=True,
                                text=True, timeout=60, cwd=common.REPO_ROOT)
        assert result.returncode == 2 and "=== setup" not in result.stdout, (result.stdout, result.stderr)
        assert result.stderr.strip().startswith(f"run.sh: {option} {value}: {fragment}"), result.stderr


@pytest.mark.slow
def test_run_sh_end_to_end_on_tiny(tmp_path):
    first = run_sh(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    raw = tmp_path / DATA_ROOT / "tiny"
    work = tmp_path / DATA_ROOT / "work" / "tiny"
    test_ids = pd.read_parquet(raw / "test.parquet", columns=["ID"])["ID"].to_numpy()
    labels = common.read_test_labels(raw)
    zip_path = tmp_path / "sub" / "submission-blend.zip"
    [single_zip] = (tmp_path / "sub").glob("submission-single-*.zip")
    best = single_zip.stem.removeprefix("submission-single-")
    oof_aucs = {m: common.read_json(work / "runs" / m / "metrics.json")["oof_auc"] for m in MODELS}
    assert best == max(oof_aucs, key=oof_aucs.get)  # the best single network by OOF AUC
    predictions = {}
    for path in (zip_path, single_zip):
        with zipfile.ZipFile(path) as zf:
            assert zf.namelist() == ["prediction.csv"]
        validate_submission(path, test_ids, "Task2")  # raises on any defect
        with zipfile.ZipFile(path) as zf, zf.open("prediction.csv") as f:
            predictions[path] = pd.read_csv(f)["Task2"].to_numpy()
        assert roc_auc(labels, predictions[path]) > 0.5
    submission = predictions[zip_path]
    # the prize-eligible one is that run's refit alone: no fold mean, no blend
    refit = pd.read_parquet(work / "runs" / best / "refit" / "test.parquet").sort_values("ID")
    np.testing.assert_allclose(predictions[single_zip], refit["pred"], rtol=1e-9)
    assert not np.allclose(predictions[single_zip], submission)

    summary = first.stdout[first.stdout.index("=== summary"):]
    for name in (*MODELS, "blend (", f"single: {best} refit", "oracle", "leaderboard probe: ",
                 "prize-eligible: "):
        assert name in summary, summary

    # the pictures next to every report, and one experiment-log row per run, the refit and the blend
    for picture in ("runs/qin_small/curves.png", "runs/din_tf_small/calibration.png", "blend/candidates.png"):
        assert (work / picture).read_bytes()[:4] == b"\x89PNG", picture
    log = work / experiments.LOG_NAME
    assert [row["kind"] for row in experiments.read_log(log)] == ["train"] * 3 + ["refit", "blend"]

    # a rerun reuses every finished stage: no fold is trained again, and the submission is the same
    second = run_sh(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    for model in ("qin_small", "dcnv2_tf_small", "din_tf_small"):
        assert f"runs/{model}: folds [0, 1, 2] already done, skipped" in second.stdout, second.stdout
    assert "fold 0 epoch" not in second.stdout
    assert "refit epoch" not in second.stdout
    for path in (zip_path, single_zip):
        with zipfile.ZipFile(path) as zf, zf.open("prediction.csv") as f:
            np.testing.assert_array_equal(pd.read_csv(f)["Task2"], predictions[path])
    assert len(experiments.read_log(log)) == 5  # nothing new: no new row

    # --refit adds one model per config on every train row (the best one has its refit already)
    # and blends their test predictions; the folds stay as they were. A name YAML reads as a
    # number stays the name
    refit = run_sh(tmp_path, "--refit", "--name", "2025")
    assert refit.returncode == 0, refit.stdout[-3000:] + refit.stderr[-3000:]
    assert "fold 0 epoch" not in refit.stdout and refit.stdout.count("refit epoch   1") == 2
    runs = work / "runs"
    assert all((runs / model / "refit" / "done.json").is_file() for model in MODELS)
    with zipfile.ZipFile(tmp_path / "sub" / "2025-blend.zip") as zf, zf.open("prediction.csv") as f:
        refit_submission = pd.read_csv(f)
    assert roc_auc(labels, refit_submission["Task2"].to_numpy()) > 0.5
    assert not np.array_equal(refit_submission["Task2"], submission)
    assert (tmp_path / "sub" / f"2025-single-{best}.zip").read_bytes() == single_zip.read_bytes()
    assert [row["kind"] for row in experiments.read_log(log)][5:] == ["refit"] * 2 + ["blend"]


@pytest.mark.slow
def test_run_sh_takes_the_real_download_as_it_is_laid_out(tmp_path):
    """The four files in MicroLens_1M_x1/, item_feature.parquet and item_emb.parquet one folder above
    (as the organisers ship them), no hidden labels, the input read-only: the items' levels come from
    the file one folder up, another embedding column by --data-set, and nothing is written into it."""
    download = tmp_path / "download"
    raw = download / "MicroLens_1M_x1"
    subprocess.run([sys.executable, "src/make_synthetic.py", "--preset", "tiny", "--out", str(raw), "--seed", "3"],
                   cwd=REPO, check=True, capture_output=True)
    shutil.rmtree(raw / "oracle")
    for name in ("item_feature.parquet", "item_emb.parquet"):
        (raw / name).rename(download / name)
    before = snapshot(download)
    for path in [download, *download.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        result = subprocess.run(
            ["bash", str(REPO / "run.sh"), "--data", str(raw), "--data-root", "out", "--submissions", "sub",
             "--models", "dcnv2_tf_small", "--folds", "2", "--train-set", "train.max_epochs=1",
             "--data-set", "data.item_emb={file: ../item_emb.parquet, column: item_emb_d128_v3}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        for path in [download, *download.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"the items' levels from {raw}/../item_feature.parquet" in result.stdout
    manifest = common.read_json(tmp_path / "out" / "work" / "MicroLens_1M_x1" / "processed" / "manifest.json")
    assert manifest["item_feature"] == "../item_feature.parquet" and manifest["item_levels"]["source"] == "item_feature"
    assert manifest["item_emb_source"]["file"] == "../item_emb.parquet"
    assert "test AUC n/a: real data has no public test labels" in result.stdout
    test_ids = pd.read_parquet(raw / "test.parquet", columns=["ID"])["ID"].to_numpy()
    zips = sorted((tmp_path / "sub").glob("*.zip"))
    assert [path.name for path in zips] == ["submission-blend.zip", "submission-single-dcnv2_tf_small.zip"]
    for path in zips:
        validate_submission(path, test_ids, "Task2")
    assert snapshot(download) == before
