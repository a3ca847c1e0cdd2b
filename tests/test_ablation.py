"""tools/ablation.py, the single-network study: refits on a generated dataset scored on its hidden
test labels, one JSON line per finished run, a failed run reported while the others finish, and a
rerun that trains only what is missing, and one that refuses a label changed since it ran."""
import json

import pytest

import ablation as study
from helpers import run_script


def ablation(root, *variants):
    variant_args = [arg for variant in variants for arg in ("--variant", variant)]
    return run_script("ablation", "--data-root", root, "--datasets", "tiny:heavy", "--seeds", "1", "--workers", "2",
                      *variant_args, cwd=root)


@pytest.mark.slow
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


def test_a_variants_list_value_keeps_its_commas():
    assert study.parse_variant("a=qin_small,model.mlp_hidden=[64, 32],train.lr=1e-3") == \
        ("a", "qin_small", ["model.mlp_hidden=[64, 32]", "train.lr=1e-3"])
    assert study.parse_variant("b=qin_small, train.seed=2") == ("b", "qin_small", ["train.seed=2"])


def stored(label, config="qin_small", overrides=(), seed=1, test_auc=0.8):
    return {"dataset": "tiny:heavy", "variant": label, "config": config, "overrides": list(overrides), "seed": seed,
            "test_auc": test_auc, "valid_auc": 0.8, "epochs": 2, "seconds_per_epoch": 1.0, "params": 10}


def test_a_label_run_before_as_another_variant_or_sharing_run_folders_is_refused():
    results = [stored("q", overrides=["model.emb_dim=8"])]
    study.check_labels([("q", "qin_small", ["model.emb_dim=8"])], [], results)  # the same variant resumes
    study.check_labels([("q", "qin_small", ["model.emb_dim=8"])], [], [stored("q", overrides=[" model.emb_dim=8"])])
    for variant, extra in [(("q", "qin_small", ["model.emb_dim=16"]), []), (("q", "simqin_small", ["model.emb_dim=8"]), []),
                           (("q", "qin_small", ["model.emb_dim=8"]), ["train.lr=1e-2"])]:
        with pytest.raises(SystemExit, match="'q': already run in this data root as qin_small"):
            study.check_labels([variant], extra, results)
    with pytest.raises(SystemExit, match="would share run folders"):
        study.check_labels([("s +user", "qin_small", []), ("s-user", "qin_small", [])], [], [])


def test_the_table_covers_only_the_seeds_asked_for():
    results = [stored("q", seed=1, test_auc=0.7), stored("q", seed=2, test_auc=0.9)]
    [row] = [line for line in study.table(results, "tiny:heavy", ["q"], [1]) if line.startswith("| q |")]
    assert row.startswith("| q | 0.7000 | 0.7000..0.7000 |") and row.endswith("| 1 |")
