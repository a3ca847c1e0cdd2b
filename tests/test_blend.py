"""The blend: methods on hand-made predictions whose answer is known, honest cross-fitting,
selection by OOF AUC (never below the best single run), outputs, and every misalignment error.

Nothing here trains a model: runs are written by hand into a private work folder next to the tiny
processed data (symlinked), with predictions made from the oracle's true probabilities plus noise.
The robustness tests at the end use the shared `pipeline` (conftest, trained once per session):
user errors keep the earlier submission, a blend section typo is an error, a planted leaking run is
given away by its holdout AUC while the blend fits on out-of-fold predictions only, and a failure
at the submission leaves the previous blend whole.
"""
import errno
import shlex
import shutil
import subprocess
import sys
import typing
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from mmctr import blend
from mmctr import blend_methods
from mmctr import single
from mmctr import summary
from mmctr import common
from mmctr import processed_data
from mmctr.common import UserError
from mmctr.models.metrics import roc_auc
from helpers import (FAST_LIGHTGBM, RUN, assert_user_error, inf_prediction, outputs, replace_column, restored, snapshot,
                     truncate, write_config, write_run)

SRC = Path(__file__).resolve().parent.parent / "src"
def blend_settings(*overrides: str) -> blend.BlendConfig:
    return blend.checked_settings(common.load_config(common.CONFIG_DIR / "blend.yaml", [*FAST_LIGHTGBM, *overrides]))


# ---------------------------------------------------------------------------------------------
# methods on numpy-made data: two latent signals drive the clicks, runs see them with noise
# ---------------------------------------------------------------------------------------------

def make_blend_data(*run_scores, n_oof=8000, n_other=2000, n_folds=4, seed=0) -> blend_methods.BlendData:
    """Each run_scores item maps (s1, s2, label, rng) to that run's logits for every row."""
    rng = np.random.default_rng(seed)
    n = n_oof + 2 * n_other
    s1, s2 = rng.normal(size=(2, n))
    label = (rng.random(n) < expit(2.0 * (s1 + s2))).astype(np.float64)
    probs = expit(np.column_stack([score(s1, s2, label, rng) for score in run_scores]))
    cuts = {"oof": slice(0, n_oof), "valid": slice(n_oof, n_oof + n_other), "test": slice(n_oof + n_other, n)}
    return blend_methods.BlendData(
        runs=[f"run{i}" for i in range(len(run_scores))],
        probs={split: probs[rows] for split, rows in cuts.items()},
        oof_label=label[cuts["oof"]], valid_label=label[cuts["valid"]],
        fold=rng.permutation(np.arange(n_oof) % n_folds), test_ids=np.arange(n_other),
        row_features={split: rng.integers(0, 11, (rows.stop - rows.start, 3)).astype(np.float32)
                      for split, rows in cuts.items()})


def noise(s1, s2, label, rng):
    return 2.0 * rng.normal(size=len(s1))


def informative(s1, s2, label, rng):
    return s1 + s2 + 0.5 * rng.normal(size=len(s1))


def sees_s1(s1, s2, label, rng):
    return s1 + 0.3 * rng.normal(size=len(s1))


def sees_s2(s1, s2, label, rng):
    return s2 + 0.3 * rng.normal(size=len(s1))


def saturated(s1, s2, label, rng):
    # logits of +-50 make float probabilities of exactly 0 and 1: the methods must not blow up
    return np.where(s1 > 0, 50.0, -50.0)


def test_roc_auc_is_exact_with_ties():
    rng = np.random.default_rng(1)
    labels = (rng.random(5000) < 0.3).astype(np.float64)
    scores = np.round(rng.random(5000) + 0.3 * labels, 1)  # few distinct values: many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_normalised_rank_places_values_on_the_reference_scale():
    reference = np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(blend_methods.normalised_rank(reference, np.array([2.0, 0.0, 5.0, 1.0])),
                               [0.5, 0.0, 1.0, 0.125])


def candidate(name: str, oof_auc: float, valid_auc: float) -> blend.Candidate:
    return blend.Candidate(name, preds={}, oof_auc=oof_auc, valid_auc=valid_auc, seconds=0.0, details={})


def test_selection_follows_the_oof_score_never_the_holdout():
    best_single = candidate("run_a", 0.80, 0.80)
    methods = [candidate("logit_mean", 0.81, 0.95), candidate("logistic", 0.82, 0.70)]
    assert blend.choose(best_single, methods, "auto").name == "logistic"
    # a tie keeps the single run: a blend must strictly win out of fold to be chosen
    assert blend.choose(best_single, [candidate("rank_mean", 0.80, 0.99)], "auto") is best_single
    assert blend.choose(best_single, methods, "logit_mean").name == "logit_mean"
    assert blend.choose(best_single, methods, "best_single") is best_single


def test_auc_weights_put_the_weight_on_the_informative_run():
    data = make_blend_data(noise, informative)
    preds, details = blend_methods.auc_weights(data, blend_settings().auc_weights)
    assert details["weights"]["run1"] > 0.95
    assert sum(details["weights"].values()) == pytest.approx(1.0)
    assert roc_auc(data.oof_label, preds["oof"]) >= roc_auc(data.oof_label, data.probs["oof"][:, 1]) - 0.002


def test_auc_weights_score_each_fold_with_weights_fitted_without_it():
    """Cross-fitted: weights fitted in sample always score at least the best run on their own rows,
    which would let them win the selection on optimism alone."""
    data = make_blend_data(sees_s1, sees_s2)
    params = blend_settings().auc_weights
    preds, details = blend_methods.auc_weights(data, params)
    logits = data.logits["oof"]
    for k in np.unique(data.fold):
        held, fit_rows = data.fold == k, data.fold != k
        weights = blend_methods.fit_auc_weights(logits[fit_rows], data.oof_label[fit_rows], params)
        np.testing.assert_allclose(preds["oof"][held], expit(logits[held] @ weights))
    weights = np.array(list(details["weights"].values()))
    np.testing.assert_allclose(preds["test"], expit(data.logits["test"] @ weights))
    assert details["fitted"].startswith("cross-fitted")


@pytest.mark.parametrize("method", list(blend_methods.METHODS))
def test_blend_of_complementary_runs_beats_both(method):
    data = make_blend_data(sees_s1, sees_s2)
    preds, _ = blend_methods.METHODS[method].fit(data, blend.method_settings(blend_settings(), method))
    for split, labels in (("oof", data.oof_label), ("valid", data.valid_label)):
        best_single = max(roc_auc(labels, data.probs[split][:, r]) for r in range(2))
        assert roc_auc(labels, preds[split]) > best_single + 0.03, split


@pytest.mark.parametrize("method", list(blend_methods.METHODS))
def test_every_method_returns_probabilities(method):
    data = make_blend_data(informative, saturated, noise)
    preds, details = blend_methods.METHODS[method].fit(data, blend.method_settings(blend_settings(), method))
    assert set(preds) == set(blend_methods.SPLITS) and "fitted" in details
    for split in blend_methods.SPLITS:
        assert preds[split].shape == (len(data.probs[split]),)
        assert np.isfinite(preds[split]).all() and (preds[split] >= 0).all() and (preds[split] <= 1).all()


@pytest.mark.parametrize("method", ["logistic", "lightgbm"])
def test_stacker_predicts_each_fold_with_a_model_that_never_saw_it(method):
    # a planted run equals the label on fold 0 and its opposite on every other fold: a model fitted
    # without fold 0 learns "high means no click" and so ranks fold 0 backwards; any model that had
    # seen fold 0 would have had the planted run cancel out or point the right way
    data = make_blend_data(informative, noise)
    fold0 = data.fold == 0
    planted = np.where(fold0, data.oof_label, 1.0 - data.oof_label)
    data.probs["oof"] = np.column_stack([data.probs["oof"], 0.1 + 0.8 * planted])
    for split in ("valid", "test"):
        data.probs[split] = np.column_stack([data.probs[split], np.full(len(data.probs[split]), 0.5)])
    data.runs.append("planted")
    preds, _ = blend_methods.METHODS[method].fit(data, blend.method_settings(blend_settings(), method))
    assert roc_auc(data.oof_label[fold0], preds["oof"][fold0]) < 0.2


def test_lightgbm_oof_on_pure_noise_stays_at_chance():
    data = make_blend_data(noise, noise, noise)
    preds, _ = blend_methods.lightgbm_stacker(data, blend_settings().lightgbm)
    assert abs(roc_auc(data.oof_label, preds["oof"]) - 0.5) < 0.04
    # the same stacker scored on the rows it was fitted on looks far better: the check has teeth
    features = np.column_stack([data.logits["oof"], data.row_features["oof"]])
    import lightgbm
    model = lightgbm.LGBMClassifier(**asdict(blend_settings().lightgbm), verbose=-1).fit(features, data.oof_label)
    assert roc_auc(data.oof_label, model.predict_proba(features)[:, 1]) > 0.6


# ---------------------------------------------------------------------------------------------
# run_blend on hand-written run folders next to the tiny processed data
# ---------------------------------------------------------------------------------------------

def test_run_blend_writes_the_blend_folder_and_the_submission(workspace):
    cfg, _ = workspace
    metrics = blend.run_blend(cfg)

    candidates = {**metrics["runs"], **metrics["methods"]}
    assert set(metrics["methods"]) == set(cfg["blend"]["methods"])
    best_single = max(metrics["runs"].values(), key=lambda m: m["oof_auc"])
    assert metrics["best_single_run"] == "good"
    assert metrics["chosen_oof_auc"] == max(m["oof_auc"] for m in candidates.values())
    assert metrics["oof_auc_gain_vs_best_single"] == pytest.approx(metrics["chosen_oof_auc"] - best_single["oof_auc"])
    assert metrics["oof_auc_gain_vs_best_single"] >= 0
    assert 0.5 < metrics["oracle_oof_auc"] <= 1

    blend_dir = Path(cfg["data"]["work_dir"]) / "blend"
    oof = pd.read_parquet(blend_dir / "oof.parquet")
    assert list(oof.columns) == ["row_id", "fold", "pred"]
    assert roc_auc(np.asarray(processed_data.load_processed(Path(cfg["data"]["work_dir"]) / "processed")[0]
                                    ["train_label"], np.float64), oof["pred"].to_numpy()) == pytest.approx(
        metrics["chosen_oof_auc"])
    test = pd.read_parquet(blend_dir / "test.parquet")
    np.testing.assert_array_equal(test["ID"], np.arange(len(test)))
    assert common.read_json(blend_dir / "metrics.json")["chosen"] == metrics["chosen"]
    report = (blend_dir / "report.md").read_text()
    assert all(name in report for name in candidates) and f"**Chosen: {metrics['chosen']}**" in report

    submission = pd.read_csv(metrics["submission"]["csv"])
    assert list(submission.columns) == ["ID", "Task2"]
    np.testing.assert_array_equal(submission["ID"], test["ID"])
    np.testing.assert_allclose(submission["Task2"], test["pred"], rtol=1e-9)
    with zipfile.ZipFile(metrics["submission"]["zip"]) as archive:
        assert archive.namelist() == ["prediction.csv"]
        assert archive.read("prediction.csv") == Path(metrics["submission"]["csv"]).read_bytes()


def test_auto_keeps_the_best_single_run_when_no_method_beats_it(workspace):
    # averaging the good run with pure noise only hurts: the guarantee must fall back to it
    cfg, runs = workspace
    cfg["blend"].update(runs=["noise", "good"], methods=["logit_mean", "rank_mean"])
    metrics = blend.run_blend(cfg)
    assert all(m["oof_auc"] < metrics["runs"]["good"]["oof_auc"] for m in metrics["methods"].values())
    assert metrics["chosen"] == "best_single (good)"
    assert metrics["oof_auc_gain_vs_best_single"] == 0
    submission = pd.read_csv(metrics["submission"]["csv"])
    np.testing.assert_allclose(submission["Task2"], runs["good"]["test"].astype(np.float32), rtol=1e-6)


def test_select_can_name_a_method(workspace):
    cfg, _ = workspace
    cfg["blend"].update(methods=["logit_mean", "rank_mean"], select="rank_mean")
    assert blend.run_blend(cfg)["chosen"] == "rank_mean"


def test_without_lightgbm_the_blend_skips_that_candidate_and_still_submits(workspace, monkeypatch, capsys):
    """lightgbm is optional (a GPU image may lack it): one line, the other candidates, a submission."""
    cfg, _ = workspace
    monkeypatch.setattr(blend, "lightgbm", None)
    metrics = blend.run_blend(cfg)
    assert set(metrics["methods"]) == set(cfg["blend"]["methods"]) - {"lightgbm"}
    assert Path(metrics["submission"]["zip"]).is_file()
    assert capsys.readouterr().out.count("lightgbm is not installed") == 1
    cfg["blend"]["select"] = "lightgbm"
    with pytest.raises(UserError, match="blend.select=lightgbm, but lightgbm is not installed"):
        blend.run_blend(cfg)


def drop_last_oof_row(run_dir: Path) -> None:
    frame = pd.read_parquet(run_dir / "oof.parquet")
    frame.iloc[:-1].to_parquet(run_dir / "oof.parquet")


def shift_test_ids(run_dir: Path) -> None:
    frame = pd.read_parquet(run_dir / "test.parquet")
    frame.assign(ID=frame["ID"] + 1).to_parquet(run_dir / "test.parquet")


def other_data_fingerprint(run_dir: Path) -> None:
    common.write_json(run_dir / "fingerprint.json", {"config_hash": "handmade", "data_fingerprint": "elsewhere"})


def nan_valid_prediction(run_dir: Path) -> None:
    frame = pd.read_parquet(run_dir / "valid.parquet")
    frame.loc[3, "pred"] = np.nan
    frame.to_parquet(run_dir / "valid.parquet")


def other_folds(run_dir: Path) -> None:
    frame = pd.read_parquet(run_dir / "oof.parquet")
    frame.assign(fold=1 - frame["fold"]).to_parquet(run_dir / "oof.parquet")


MISALIGNMENTS = {
    "missing fold": (lambda run_dir: (run_dir / "fold1" / "done.json").unlink(), "fold 1 is not done"),
    "missing aggregate": (lambda run_dir: (run_dir / "test.parquet").unlink(), "test.parquet: missing"),
    "fewer rows": (drop_last_oof_row, "rows, but the processed train split has"),
    "other ids": (shift_test_ids, "row ids differ from the processed test split"),
    "other data": (other_data_fingerprint, "run 'fair' was trained on other data"),
    "nan prediction": (nan_valid_prediction, "1 NaN predictions (first: row_id 3)"),
    "other folds": (other_folds, "the run used other folds"),
}


@pytest.mark.parametrize("case", list(MISALIGNMENTS))
def test_misaligned_runs_give_one_line_errors(workspace, case):
    cfg, _ = workspace
    damage, expected = MISALIGNMENTS[case]
    damage(Path(cfg["data"]["work_dir"]) / "runs" / "fair")
    with pytest.raises(UserError) as error:
        blend.run_blend(cfg)
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert not (Path(cfg["blend"]["submission"]["dir"]) / "submission.zip").exists()


def test_cli_reports_a_missing_run_as_one_line_and_exit_2(workspace, tmp_path):
    cfg, _ = workspace
    result = subprocess.run(
        [sys.executable, str(SRC / "blend.py"), "--set", f"data.raw_dir={cfg['data']['raw_dir']}",
         "--set", f"data.work_dir={cfg['data']['work_dir']}", "--set", f"data.n_folds={cfg['data']['n_folds']}",
         "--set", "blend.runs=[good,absent]"],
        cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "run 'absent' not found" in result.stderr


@pytest.mark.parametrize("override, expected", [
    ("blend.methods=[logit_mean,magic]", r"blend.methods must be a list of values from rank_mean, .*\(item 1: 'magic'\)"),
    ("blend.methods=[logit_mean,logit_mean]", "names a method twice"),
    ("blend.select=lightgbm", "blend.select must be auto"),  # lightgbm is not among blend.methods
    ("blend.runs=[]", "blend.runs must be a non-empty list"),
    ("blend.submission.column=ID", "cannot be 'ID'"),
    ("blend.submission.name=../x", "plain file stem"),
    ("blend.submission.column=''", "blend.submission.column must not be empty"),
    ("blend.runs=[a,a]", "names a run twice"),
    ("blend.auc_weights.max_rows=0", "blend.auc_weights.max_rows must be at least 1, got 0"),
    ("blend.auc_weights.seed=true", "blend.auc_weights.seed must be an integer, got True"),
    ("blend.logistic.C=0", "blend.logistic.C must be positive, got 0"),
    ("blend.lightgbm.num_leaves=1.5", "blend.lightgbm.num_leaves must be an integer, got 1.5"),
])
def test_bad_settings_are_one_line_errors(override, expected):
    with pytest.raises(UserError, match=expected) as error:
        blend_settings("blend.methods=[logit_mean]", override)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", list(blend_methods.METHODS))
def test_a_method_with_settings_reads_its_own_section_of_the_config(method):
    # the convention that joins the registry to the config: blend.<name>: holds the method's settings
    settings_type = blend_methods.METHODS[method].settings
    hints = typing.get_type_hints(blend.BlendConfig)
    shipped = common.load_config(common.CONFIG_DIR / "blend.yaml")["blend"]
    if settings_type is None:
        assert method not in hints and blend.method_settings(blend_settings(), method) is None
    else:
        assert hints[method] is settings_type and method in shipped
        assert isinstance(blend.method_settings(blend_settings(), method), settings_type)


def test_settings_are_typed_and_missing_keys_take_the_defaults():
    settings = blend_settings("blend.logistic={}", "blend.lightgbm={n_estimators: 80.0}", "blend.auc_weights.max_rows=1e3")
    assert settings.logistic.C == 1.0 and settings.lightgbm.n_estimators == 80
    assert isinstance(settings.lightgbm.n_estimators, int) and settings.auc_weights.max_rows == 1000
    assert settings.lightgbm.num_leaves == blend_methods.LightGBMConfig().num_leaves
    with pytest.raises(UserError, match=r"unknown key blend.lightgbm.n_estimator \(known: n_estimators,"):
        blend_settings("blend.lightgbm={n_estimator: 80}")


def test_test_from_refit_applies_the_oof_fitted_blend_to_the_refits(workspace, tiny_processed):
    cfg, runs = workspace
    arrays, manifest = processed_data.load_processed(tiny_processed)
    work = Path(cfg["data"]["work_dir"])
    cfg["blend"].update(runs=["good", "fair"], methods=["logit_mean"], select="logit_mean", test_from="refit")
    with pytest.raises(UserError, match="no finished refit"):
        blend.run_blend(cfg)

    rng = np.random.default_rng(1)
    refits = {name: {split: np.clip(runs[name][split] + rng.normal(0, 0.05, len(runs[name][split])), 0, 1)
                     for split in ("valid", "test")} for name in ("good", "fair")}
    for name in ("good", "fair"):
        write_run(work / "runs" / name, runs[name], arrays, manifest, refit=refits[name])
    metrics = blend.run_blend(cfg)
    assert metrics["test_from"] == "refit" and metrics["chosen_is_one_run"] is False
    # the best run alone, from its refit: one network, and the summary says so
    alone = blend.run_blend({**cfg, "blend": {**cfg["blend"], "select": "best_single"}})
    assert alone["chosen_is_one_run"] is True
    assert summary.probe_text(alone) == f"the blend chose {alone['best_single_run']} alone, its refit: one network"
    assert "an ensemble" in summary.probe_text({**alone, "test_from": "folds"}) and "an ensemble" in \
        summary.probe_text(metrics)
    metrics = blend.run_blend(cfg)
    expected = {split: expit((logit(np.clip(refits["good"][split], 1e-7, 1 - 1e-7))
                              + logit(np.clip(refits["fair"][split], 1e-7, 1 - 1e-7))) / 2)
                for split in ("valid", "test")}
    test = pd.read_parquet(work / "blend" / "test.parquet")
    np.testing.assert_allclose(test["pred"], expected["test"], rtol=1e-5)
    assert metrics["chosen_valid_auc"] == pytest.approx(roc_auc(np.asarray(arrays["valid_label"]),
                                                                       expected["valid"]))
    # the OOF side is the folds' either way
    oof = pd.read_parquet(work / "blend" / "oof.parquet")
    np.testing.assert_allclose(oof["pred"], expit((logit(np.clip(runs["good"]["oof"], 1e-7, 1 - 1e-7))
                                                   + logit(np.clip(runs["fair"]["oof"], 1e-7, 1 - 1e-7))) / 2),
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the single network (src/single.py): the prize-eligible submission
# ---------------------------------------------------------------------------------------------

def test_single_submits_the_best_runs_refit_alone(workspace, tiny_processed):
    cfg, runs = workspace
    arrays, manifest = processed_data.load_processed(tiny_processed)
    work = Path(cfg["data"]["work_dir"])
    assert single.fold_oof_aucs(cfg, ["good", "fair", "noise"]).keys() == {"good", "fair", "noise"}
    with pytest.raises(UserError, match=r"run 'good' has no finished refit .*--config \S*/runs/good/config.yaml "
                                        r"--set \S*data.raw_dir=\S+ --set \S*data.work_dir=\S+ --refit") as refused:
        single.run_single(cfg)
    # the command trains with this call's data folders, whatever the run's config.yaml recorded last
    sets = dict(word.split("=", 1) for word in shlex.split(str(refused.value).split("`")[1])[5:8:2])
    assert {key: common.override_value(key, value) for key, value in sets.items()} == {
        "data.raw_dir": str(cfg["data"]["raw_dir"]), "data.work_dir": str(cfg["data"]["work_dir"])}
    refit = {split: np.clip(runs["good"][split] + 0.01, 0, 1) for split in ("valid", "test")}
    write_run(work / "runs" / "good", runs["good"], arrays, manifest, refit=refit)

    metrics = single.run_single(cfg)
    assert metrics["run"] == "good" and metrics["chosen_by"] == "the best OOF AUC of blend.runs"
    assert metrics["folds_oof_auc"] == max(metrics["candidates_oof_auc"].values())
    submission = pd.read_csv(metrics["submission"]["zip"])
    assert Path(metrics["submission"]["zip"]).name == "submission-single-good.zip"
    np.testing.assert_allclose(submission["Task2"], refit["test"], rtol=1e-6)  # the refit (float32), nothing else
    assert metrics["refit_valid_auc"] == pytest.approx(roc_auc(np.asarray(arrays["valid_label"]), refit["valid"]))
    assert 0.5 < metrics["test_auc"] < 1
    assert common.read_json(work / "single" / "metrics.json")["run"] == "good"


def test_single_takes_the_named_run_and_refuses_one_outside_the_blend(workspace):
    cfg, _ = workspace
    cfg["single"] = {"run": "fair"}
    with pytest.raises(UserError, match="run 'fair' has no finished refit"):
        single.run_single(cfg)
    cfg["single"] = {"run": "other"}
    with pytest.raises(UserError, match=r"single.run must be auto or one of blend.runs \(good, fair, noise\)"):
        single.run_single(cfg)


def test_single_choose_prints_the_run_alone(workspace, tmp_path):
    cfg, _ = workspace
    path = tmp_path / "cfg.yaml"
    common.write_yaml(path, cfg)
    result = subprocess.run([sys.executable, str(SRC / "single.py"), "--config", str(path), "--choose"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "good\n"


# ---------------------------------------------------------------------------------------------
# robustness on the shared pipeline: user errors, a planted leak, a failure at the submission
# ---------------------------------------------------------------------------------------------

def rename_pred(path: Path) -> None:
    replace_column(path, "pred", pq.read_table(path)["pred"].combine_chunks(), new_name="prediction")


BLEND_CASES = {
    "truncated run file": (f"runs/{RUN}/test.parquet", truncate, [],
                           ["test.parquet", "not a readable parquet file"]),
    "wrong column": (f"runs/{RUN}/oof.parquet", rename_pred, [], ["oof.parquet", "column 'pred': missing"]),
    "infinite prediction": (f"runs/{RUN}/oof.parquet", inf_prediction, [],
                            ["oof.parquet", "column 'pred'", "outside [0, 1] (first: inf"]),
    "corrupt fingerprint": (f"runs/{RUN}/fingerprint.json", lambda path: path.write_text('{"data_fin'), [],
                            ["fingerprint.json", "not a readable JSON file"]),
    "fingerprint not a mapping": (f"runs/{RUN}/fingerprint.json", lambda path: path.write_text("[]"), [],
                                  ["fingerprint.json", "trained on other data"]),
    "empty oof": (f"runs/{RUN}/oof.parquet",
                  lambda path: pq.write_table(pq.read_table(path).slice(0, 0), path), [],
                  ["oof.parquet", "0 rows", "4,000"]),
    "unknown key": (None, None, ["blend.method=[logit_mean]"], ["unknown config key 'method'"]),
    "unknown run": (None, None, ["blend.runs=[tiny_run,nope]"], ["run 'nope' not found"]),
    "no processed data": ("processed", shutil.rmtree, [], ["no processed data yet", "src/preprocess.py"]),
}


@pytest.mark.parametrize("case", list(BLEND_CASES))
def test_blend_user_errors_keep_the_earlier_submission(pipeline, case, one_thread):
    p = pipeline
    target, damage, overrides, fragments = BLEND_CASES[case]
    with restored(p.raw, *outputs(p)):
        if target:
            damage(p.work / target)
        before = snapshot(p.run_dir, p.blend_dir, p.subs)
        assert_user_error(lambda: blend.run_blend(common.load_config(p.blend_yaml, overrides)), *fragments)
        assert snapshot(p.run_dir, p.blend_dir, p.subs) == before


def test_a_blend_section_typo_in_a_config_file_is_an_error(tmp_path):
    cfg = common.load_config(write_config(tmp_path / "b.yaml", "blend.yaml", {"blend": {"method": ["x"]}}))
    assert_user_error(lambda: blend.checked_settings(cfg), "unknown key blend.method")


@pytest.fixture
def planted_leak(pipeline, tmp_path):
    """A work folder with an honest run (noisy true probabilities) and a LEAKING one: its 'OOF'
    predictions are the labels plus noise (it saw its own rows), its holdout predictions noise."""
    p = pipeline
    work = tmp_path / "work"
    work.mkdir()
    (work / "processed").symlink_to(p.processed, target_is_directory=True)
    arrays, manifest = processed_data.load_processed(p.processed)
    rng = np.random.default_rng(0)
    sizes = {"oof": manifest["n_rows"]["train"], "valid": manifest["n_rows"]["valid"],
             "test": manifest["n_rows"]["test"]}
    honest = {}
    for split, raw_split in (("oof", "train"), ("valid", "valid"), ("test", "test")):
        prob = common.read_oracle_prob(p.raw, raw_split)
        honest[split] = 1 / (1 + np.exp(-(np.log(prob / (1 - prob)) + rng.normal(0, 1.0, len(prob)))))
    leaky = {"oof": np.clip(np.asarray(arrays["train_label"]) * 0.6 + rng.uniform(0, 0.4, sizes["oof"]), 0, 1),
             "valid": rng.random(sizes["valid"]), "test": rng.random(sizes["test"])}
    write_run(work / "runs" / "honest", honest, arrays, manifest)
    write_run(work / "runs" / "leaky", leaky, arrays, manifest)
    cfg = common.load_config(p.blend_yaml, ["blend.runs=[honest,leaky]", "blend.methods=[logit_mean,logistic]",
                                            f"data.work_dir={work}",
                                            f"blend.submission.dir={tmp_path / 'subs'}"])
    return cfg, work


def test_a_planted_leak_is_given_away_by_the_holdout(planted_leak, one_thread):
    cfg, work = planted_leak
    # the leaky run says its folds stopped on their own held-out rows: the blend names it
    common.write_json(work / "runs" / "leaky" / "fold0" / "done.json", {"fold": 0, "early_stopping": "holdout"})
    metrics = blend.run_blend(cfg)
    assert metrics["holdout_stopped"] == ["leaky"]
    leaky, honest = metrics["runs"]["leaky"], metrics["runs"]["honest"]
    assert leaky["oof_auc"] > 0.99, "the leak looks perfect out of fold"
    assert abs(leaky["valid_auc"] - 0.5) < 0.1, "and is chance on the holdout"
    # select: auto trusts the OOF AUC, so it falls for the leak; the report must say so
    assert metrics["chosen_valid_auc"] < honest["valid_auc"]
    warnings = metrics["gap_warnings"]
    assert any(w.startswith("leaky:") for w in warnings)
    assert not any(w.startswith("honest:") for w in warnings)
    report = (work / "blend" / "report.md").read_text()
    assert "## Warning: OOF AUC above the holdout AUC" in report
    assert f"leaky: OOF AUC {leaky['oof_auc']:.6f} but holdout AUC {leaky['valid_auc']:.6f}" in report
    assert "honest: OOF AUC" not in report
    assert "## Warning: runs whose folds chose their epoch on their own held-out rows" in report
    assert "leaky trained with train.early_stopping: holdout" in report


def test_the_blend_is_fitted_on_out_of_fold_predictions_only(planted_leak, one_thread):
    """Replacing every run's holdout predictions changes the holdout scores and nothing else: no
    method fits on, or selects by, the holdout."""
    cfg, work = planted_leak
    first = blend.run_blend(cfg)
    first_files = {name: pd.read_parquet(work / "blend" / name) for name in ("oof.parquet", "test.parquet")}
    rng = np.random.default_rng(1)
    for run in ("honest", "leaky"):
        path = work / "runs" / run / "valid.parquet"
        frame = pd.read_parquet(path)
        common.write_parquet(path, frame.assign(pred=rng.random(len(frame)).astype(np.float32)))
    second = blend.run_blend(cfg)
    assert second["chosen"] == first["chosen"]
    for name in ("logit_mean", "logistic"):
        assert second["methods"][name]["oof_auc"] == first["methods"][name]["oof_auc"]
    assert second["methods"]["logistic"]["coefficients"] == first["methods"]["logistic"]["coefficients"]
    for name, frame in first_files.items():
        pd.testing.assert_frame_equal(pd.read_parquet(work / "blend" / name), frame)
    assert second["chosen_valid_auc"] != first["chosen_valid_auc"]


def test_a_blend_that_fails_at_its_submission_leaves_the_previous_blend_whole(pipeline, monkeypatch, one_thread):
    p = pipeline
    with restored(*outputs(p)):
        before = snapshot(p.blend_dir, p.subs)

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(p.subs / "x.csv"))
        monkeypatch.setattr(blend, "write_submission", disk_full)
        with pytest.raises(OSError):
            blend.run_blend(p.blend_cfg)
        assert snapshot(p.blend_dir, p.subs) == before
        assert not list(p.work.glob(".blend-*")), "no staging folder left"
