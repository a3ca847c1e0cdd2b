"""src/stages.py, how run.sh runs its stages: several stage scripts in one Python process, each
exactly its script (same files, bit for bit), the first failure ending the chain as a script would."""
import pandas as pd
import pytest

from mmctr import common
from mmctr import experiments
from mmctr import stages
from helpers import TINY_TRAIN, assert_one_line_error, assert_user_error, run_script, write_config


@pytest.mark.parametrize("argv, fragment", [
    ([], "expected ':: STAGE ARGS...', got nothing"),
    (["train", "--config", "x.yaml"], "expected ':: STAGE ARGS...', got train --config x.yaml"),
    ([":: ", "train"], "expected ':: STAGE ARGS...'"),
    (["::", "tune"], "unknown stage 'tune'"),
    (["::", "train", "::"], "'::' must be followed by a stage name"),
    (["--started", "noon", "::", "summary"], "--started needs a Unix time, got 'noon'"),
    (["--started"], "--started needs a Unix time"),
])
def test_a_malformed_chain_is_one_line_before_any_stage_runs(argv, fragment, capsys):
    assert_user_error(lambda: stages.main(argv), fragment)
    assert "===" not in capsys.readouterr().out


def test_each_stage_gets_its_own_arguments_and_a_header(monkeypatch, capsys):
    called = []
    for name in ("preprocess", "train"):
        module = __import__(f"mmctr.{name}", fromlist=["main"])
        monkeypatch.setattr(module, "main", lambda argv, name=name: called.append((name, argv)))
    stages.main(["--started", "0", "::", "preprocess", "--config", "d.yaml", "::", "train", "--config",
                 "configs/qin_small.yaml", "--set", "train.lr=1e-3", "::", "train", "--config", "q.yaml", "--refit"])
    assert called == [("preprocess", ["--config", "d.yaml"]),
                      ("train", ["--config", "configs/qin_small.yaml", "--set", "train.lr=1e-3"]),
                      ("train", ["--config", "q.yaml", "--refit"])]
    headers = [line.split(" (")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("===")]
    assert headers == ["=== preprocess", "=== train qin_small", "=== train q"]


def test_the_first_failing_stage_ends_the_chain(pipeline, capsys):
    missing = pipeline.root / "missing.yaml"
    with pytest.raises(common.UserError, match="missing.yaml"):
        stages.main(["::", "preprocess", "--config", str(missing), "::", "summary", "--config",
                     str(pipeline.blend_yaml)])
    assert "=== summary" not in capsys.readouterr().out


def two_runs(p):
    """Configs of two runs on the pipeline's data: 'first' (another model), then 'again', the
    pipeline's own run under another name (its files must come out the same)."""
    data = {"raw_dir": str(p.raw), "work_dir": str(p.work), "n_folds": 2}
    return [write_config(p.root / f"{name}.yaml", base, {"data": data, "run": {"name": name}, "train": TINY_TRAIN})
            for name, base in (("first", "qin_small.yaml"), ("again", "dcnv2_tf_small.yaml"))]


@pytest.mark.slow
def test_a_stage_after_another_in_one_process_writes_what_its_script_alone_writes(pipeline):
    """The pipeline's run was trained alone; trained again in one process after another model's
    training (its own torch state, seeds and threads used first), its predictions are the same bits."""
    p = pipeline
    first, again = two_runs(p)
    result = run_script("stages", "::", "train", "--config", first, "--device", "cpu",
                        "::", "train", "--config", again, "--device", "cpu", cwd=p.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.index("=== train first") < result.stdout.index("=== train again")
    for name in ("oof", "valid", "test"):
        pd.testing.assert_frame_equal(pd.read_parquet(p.work / "runs" / "again" / f"{name}.parquet"),
                                      pd.read_parquet(p.run_dir / f"{name}.parquet"))


def test_a_failing_stage_script_is_one_line_and_exit_2(pipeline):
    result = run_script("stages", "::", "summary", "--config", str(pipeline.root / "nothing.yaml"), cwd=pipeline.root)
    assert_one_line_error(result, "nothing.yaml")


@pytest.mark.slow
def test_fold_workers_train_every_fold_once_and_the_stages_report_each_run(pipeline, capsys):
    """--fold-workers 2: two one-thread processes share the folds of both runs; each fold is the one
    a one-thread run trains alone (the pipeline's run, same bits), and then each train stage finds
    its folds done and writes its run's aggregates and one experiment row."""
    p = pipeline
    first, again = two_runs(p)
    stages.main(["--fold-workers", "2", "::", "train", "--config", str(first), "--device", "cpu",
                 "::", "train", "--config", str(again), "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.index("=== 2 fold workers") < out.index("=== train first") < out.index("=== train again")
    for run in ("first", "again"):  # the train stages trained nothing: the workers had
        assert f"runs/{run}: folds [0, 1] already done, skipped" in out, out
        assert common.read_json(p.work / "runs" / run / "fold0" / "done.json")["numerics"]["threads"] == 1
    for name in ("oof", "valid", "test"):
        pd.testing.assert_frame_equal(pd.read_parquet(p.work / "runs" / "again" / f"{name}.parquet"),
                                      pd.read_parquet(p.run_dir / f"{name}.parquet"))
    rows = [row for row in experiments.read_log(p.work / experiments.LOG_NAME) if row["kind"] == "train"]
    assert sorted(row["name"] for row in rows if row["name"] in ("first", "again")) == ["again", "first"]


def test_fold_workers_leave_gpu_refit_and_fold_subsets_to_their_stages(tmp_path):
    def stage(*extra):
        return ["--config", str(common.CONFIG_DIR / "qin_small.yaml"), *extra]
    on_cpu = stage("--device", "cpu")
    assert stages.shared_folds([on_cpu, stage("--device", "cpu", "--refit"), stage("--device", "cpu", "--folds", "0"),
                                stage("--devices", "cpu,cpu")]) == [on_cpu]


def test_the_workers_of_a_run_of_train_stages_start_after_the_stages_that_build_its_data():
    chain = [("preprocess", ["a"]), ("train", ["1"]), ("train", ["2"]), ("preprocess", ["b"]), ("train", ["3"]),
             ("blend", []), ("train", ["4"])]
    assert stages.train_blocks(chain) == {1: [["1"], ["2"]], 4: [["3"]], 6: [["4"]]}


def test_the_folds_a_failed_worker_left_are_trained_on_one_thread_as_the_workers_would(monkeypatch):
    """Bit for bit the run an unfailed chain writes: a fold's numbers depend on its thread count."""
    import torch
    seen = []
    monkeypatch.setattr(stages, "shared_folds", lambda args: [a for a in args if "--refit" not in a])
    monkeypatch.setattr(stages, "train_in_fold_workers", lambda shared, workers: True)  # one worker failed
    from mmctr import train
    monkeypatch.setattr(train, "main", lambda argv: seen.append((argv[-1], torch.get_num_threads())))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stages.main(["--fold-workers", "2", "::", "train", "a", "::", "train", "b", "--refit"])
        assert seen == [("a", 1), ("--refit", 2)] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
