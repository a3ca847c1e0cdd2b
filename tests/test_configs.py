"""Every shipped config loads, follows the run-name convention and builds a working model; an
unknown key is named, with the key it was likely meant to be, for every default config."""
import re
from pathlib import Path

import pytest
import torch

from mmctr import common
from mmctr.models import fit
from mmctr.models import layers
from mmctr import model_config
from mmctr import processed_data
from mmctr import train
from mmctr.models.dcnv2 import DCNv2
from mmctr.models.din import DIN
from helpers import DCN, QIN, assert_user_error, make_batch, make_tables

CONFIGS = sorted(common.CONFIG_DIR.glob("*.yaml"))
MODEL_CONFIGS = [p for p in CONFIGS if "model" in common.load_config(p)]


def test_every_config_loads():
    assert {p.name for p in CONFIGS} >= {"data.yaml", "train.yaml", "blend.yaml", "qin.yaml"}
    for path in CONFIGS:
        assert "data" in common.load_config(path), path


CONFIG_FILE_CASES = {
    # a config file's text (after base: qin_small.yaml), the one-line error's fragments
    "a misspelt section": ("trian:\n  lr: 1.0e-3\n", ["unknown section 'trian'", "known: base, data"]),
    "a section that is not a mapping": ("data: 5\n", ["section 'data' must be a mapping of keys, got 5"]),
    "a key written twice": ("train:\n  lr: 1.0e-3\n  batch_size: 64\n  lr: 5.0e-3\n",
                            ["not valid YAML", "key 'lr' written twice on lines 6 and 8"]),
    "a key written twice in a flow mapping": ("train: {lr: 1.0e-3, lr: 5.0e-3}\n",
                                              ["key 'lr' written twice on line 5"]),
    "a base that is not a file name": ("", ["base must be the file name of another config, got 3"]),
    "a config file that is a folder": (None, ["a folder, not a config file"]),
}


@pytest.mark.parametrize("case", list(CONFIG_FILE_CASES))
def test_a_bad_config_file_is_one_line_naming_it(case, tmp_path):
    text, fragments = CONFIG_FILE_CASES[case]
    path = tmp_path / "bad.yaml"
    if text is None:
        path.mkdir()
    else:  # three comment lines first: the line numbers in the message are the file's
        base = "base: 3" if "base" in case else f"base: {common.CONFIG_DIR / 'qin_small.yaml'}"
        path.write_text(f"# a\n# b\n# c\n{base}\n{text}")
    assert_user_error(lambda: common.load_config(path), str(path), *fragments)


def test_a_merge_key_may_be_overridden_and_a_list_key_is_one_line(tmp_path):
    path = tmp_path / "anchors.yaml"  # YAML's merge key: keys written after it override the merged ones
    path.write_text(f"base: {common.CONFIG_DIR / 'qin_small.yaml'}\n"
                    "train: &fast\n  lr: 1.0e-3\n  batch_size: 64\nmodel:\n  <<: *fast\n  lr: 5.0e-3\n")
    assert common.load_config(path)["model"]["lr"] == 5.0e-3
    path.write_text(f"base: {common.CONFIG_DIR / 'qin_small.yaml'}\ntrain:\n  ? [1]\n  : 2\n")
    assert_user_error(lambda: common.load_config(path), "not valid YAML")
    assert_user_error(lambda: common.load_config(common.CONFIG_DIR / "qin_small.yaml", ["train.lr={[1]: 2}"]),
                      "--set train.lr: cannot parse value")


def test_a_set_value_is_yaml_but_a_path_is_the_path_as_typed(tmp_path):
    """--set values are YAML scalars and flow collections; a command line holds no comments nor
    block mappings, so a folder named with " #" or ": " is taken whole, not cut or made a mapping."""
    values = {"1e-3": 0.001, "true": True, "null": None, "": None, "[1, 2]": [1, 2], "{column: x}": {"column": "x"},
              "'2025'": "2025", "/tmp/d #1/work": "/tmp/d #1/work", "/tmp/k: v/raw": "/tmp/k: v/raw",
              "#hash": "#hash", "a#b": "a#b", "- a": "- a", "'it''s #1: x'": "it's #1: x"}
    assert {raw: common.override_value("data.work_dir", raw) for raw in values} == values
    cfg = common.load_config(common.CONFIG_DIR / "data.yaml", ["data.work_dir=/tmp/d #1/work"])
    assert cfg["data"]["work_dir"] == "/tmp/d #1/work"
    # a command the stages print gives each folder back as it is, whatever YAML would make of it
    from mmctr import processed_data
    for folder in ["2025", "null", "[old] raw", "it's", "{a: 1} b", "/tmp/d #1/work"]:
        assert common.override_value("data.raw_dir", processed_data.setting_text(folder)) == folder, folder


def test_a_config_not_in_utf8_is_one_line_naming_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(f"base: {common.CONFIG_DIR / 'qin_small.yaml'}\n# r\xe9glages\n".encode("latin-1"))
    assert_user_error(lambda: common.load_config(path), str(path), "line 2: not UTF-8 text (byte 0xe9)")


def test_an_empty_section_takes_the_base_values(tmp_path):
    path = tmp_path / "empty_train.yaml"
    path.write_text(f"base: {common.CONFIG_DIR / 'qin_small.yaml'}\ntrain:\n")
    assert common.load_config(path)["train"] == common.load_config(common.CONFIG_DIR / "qin_small.yaml")["train"]


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
    arrays, manifest = processed_data.load_processed(tiny_processed)
    data = train.load_to_device(arrays, torch.device("cpu"))
    model = model_config.build_model(cfg["model"], train.item_tables(arrays, manifest, torch.device("cpu"))).eval()
    rows = torch.arange(16)
    with torch.no_grad():
        logits = model(fit.gather(data["valid"], rows))
    assert logits.shape == (16,) and torch.isfinite(logits).all()



# ---------------------------------------------------------------------------------------------
# model sections: the builders' keywords, and nothing only the other form takes
# ---------------------------------------------------------------------------------------------

def build(config: str, *overrides: str):
    cfg = common.load_config(common.CONFIG_DIR / config, list(overrides))
    return model_config.build_model(cfg["model"], make_tables())


def test_tf4ctr_off_on_the_dcnv2_config_gives_plain_dcnv2_with_its_default_structure():
    model = build("dcnv2_tf.yaml", "model.tf4ctr.enabled=false", "model.emb_dim=8", "model.mlp_hidden=[16]")
    assert isinstance(model, DCNv2) and not model.stacked  # DCNv2's default: parallel
    assert not isinstance(build("dcnv2_tf_small.yaml"), DCNv2)


def test_a_key_only_the_other_form_takes_is_an_error():
    # DIN in TF4CTR only
    with pytest.raises(common.UserError, match=r"^model.simple_hidden: only din with tf4ctr.enabled: true "
                                               r"takes this key, and model.tf4ctr.enabled is false"):
        build("din_tf_small.yaml", "model.tf4ctr.enabled=false")
    # plain DCNv2 only
    with pytest.raises(common.UserError, match=r"^model.structure: only dcnv2 with tf4ctr.enabled: false"):
        model_config.build_model({**DCN, "structure": "parallel", "tf4ctr": {"enabled": True}}, make_tables())
    with pytest.raises(common.UserError, match=r"^model.structure: unknown key \(known: name, tf4ctr, emb_dim,"):
        model_config.build_model({**QIN, "structure": "parallel"}, make_tables())  # no form of QIN takes it


def test_a_bound_belongs_to_the_argument_that_declares_it():
    """The loader reads bounds from a model's annotations (layers.Fraction): an argument of
    another model that only shares a name (alpha, gamma, *dropout) is not limited by it."""
    class Toy(torch.nn.Module):
        def __init__(self, tables, alpha=2.0, mix_dropout=3.0, rate: layers.Fraction = 0.5, width=4):
            super().__init__()

    section = model_config._section_class("ToyConfig", model_config._keywords(Toy))
    config = common.typed_section(section, {"alpha": 5.0, "mix_dropout": 7.0, "rate": 1.0}, "model")
    assert (config.alpha, config.mix_dropout, config.rate) == (5.0, 7.0, 1.0)
    for key, value, problem in [("rate", 1.5, "must be in [0, 1]"), ("width", 0, "must be at least 1")]:
        with pytest.raises(common.ConfigError, match=re.escape(problem)):
            common.typed_section(section, {key: value}, "model")


def test_null_takes_the_builders_default():
    model_config.build_model({**DCN, "structure": None, "tf4ctr": {"enabled": True}}, make_tables())
    assert isinstance(build("din_tf_small.yaml", "model.tf4ctr.enabled=false", "model.simple_hidden=null"), DIN)
    # in the tf4ctr: section too: the model of a section without the key
    cfg = common.load_config(common.CONFIG_DIR / "dcnv2_tf_small.yaml", ["model.tf4ctr.c=null", "model.tf4ctr.ssem=null"])
    unset = {**cfg["model"], "tf4ctr": {k: v for k, v in cfg["model"]["tf4ctr"].items() if k not in ("c", "ssem")}}
    models = []
    for model_cfg in (cfg["model"], unset):
        torch.manual_seed(0)
        models.append(model_config.build_model(model_cfg, make_tables()))
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
    assert models[0].state_dict().keys() == models[1].state_dict().keys()


@pytest.mark.parametrize("override, message", [
    ("model.emb_dim=0", "model.emb_dim: must be at least 1, got 0"),
    ("model.emb_dim=true", "model.emb_dim: must be an integer, got True"),
    ("model.dropout=1.5", "model.dropout: must be in [0, 1], got 1.5"),
    ("model.pooling=max", "model.pooling: must be mean or asta, got 'max'"),
    ("model.mlp_hidden=[8,0]", "model.mlp_hidden: items must each be at least 1, got [8, 0]"),
    ("model.mlp_hidden=8", "model.mlp_hidden: must be a list of integers, got 8"),
    ("model.tf4ctr.gamma=-1", "model.tf4ctr.gamma: must be at least 0, got -1"),
    ("model.tf4ctr.dfm=avg", "model.tf4ctr.dfm: must be one of wsf, cf, vf, moef, sum, got 'avg'"),
    ("model.tf4ctr={enabled: 1}", "model.tf4ctr.enabled: must be true or false, got 1"),
    ("model.tf4ctr={focus: 1}", "model.tf4ctr.focus: unknown key (known: enabled, ssem, dfm, c, gamma, alpha)"),
    ("model.tf4ctr=3", "model.tf4ctr: must be a mapping of keys, got 3"),
])
def test_model_values_are_checked_by_their_builders_types(override, message):
    with pytest.raises(common.UserError) as error:
        build("dcnv2_tf_small.yaml", override)
    assert str(error.value) == message


def test_model_numbers_are_coerced():
    model = build("qin_small.yaml", "model.emb_dim=16.0", "model.dropout=0", "model.mlp_hidden=[8.0]")
    assert model(make_batch(b=4)).shape == (4,)


def test_the_tf4ctr_keys_are_tf4ctrs_keywords():
    assert model_config.TF4CTR_KEYS == ["ssem", "dfm", "c", "gamma", "alpha"]


@pytest.mark.parametrize("name, expected", [
    # docs/spec/transformer_dcn.md: the experiment config momo's run.sh and README run
    ("transformer_dcn", {"batch_size": 128, "lr": 5.0e-4, "emb_l2": 0.0, "patience": 5}),
    # docs/spec/tf4ctr.md and reczoo/WWW2025_MMCTR_Challenge's tuner config
    ("din", {"batch_size": 8192, "lr": 1.0e-3, "emb_l2": 1.0e-6, "patience": 3}),
    # docs/spec/qin.md
    ("qin", {"batch_size": 8192, "lr": 2.0e-3, "emb_l2": 2.0e-4, "patience": 8}),
])
def test_released_schedules(name, expected):
    train_cfg = common.load_config(common.CONFIG_DIR / f"{name}.yaml")["train"]
    assert {key: train_cfg[key] for key in expected} == expected


@pytest.mark.parametrize("config", ["data.yaml", "qin_small.yaml", "blend.yaml"])
def test_an_unknown_key_is_named_for_every_default_config(config):
    assert_user_error(lambda: common.load_config(common.CONFIG_DIR / config, ["data.nfolds=3"]),
                      "--set data.nfolds", "unknown config key 'nfolds'", "n_folds")
