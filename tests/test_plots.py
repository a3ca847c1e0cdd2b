"""The pictures next to the reports: a finished run and a blend write their PNGs and report.md embeds
them; a picture that cannot be drawn is a warning, and the run or blend finishes all the same."""
import sys

import numpy as np
import pytest

from mmctr import blend
from mmctr import common
from mmctr import plots
from mmctr import runs
from mmctr import train
from helpers import FASTEST, make_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ONE_EPOCH = "train.max_epochs=1"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def test_binned_means_over_equal_count_bins():
    pred = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    truth = np.array([1.0, 0.0, 0.4, 0.2, 0.6, 0.1])
    x, y = plots.binned(pred, truth, bins=3)
    np.testing.assert_allclose(x, [0.15, 0.4, 0.8])
    np.testing.assert_allclose(y, [0.05, 0.3, 0.8])


def test_a_finished_run_draws_its_pictures_and_the_report_embeds_them(tiny_cfg, tiny_processed):
    run = train.run_training(make_cfg(tiny_cfg, FASTEST, "pictures", ONE_EPOCH), device="cpu")
    for name in runs.PICTURES:
        assert_png(run / name)
    report = (run / "report.md").read_text()
    assert f"]({runs.CURVES_PNG})" in report and f"]({runs.CALIBRATION_PNG})" in report

    # retraining a fold removes the pictures with the aggregates they show
    runs.remove_aggregates(run)
    assert not any((run / name).exists() for name in runs.PICTURES)


def test_a_plotting_error_is_a_warning_and_the_run_finishes(tiny_cfg, tiny_processed, monkeypatch, capsys):
    def broken(*args):
        raise ValueError("no good")

    monkeypatch.setattr(plots, "training_curves", broken)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # and matplotlib missing: an ImportError
    run = train.run_training(make_cfg(tiny_cfg, FASTEST, "broken_pictures", ONE_EPOCH), device="cpu")
    out = capsys.readouterr().out
    assert f"warning: {run / runs.CURVES_PNG}: picture not drawn (ValueError: no good)" in out
    assert f"warning: {run / runs.CALIBRATION_PNG}: picture not drawn (ModuleNotFoundError" in out
    assert not any((run / name).exists() for name in runs.PICTURES)
    assert all((run / name).is_file() for name in runs.AGGREGATE_FILES)
    assert ".png" not in (run / "report.md").read_text()


def test_a_blend_draws_candidates_and_calibration(workspace):
    cfg, _ = workspace
    metrics = blend.run_blend(cfg)
    blend_dir = common.data_paths(cfg)["work"] / "blend"
    for name in (blend.CANDIDATES_PNG, blend.CALIBRATION_PNG):
        assert_png(blend_dir / name)
    report = (blend_dir / "report.md").read_text()
    assert f"]({blend.CANDIDATES_PNG})" in report and f"]({blend.CALIBRATION_PNG})" in report
    assert metrics["chosen"] in report


def test_a_blend_whose_picture_fails_still_writes_everything(workspace, monkeypatch, capsys):
    cfg, _ = workspace
    blend.run_blend(cfg)  # an earlier blend's pictures must not survive into the next report
    monkeypatch.setattr(plots, "blend_candidates", lambda *args: 1 / 0)
    blend.run_blend(cfg)
    blend_dir = common.data_paths(cfg)["work"] / "blend"
    assert "picture not drawn (ZeroDivisionError" in capsys.readouterr().out
    assert not (blend_dir / blend.CANDIDATES_PNG).exists() and (blend_dir / blend.CALIBRATION_PNG).is_file()
    assert (blend_dir / "metrics.json").is_file() and blend.CANDIDATES_PNG not in (blend_dir / "report.md").read_text()


@pytest.mark.parametrize("chosen, what, weights", [
    ("auc_weights", "weight on the logit", {"a": 0.25, "b": 0.75}),
    ("a", "weight", {"a": 1.0, "b": 0.0}),                       # the best single run
    ("rank_mean", "equal weight on the rank", {"a": 0.5, "b": 0.5}),
])
def test_chosen_weights_say_what_the_chosen_candidate_puts_on_each_run(chosen, what, weights):
    details = {"weights": {"a": 0.25, "b": 0.75}} if chosen == "auc_weights" else {}
    candidate = blend.Candidate(chosen, {}, 0.7, 0.7, 0.0, details)
    assert blend.chosen_weights(candidate, ["a", "b"]) == (what, weights)
