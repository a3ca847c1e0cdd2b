"""Config -> model: build_model and count_parameters. The only model file that imports common.

model_cfg = {name: qin | dcnv2 | din, <the model's keyword arguments>, tf4ctr: {enabled, ssem,
dfm, c, gamma, alpha}}. The keys a model takes are its builder's keyword arguments (QIN, DCNv2,
DIN, and dcnv2_tf4ctr / din_tf4ctr when tf4ctr.enabled), so the configs and the classes cannot
drift apart; a key only the other form takes (structure: plain DCNv2, simple_hidden: DIN in
TF4CTR) is accepted and unused. Absent keys take the builder's defaults.
"""
import inspect

import common
from dcnv2 import DCNv2, dcnv2_tf4ctr
from din import DIN, din_tf4ctr
from qin import QIN

PLAIN = {"qin": QIN, "dcnv2": DCNv2, "din": DIN}
WITH_TF4CTR = {"dcnv2": dcnv2_tf4ctr, "din": din_tf4ctr}
TF4CTR_DEFAULTS = {"enabled": False, "ssem": "ser", "dfm": "wsf", "c": 0.8, "gamma": 2.0, "alpha": 0.25}
RANGES = {"c": (0, 1), "gamma": (0, float("inf")), "alpha": (0, 1)}  # TF loss; dropouts: [0, 1]

CHOICES = {
    "table_mode": ("auto", "gather", "table"),
    "attention": ("relu", "softmax", "mean"),
    "interaction": ("qnn", "mlp"),
    "qnn_activation": ("prelu", "relu"),
    "pooling": ("mean", "asta"),
    "cross": ("full", "mix"),
    "structure": ("stacked", "parallel"),
    "attention_activation": ("dice", "relu", "prelu"),
    "mlp_activation": ("relu", "prelu", "dice"),
    "ssem": ("ser", "gm", "moe", "none"),
    "dfm": ("wsf", "cf", "vf", "moef", "sum"),
}


def _keywords(builder):
    return {k: p.default for k, p in inspect.signature(builder).parameters.items() if k != "tables"}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check(where, key, value, default):
    """Raise a one-line UserError unless value fits the type of default (and its choices, range)."""
    if key in CHOICES:
        ok, expected = value in CHOICES[key], "one of " + ", ".join(CHOICES[key])
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = _is_int(value) and value >= 1, "an integer >= 1"
    elif isinstance(default, float):
        lo, hi = (0, 1) if key.endswith("dropout") else RANGES.get(key, (-float("inf"), float("inf")))
        ok = (_is_int(value) or isinstance(value, float)) and lo <= value <= hi
        expected = f"a number in [{lo}, {hi}]"
    else:  # layer widths
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) and v >= 1 for v in value)
        expected = "a list of integers >= 1"
    if not ok:
        raise common.UserError(f"{where}.{key}: invalid value {value!r} (expected {expected})")


def build_model(model_cfg: dict, tables: dict):
    """The model named by model_cfg['name'] over the item tables (see docs/DESIGN.md)."""
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    if name not in PLAIN:
        raise common.UserError(f"model.name: unknown model {name!r} (known: {', '.join(PLAIN)})")
    tf = cfg.pop("tf4ctr", None) or {}
    if not isinstance(tf, dict):
        raise common.UserError("model.tf4ctr: expected a section of keys")
    for key, value in tf.items():
        if key not in TF4CTR_DEFAULTS:
            raise common.UserError(f"model.tf4ctr.{key}: unknown key (known: {', '.join(TF4CTR_DEFAULTS)})")
        _check("model.tf4ctr", key, value, TF4CTR_DEFAULTS[key])
    tf = {**TF4CTR_DEFAULTS, **tf}
    enabled = tf.pop("enabled")
    if enabled and name not in WITH_TF4CTR:
        raise common.UserError(f"model.tf4ctr.enabled: TF4CTR wraps {' and '.join(WITH_TF4CTR)}, not {name}")

    known = _keywords(PLAIN[name])
    if name in WITH_TF4CTR:
        known.update((k, v) for k, v in _keywords(WITH_TF4CTR[name]).items() if k not in tf)
    for key, value in cfg.items():
        if key not in known:
            raise common.UserError(f"model.{key}: unknown key for {name} (known: {', '.join(sorted(known))})")
        _check("model", key, value, known[key])

    builder = WITH_TF4CTR[name] if enabled else PLAIN[name]
    takes = _keywords(builder)
    kwargs = {k: v for k, v in cfg.items() if k in takes}
    try:
        return builder(tables, **kwargs, **(tf if enabled else {}))
    except ValueError as exc:  # the classes' own checks, which start with the key they reject
        raise common.UserError(f"model.{exc}") from None


def count_parameters(model) -> int:
    """Trainable parameters (the frozen item tables are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
