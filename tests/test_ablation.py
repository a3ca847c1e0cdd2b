"""tools/ablation.py, the single-network study: refits on a generated dataset scored on its hidden
test labels, one JSON line per finished run, a failed run reported while the others finish, and a
rerun that trains only what is missing."""
import json

import pytest

from helpers import run_script

pytestmark = pytest.mark.slow


def ablation(root, *variants):
    variant_args = [arg for variant in variants for arg in ("--variant", variant)]
    return run_script("ablation", "--data-root", root, "--datasets", "tiny:heavy", "--seeds", "1", "--workers", "2",
                      *variant_args, cwd=root)


def test_ablation_records_each_run_reports_failures_and_resumes(tmp_path):
    # a variant whose config train.py rejects fails alone; qin_small's run is recorded
    bad = "bad=simqin_small,model.senet=true,model.senet_reduction=0"
    first = ablation(tmp_path, "qin_small=qin_small", bad)
    assert first.returncode == 1, first.stderr
    assert "FAILED (exit 2)" in first.stderr and "model.senet_reduction" in first.stderr
    assert first.stderr.rstrip().endswith("1 runs failed (above); rerun the same command to retry them")
    [line] = (tmp_path / "ablation.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert (result["dataset"], result["variant"], result["seed"]) == ("tiny:heavy", "qin_small", 1)
    assert 0.5 < result["test_auc"] < 1 and result["valid_auc"] is not None  # stopped on the valid split
    assert 1 <= result["best_epoch"] <= result["epochs"] <= 4 and result["train_rows"] == 4000
    assert "| qin_small | " in first.stdout

    done = tmp_path / "work" / "tiny_heavy" / "runs" / "qin_small_s1" / "refit" / "done.json"
    stamp = done.stat().st_mtime_ns
    again = ablation(tmp_path, "qin_small=qin_small")
    assert again.returncode == 0, again.stderr
    assert len((tmp_path / "ablation.jsonl").read_text().splitlines()) == 1  # nothing trained again
    assert done.stat().st_mtime_ns == stamp
    assert f"| qin_small | {result['test_auc']:.4f} |" in again.stdout
    assert result["params"] > 0 and f"| {result['params']:,} | 1 |" in again.stdout  # parameters, seeds
