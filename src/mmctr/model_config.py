"""Config -> model: build_model and count_parameters. The only model file that imports common.

model_cfg = {name: qin | dcnv2 | din | transformer_dcn | simqin, <the model's keyword arguments>, tf4ctr: {enabled, ssem,
dfm, c, gamma, alpha}}. The keys a model takes, their types (Literal choices in the signatures,
otherwise the default's type) and their defaults are its builder's keyword arguments (QIN, DCNv2,
DIN, TransformerDCN, SimQIN, and dcnv2_tf4ctr / din_tf4ctr when tf4ctr.enabled), and the tf4ctr
keys are TF4CTR's, so the configs and the classes cannot drift apart. Both are checked by
common.typed_section. A key only the other form takes (structure: plain DCNv2; simple_hidden: DIN in
TF4CTR) is an error, as is any unknown key. Absent keys, and keys set to null, take the builder's
defaults.
"""
import dataclasses
import functools
import inspect
import typing

from mmctr import common
from mmctr.models.dcnv2 import DCNv2, dcnv2_tf4ctr
from mmctr.models.din import DIN, din_tf4ctr
from mmctr.models.qin import QIN
from mmctr.models.simqin import SimQIN
from mmctr.models.tf4ctr import TF4CTR
from mmctr.models.transformer_dcn import TransformerDCN

PLAIN = {"qin": QIN, "dcnv2": DCNv2, "din": DIN, "transformer_dcn": TransformerDCN, "simqin": SimQIN}
WITH_TF4CTR = {"dcnv2": dcnv2_tf4ctr, "din": din_tf4ctr}


def _split_bounds(annotation) -> tuple[typing.Any, dict]:
    """(the type, its bounds): a keyword argument annotated Annotated[float, {"range": (0, 1)}]
    (layers.Fraction, layers.NonNegative) carries its own; an integer is a size (>= 1)."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
        return base, {key: value for item in metadata if isinstance(item, dict) for key, value in item.items()}
    if annotation is int or typing.get_args(annotation)[:1] == (int,):
        return annotation, {"min": 1}
    return annotation, {}


def _keywords(builder, skip=()) -> list[tuple[str, typing.Any, typing.Any]]:
    """(name, annotation, default) of the builder's keyword arguments with a default: the
    annotation where the signature has one (Literal choices), else the default's type."""
    hints = typing.get_type_hints(builder.__init__ if inspect.isclass(builder) else builder, include_extras=True)
    out = []
    for key, param in inspect.signature(builder).parameters.items():
        if param.default is inspect.Parameter.empty or key in skip:
            continue
        annotation = hints.get(key)
        if annotation is None:
            default_type = type(param.default)
            annotation = tuple[int, ...] if default_type is tuple else default_type  # layer widths
        out.append((key, annotation, param.default))
    return out


def _keys(builder) -> list[str]:
    """The model: keys ``builder`` takes (the tf4ctr ones are in the tf4ctr: section)."""
    return [key for key, _, _ in _keywords(builder, skip=TF4CTR_KEYS)]


def _section_class(name: str, keywords, extra=()) -> type:
    fields = []
    for key, annotation, default in keywords:
        base, bounds = _split_bounds(annotation)
        fields.append((key, base, dataclasses.field(default=default, metadata=bounds)))
    return dataclasses.make_dataclass(name, [*extra, *fields])


# the tf4ctr: section: enabled plus TF4CTR's own keyword arguments (ssem, dfm, c, gamma, alpha)
TF4CTR_KEYS = [key for key, _, _ in _keywords(TF4CTR)]
TF4CTRConfig = _section_class("TF4CTRConfig", _keywords(TF4CTR), extra=[("enabled", bool, False)])


@functools.cache
def _model_class(builder) -> type:
    """The model: section for ``builder``: name, tf4ctr and the builder's keywords."""
    return _section_class(f"{builder.__name__}Config", _keywords(builder, skip=TF4CTR_KEYS), extra=[
        ("name", typing.Literal[tuple(PLAIN)]),
        ("tf4ctr", TF4CTRConfig, dataclasses.field(default_factory=TF4CTRConfig))])


def _typed(cls, raw, where: str):
    """common.typed_section, its problems worded as every model error: '<key>: <problem>'."""
    try:
        return common.typed_section(cls, raw, where)
    except common.ConfigError as exc:
        raise common.UserError(f"{exc.key}: {exc.detail}") from None


def build_model(model_cfg: dict, tables: dict):
    """The model named by model_cfg['name'] over the item tables (see docs/DESIGN.md)."""
    if not isinstance(model_cfg, dict):
        raise common.UserError(f"model: must be a mapping of keys, got {model_cfg!r}")
    cfg = {key: value for key, value in model_cfg.items() if value is not None}  # null: the default
    if isinstance(cfg.get("tf4ctr"), dict):  # in the tf4ctr: section too
        cfg["tf4ctr"] = {key: value for key, value in cfg["tf4ctr"].items() if value is not None}
    name = cfg.get("name")
    if name not in PLAIN:
        raise common.UserError(f"model.name: unknown model {name!r} (known: {', '.join(PLAIN)})")
    enabled = _typed(TF4CTRConfig, cfg.get("tf4ctr", {}), "model.tf4ctr").enabled
    if enabled and name not in WITH_TF4CTR:
        raise common.UserError(f"model.tf4ctr.enabled: TF4CTR wraps {' and '.join(WITH_TF4CTR)}, not {name}")

    builder = WITH_TF4CTR[name] if enabled else PLAIN[name]
    takes = _keys(builder)
    other = PLAIN[name] if enabled else WITH_TF4CTR.get(name)
    if other is not None:
        for key in cfg:
            if key not in takes and key in _keys(other):
                raise common.UserError(
                    f"model.{key}: only {name} with tf4ctr.enabled: {str(not enabled).lower()} takes this "
                    f"key, and model.tf4ctr.enabled is {str(enabled).lower()}: remove it (or set it to null)")
    section = _typed(_model_class(builder), cfg, "model")
    kwargs = {key: getattr(section, key) for key in takes}
    if enabled:
        kwargs.update((key, getattr(section.tf4ctr, key)) for key in TF4CTR_KEYS)
    try:
        return builder(tables, **kwargs)
    except ValueError as exc:  # the classes' own checks, which start with the key they reject
        raise common.UserError(f"model.{exc}") from None


def count_parameters(model) -> int:
    """Trainable parameters (the frozen item tables are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
