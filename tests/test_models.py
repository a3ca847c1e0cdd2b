"""The models: shapes, masking, gradients, determinism, exact sizes, equal fast/literal forms, the TF
loss, config errors, and that a few hundred Adam steps lower the training loss.

Small random item tables throughout, except the training test (tiny synthetic preset).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from mmctr import common
from mmctr.models import fit
from mmctr import model_config
from mmctr import processed_data
from mmctr.models import layers
from mmctr.models.layers import (ASTA, DINAttention, ItemEncoder, RMSNorm, SENet, TargetAttention, masked_mean,
                                 masked_softmax)
from mmctr.models.simqin import SemanticCodes, SimilarityCounts
from mmctr.models.schema import ITEM_TABLES
from mmctr.models.tf4ctr import TF4CTR, tf_loss
from helpers import DCN, DIN, L, LEVELS, M, QIN, T, U, V, make_batch, make_label, make_tables

DIN_TF = {**DIN, "simple_hidden": [16]}  # simple_hidden: DIN in TF4CTR only


def tf(ssem="ser", dfm="wsf"):
    return dict(tf4ctr=dict(enabled=True, ssem=ssem, dfm=dfm))


CONFIGS = {
    "qin": QIN,
    "qin_plus": {**QIN, "use_user_id": True, "history_levels": True, "asta_bias": True},
    "qin_softmax_dropout": {**QIN, "attention": "softmax", "attention_dropout": 0.1},
    "qin_literal_relu": {**QIN, "asta_fast": False, "qnn_activation": "relu"},
    "qin_mean_mlp": {**QIN, "attention": "mean", "interaction": "mlp"},
    "dcnv2_stacked": {**DCN, "structure": "stacked"},
    "dcnv2_mix_asta": {**DCN, "cross": "mix", "pooling": "asta"},
    "dcnv2_tf_ser_wsf": {**DCN, **tf("ser", "wsf")},
    "dcnv2_tf_gm_cf": {**DCN, **tf("gm", "cf")},
    "dcnv2_tf_moe_vf": {**DCN, "cross": "mix", **tf("moe", "vf")},
    "dcnv2_tf_none_moef": {**DCN, **tf("none", "moef")},
    "din": DIN,
    "din_dice_softmax": {**DIN, "attention_activation": "dice", "attention_softmax": True,
                         "mlp_activation": "dice"},
    "din_tf_ser_wsf": {**DIN_TF, **tf("ser", "wsf")},
    "din_tf_gm_sum": {**DIN_TF, **tf("gm", "sum")},
    "din_tf_moe_vf": {**DIN_TF, **tf("moe", "vf")},
    "din_mhta": {**DIN, "target_attention_layers": 2},  # I = 28: 4 heads of 7
    "din_tf_mhta": {**DIN_TF, "target_attention_layers": 1, **tf("ser", "wsf")},  # simple embedder: I = 20
    "simqin": dict(name="simqin", emb_dim=8, mm_dim=M, qnn_layers=2, qnn_m=2, n_counts=4),
    "simqin_counts_only": dict(name="simqin", emb_dim=8, mm_dim=M, qnn_layers=2, qnn_m=2, n_counts=4,
                               use_user_id=False, mean_pool=False),
    "simqin_codes": dict(name="simqin", emb_dim=8, mm_dim=M, qnn_layers=2, qnn_m=2, n_counts=4,
                         semantic_codes=True, n_codes=6, code_levels=2),
    "simqin_mhta": dict(name="simqin", emb_dim=8, mm_dim=M, qnn_layers=2, qnn_m=2, n_counts=4,
                        target_attention_layers=2),
    "simqin_senet": dict(name="simqin", emb_dim=8, mm_dim=M, qnn_layers=2, qnn_m=2, n_counts=4,
                         target_attention_layers=1, senet=True, senet_activation="sigmoid"),
}


def build(cfg, seed=0, tables=None):
    torch.manual_seed(seed)
    return model_config.build_model(cfg, tables or make_tables())


# ---------------------------------------------------------------------------------------------
# every model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_loss(name):
    model = build(CONFIGS[name])
    for dtype in (torch.int32, torch.int64):
        batch = make_batch(dtype=dtype)
        logits = model(batch)
        assert logits.shape == (16,) and torch.isfinite(logits).all()
        loss, same = model.loss(batch, make_label())
        assert loss.shape == () and torch.isfinite(loss) and same.shape == (16,)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the logits stay float32: no AUC ties
        assert model(make_batch()).dtype == torch.float32


def perturb_padding(model):
    """Overwrite everything the padding item 0 and the padding tag 0 could contribute."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ItemEncoder):
                m.item_id.weight[0].normal_()
                m.tag.weight[0].normal_()
                m.item_emb[0].normal_()
                m.item_tags[0] = torch.arange(1, 6)
        for name, buffer in model.named_buffers():
            if name.endswith(("item_likes_level", "item_views_level")):
                buffer[0] = LEVELS - 1
            if name.endswith("counts.unit"):  # SimQIN's unit multimodal vectors
                buffer[0].normal_()


@pytest.mark.parametrize("table_mode", ["gather", "table"])
@pytest.mark.parametrize("name", CONFIGS)
def test_padding_does_not_change_the_output(name, table_mode):
    model = build({**CONFIGS[name], "table_mode": table_mode}).eval()
    batch = make_batch()
    with torch.no_grad():
        before = model(batch)
        perturb_padding(model)
        after = model(batch)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_embedding_table_has_a_zero_padding_row(name):
    """FuxiCTR builds every categorical feature with padding index 0: items, tags, levels, users."""
    tables = [m for m in build(CONFIGS[name]).modules() if isinstance(m, nn.Embedding)]
    assert len(tables) >= 4 + (name in ("qin_plus", "simqin"))
    for table in tables:
        assert table.padding_idx == 0 and not table.weight[0].any()


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter_and_never_the_frozen_tables(name):
    model = build(CONFIGS[name]).train()
    loss, _ = model.loss(make_batch(), make_label())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
        assert torch.isfinite(p.grad).all(), pname
    frozen = [(n, b) for n, b in model.named_buffers() if n.split(".")[-1] in ITEM_TABLES]
    assert {n.split(".")[-1] for n, _ in frozen} >= {"item_tags", "item_emb"}
    for _, buffer in frozen:
        assert not buffer.requires_grad and buffer.grad is None
    assert not any(n.split(".")[-1] in ITEM_TABLES for n in model.state_dict())  # rebuilt, not saved


@pytest.mark.parametrize("name", CONFIGS)
def test_deterministic_for_a_fixed_seed(name):
    a, b = build(CONFIGS[name], seed=3), build(CONFIGS[name], seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    batch = make_batch()
    torch.manual_seed(4)
    train_a = a.train()(batch)
    torch.manual_seed(4)
    train_b = b.train()(batch)
    assert torch.equal(train_a, train_b)
    assert torch.equal(a.eval()(batch), b.eval()(batch))


# ---------------------------------------------------------------------------------------------
# exact sizes
# ---------------------------------------------------------------------------------------------

REAL = dict(n_items=91_718, n_tags=11_740)  # the real vocabularies (levels: 11)


@pytest.mark.parametrize("m, expected", [(4, 31_244_293), (3, 27_045_893)])
def test_qin_has_the_released_parameter_count(m, expected):
    model = build(dict(name="qin", emb_dim=128, qnn_layers=4, qnn_m=m), tables=make_tables(**REAL, n_users=10))
    assert model_config.count_parameters(model) == expected


def released(config_name):
    return common.load_config(common.CONFIG_DIR / config_name)["model"]


def test_shipped_official_din_and_qin_plus_have_the_released_parameter_counts():
    """DIN as the organisers released it (counted on their class) and QIN's stronger variant (the
    authors' log), both from the shipped configs; the 1M-row user table is counted on the meta device."""
    with torch.device("meta"):
        tables = make_tables(**REAL, n_users=1_000_001)
        din = model_config.build_model(released("din.yaml"), tables)
        qin_plus = model_config.build_model(released("qin_plus.yaml"), tables)
    assert model_config.count_parameters(din) == 8_611_842
    assert model_config.count_parameters(qin_plus) == 177_801_093
    assert qin_plus.user.weight.numel() == 128_000_128


@pytest.mark.parametrize("name", ["qin_plus", "din_tf_gm_sum"])
def test_embedding_l2_covers_exactly_the_embedding_module(name):
    """FuxiCTR's embedding_regularizer: every table and the multimodal map decay, nothing else."""
    model = build(CONFIGS[name])
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(("item_id.weight", "tag.weight", "mm.weight", "likes.weight", "views.weight",
                               "user.weight"))}
    assert any(n.endswith("mm.weight") for n in expected)
    # Adam decays the group after the clip, or the step adds the penalty's gradient before it
    for in_loss, adam_decay in ((False, 1e-3), (True, 0.0)):
        settings = fit.FitSettings(emb_l2=1e-3, emb_l2_in_loss=in_loss)
        decayed, other = fit.make_optimizer(model, settings).param_groups
        assert {names[id(p)] for p in decayed["params"]} == expected
        assert decayed["embedding_l2"] and not other.get("embedding_l2")
        assert decayed["weight_decay"] == adam_decay and other["weight_decay"] == 0.0


def test_small_parameter_counts_by_hand():
    E = 8
    I = 2 * E + M  # 28: id, tags, multimodal
    D = 2 * E + 2 * I  # 72
    # item, tag, multimodal map (M wide whatever the embedding width), levels
    embed = lambda e: V * e + T * e + 128 * M + 2 * LEVELS * e
    mlp = (D * 32 + 32 + 2 * 32) + (32 * 16 + 16 + 2 * 16)  # Linear + BatchNorm per layer

    din_attention = (4 * I * 16 + 16) + (16 * 8 + 8) + (8 + 1)
    assert model_config.count_parameters(build(DIN)) == embed(E) + din_attention + mlp + 17

    cross = 2 * (D * D + D)
    assert model_config.count_parameters(build(DCN)) == embed(E) + cross + mlp + (D + 16 + 1)
    mix = 2 * (2 * (D * 4 + 4 * 4 + 4 * D) + D) + 2 * D  # per layer: 2 experts' V, C, U; bias; one gate
    assert model_config.count_parameters(build({**DCN, "cross": "mix"})) == embed(E) + mix + mlp + (D + 16 + 1)

    # SER: simple encoder (cross network) on the half-width embedder: x_0 = 2(E/2) + 2(E + M) = 48 wide
    d_s = 2 * 4 + 2 * (2 * 4 + M)
    simple = embed(E // 2) + 2 * (d_s * d_s + d_s) + (d_s + 1)
    complex_ = embed(E) + mlp + (16 + 1)
    assert model_config.count_parameters(build({**DCN, **tf()})) == simple + complex_ + 2

    # GM: one embedder and a gate MLP [D/4] (Linear + BatchNorm) -> 1; MoE: two expert MLPs [D/2, D]
    # and two gate MLPs [D/4] -> 2, all with BatchNorm like the model's MLP
    cross_on = lambda d: 2 * (d * d + d) + (d + 1)
    gate = (D * (D // 4) + D // 4 + 2 * (D // 4)) + (D // 4 + 1)
    assert model_config.count_parameters(build({**DCN, **tf("gm", "wsf")})) == (
        embed(E) + gate + cross_on(D) + mlp + (16 + 1) + 2)
    expert = (D * (D // 2) + D // 2 + 2 * (D // 2)) + (D // 2 * D + D + 2 * D)
    moe_gate = (D * (D // 4) + D // 4 + 2 * (D // 4)) + (D // 4 * 2 + 2)
    assert model_config.count_parameters(build({**DCN, **tf("moe", "wsf")})) == (
        embed(E) + 2 * expert + 2 * moe_gate + cross_on(D) + mlp + (16 + 1) + 2)


def test_simqin_is_qin_plus_its_parts_in_parameters():
    """SimQIN with every part off is QIN's parameters exactly; each part adds what it says: the
    counts 2K (a threshold and a decay each), the user table U x E, and the QNN's wider input (and
    the output layer's, the QNN keeping its input width)."""
    E, I, K = 8, 2 * 8 + M, 4
    count = model_config.count_parameters
    base = CONFIGS["simqin"]
    none = build({**base, "similarity": False, "mean_pool": False, "use_user_id": False})
    assert count(none) == count(build(QIN))
    qnn = lambda d: count(layers.QNN(d, 2, 2))  # noqa: E731
    D = 2 * E + 2 * I
    assert count(build(base)) == count(build(QIN)) - qnn(D) + qnn(D + E + I + K) + (E + I + K) + U * E + 2 * K
    assert count(build(CONFIGS["simqin_counts_only"])) == count(build(QIN)) - qnn(D) + qnn(D + K) + K + 2 * K


def test_simqin_user_min_rows_gives_rows_only_to_users_with_that_many_train_rows():
    """user_min_rows = 3: the kept users (at least 3 train rows; never user 0) get rows 1..n in id
    order, every other user the zero padding row, so two rare users score alike; 0 (off) is QIN's
    table of every user. Without user_rows in the tables, a one-line error."""
    tables = make_tables()
    rows = torch.zeros(tables["n_users"], dtype=torch.int64)
    rows[[0, 3, 5, 8]] = torch.tensor([9, 3, 7, 1])  # user 0 (padding) never gets a row; 8 has too few
    cfg = {**CONFIGS["simqin"], "user_min_rows": 3}
    model = build(cfg, tables={**tables, "user_rows": rows}).eval()
    assert model.user.weight.shape == (3, 8)  # padding + users 3 and 5
    assert model.user_row.tolist() == [0, 0, 0, 1, 0, 2] + [0] * (tables["n_users"] - 6)
    count = model_config.count_parameters
    assert count(model) == count(build(CONFIGS["simqin"])) - (tables["n_users"] - 3) * 8
    with torch.no_grad():
        model.user.weight[1:].normal_()  # the kept users' rows away from their tiny start
    batch = make_batch(b=4)
    batch["user_id"] = torch.tensor([8, 12, 3, 5], dtype=torch.int32)
    out = model(batch)
    rare = {**batch, "user_id": torch.tensor([12, 8, 3, 5], dtype=torch.int32)}
    torch.testing.assert_close(model(rare), out, rtol=0, atol=0)  # rare users: the same zero row
    kept = {**batch, "user_id": torch.tensor([8, 12, 5, 3], dtype=torch.int32)}
    assert not torch.equal(model(kept)[2:], out[2:])
    off = build(CONFIGS["simqin"], tables={**tables, "user_rows": rows})
    assert off.user.weight.shape[0] == tables["n_users"] and off.user_row is None
    with pytest.raises(common.UserError, match=r"^model.user_min_rows: the tables carry no user_rows"):
        build(cfg, tables=tables)


def mhta_parameters(dim, n_layers):
    """Per layer: W_q, W_v, W_o with bias, W_k without (3 (I^2 + I) + I^2), the FFN 2 (I^2 + I),
    the two RMSNorm gains 2 I: 6 I^2 + 7 I."""
    return n_layers * (6 * dim * dim + 7 * dim)


def test_target_attention_parameters_by_hand_and_in_din_and_simqin():
    count, E, I = model_config.count_parameters, 8, 2 * 8 + M
    for dim, n_layers in ((28, 2), (12, 1), (16, 3)):
        assert count(TargetAttention(dim, n_layers)) == mhta_parameters(dim, n_layers)
    # DIN: the MHTA and I more inputs to the MLP's first Linear (32 wide)
    assert count(build(CONFIGS["din_mhta"])) == count(build(DIN)) + mhta_parameters(I, 2) + I * 32
    # SimQIN: the MHTA, and the QNN and output layer I wider
    qnn = lambda d: count(layers.QNN(d, 2, 2))  # noqa: E731
    D = 2 * E + 3 * I + E + 4  # levels, x_t, ASTA, mean, user, counts
    assert count(build(CONFIGS["simqin_mhta"])) == (count(build(CONFIGS["simqin"])) + mhta_parameters(I, 2)
                                                    - qnn(D) + qnn(D + I) + I)


def test_target_attention_off_builds_nothing():
    """Off (the default), a model holds no attention module and no key of one: switching it on adds
    the attention's weights and changes none of the others (a model saved without it still loads)."""
    for name in ("din", "simqin"):
        off = build({**CONFIGS[name], "target_attention_layers": 0})
        on = build({**CONFIGS[name], "target_attention_layers": 2})
        assert not any(isinstance(m, TargetAttention) for m in off.modules())
        attention = [prefix for prefix, m in on.named_modules() if isinstance(m, TargetAttention)]
        added = on.state_dict().keys() - off.state_dict().keys()
        assert added and all(any(k.startswith(prefix + ".") for prefix in attention) for k in added)
        assert off.state_dict().keys() <= on.state_dict().keys()


def mhta_inputs(b=5, length=7, dim=12, dtype=torch.double):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(b, dim, generator=g, dtype=dtype)
    x_b = torch.randn(b, length, dim, generator=g, dtype=dtype)
    mask = torch.rand(b, length, generator=g) > 0.4
    mask[0], mask[1] = False, True  # an all-padding row and a full one
    return x_t, x_b, mask


def test_target_attention_shape_and_padding():
    torch.manual_seed(0)
    mhta = TargetAttention(12, n_layers=2, n_heads=4).double().eval()
    x_t, x_b, mask = mhta_inputs()
    out = mhta(x_t, x_b, mask)
    assert out.shape == (5, 12)
    # whatever sits at the padded positions (the all-padding row's whole history too), the same output
    other = torch.where(mask.unsqueeze(-1), x_b, 100 * torch.randn_like(x_b))
    torch.testing.assert_close(mhta(x_t, other, mask), out, rtol=0, atol=1e-12)


def test_target_attention_of_an_all_padding_row_is_finite_in_forward_and_backward():
    torch.manual_seed(0)
    mhta = TargetAttention(12, n_layers=2, n_heads=4).train()
    x_t, x_b, mask = mhta_inputs(dtype=torch.float32)
    mask[:] = False  # no history in the whole batch
    x_t.requires_grad_(), x_b.requires_grad_()
    out = mhta(x_t, x_b, mask)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for name, p in [*mhta.named_parameters(), ("x_t", x_t), ("x_b", x_b)]:
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert not x_b.grad.any()  # nothing reads a padded position
    # under bfloat16 autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(mhta(x_t.bfloat16(), x_b.bfloat16(), mask)).all()


@pytest.mark.parametrize("train", [False, True])
def test_fast_target_attention_equals_its_literal_form(train):
    """The fast form (no projection of the history items) and the literal one, dropout masks and
    all: the same function and gradients."""
    torch.manual_seed(0)
    fast = TargetAttention(12, n_layers=2, n_heads=4).double().train(train)
    literal = TargetAttention(12, n_layers=2, n_heads=4, fast=False).double().train(train)
    literal.load_state_dict(fast.state_dict())
    with torch.no_grad():  # biases and gains away from their zeros and ones
        for p in fast.parameters():
            p.add_(0.3 * torch.randn_like(p))
    literal.load_state_dict(fast.state_dict())
    x_t, x_b, mask = mhta_inputs()
    out = []
    for m in (fast, literal):
        torch.manual_seed(1)
        out.append(m(x_t, x_b, mask))
        (out[-1] ** 2).sum().backward()
    torch.testing.assert_close(out[0], out[1])
    for (n, g_fast), g_literal in zip(grads(fast).items(), grads(literal).values()):
        torch.testing.assert_close(g_fast, g_literal, msg=n)


def test_target_attention_heads_must_divide_the_item_width():
    with pytest.raises(ValueError, match=r"^target_attention_heads: 5 heads do not divide the item width 12"):
        TargetAttention(12, n_heads=5)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_senet_formula_on_fields_of_different_widths(activation):
    """z_f = mean of field f, A = act(W_2 ReLU(W_1 z)), field f scaled by A_f: by hand."""
    torch.manual_seed(0)
    se = SENet(5, reduction_ratio=2, activation=activation).double()
    fields = [torch.randn(4, d, dtype=torch.double) for d in (3, 1, 8, 8, 2)]
    W_1, W_2 = se.excitation[0].weight, se.excitation[2].weight
    assert W_1.shape == (2, 5) and W_2.shape == (5, 2)  # max(1, 5 // 2) wide, no biases
    z = torch.stack([f.mean(-1) for f in fields], -1)
    pre = torch.relu(z @ W_1.T) @ W_2.T
    A = torch.relu(pre) if activation == "relu" else torch.sigmoid(pre)
    for i, (out, f) in enumerate(zip(se(fields), fields)):
        torch.testing.assert_close(out, f * A[:, i:i + 1], rtol=0, atol=1e-15)
    assert model_config.count_parameters(SENet(7, 3)) == 2 * 7 * 2
    assert model_config.count_parameters(SENet(2, 3)) == 2 * 2 * 1  # at least one unit


def test_senet_in_simqin_gates_every_field_and_is_off_by_default():
    """On: 2 F max(1, F // 3) parameters more (F: likes, views, x_t, o, m, counts, user = 7) and
    gradients reach them; off: no module, the state dict of a model built before the option."""
    count = model_config.count_parameters
    base = build(CONFIGS["simqin"])
    on = build({**CONFIGS["simqin"], "senet": True})
    assert count(on) == count(base) + 2 * 7 * 2
    assert not any(isinstance(m, SENet) for m in base.modules())
    assert {k for k in on.state_dict() if "senet" not in k} == set(base.state_dict())
    batch = make_batch()
    on.train()
    on(batch).sum().backward()
    for name, p in on.senet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rms_norm_formula():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 4, 6)
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_semantic_codes_are_residual_kmeans_codes_of_the_multimodal_vectors():
    tables = make_tables()
    codes = SemanticCodes(tables["item_emb"], 8, n_codes=6, levels=2).codes
    assert codes.shape == (V, 2) and not codes[0].any() and codes[1:].min() >= 1 and codes.max() <= 6
    assert torch.equal(codes, SemanticCodes(tables["item_emb"], 8, n_codes=6, levels=2).codes)  # deterministic
    # level 1 is the nearest of its centroids: each unit vector is closer to its own cluster's mean
    unit = F.normalize(tables["item_emb"][1:], dim=1)
    first = codes[1:, 0].contiguous()
    means = torch.stack([unit[first == c].mean(0) for c in first.unique()])
    assert (torch.cdist(unit, means).argmin(1) == torch.searchsorted(first.unique(), first)).float().mean() > 0.9
    # the model: codes add (K + 1) E per level, and E to every item (ASTA, QNN and output widen)
    count, E, I = model_config.count_parameters, 8, 2 * 8 + M
    qnn = lambda d: count(layers.QNN(d, 2, 2))  # noqa: E731
    asta = lambda d: count(layers.ASTA(d))  # noqa: E731
    base = build(CONFIGS["simqin"])
    D = 2 * E + 3 * I + E + 4  # levels, x_t, ASTA, mean, user, counts
    assert count(build(CONFIGS["simqin_codes"])) == (count(base) + 2 * 7 * E + asta(I + E) - asta(I)
                                                     + qnn(D + 3 * E) - qnn(D) + 3 * E)


def test_similarity_counts_equal_their_literal_sums():
    """c_k = log1p(sum_j exp(-(L-1-j) / rho_k) ReLU(cos(e_t, e_j) - tau_k) / 0.05) over real history
    items, with the cosines of the frozen multimodal vectors, written out slot by slot; a threshold
    below 0 must not count the padding slots (cosine 0)."""
    tables = make_tables()
    torch.manual_seed(0)
    counts = SimilarityCounts(tables["item_emb"], n_counts=3).double()
    with torch.no_grad():
        counts.tau.copy_(torch.tensor([0.1, 0.0, -0.2]))
        counts.log_rho.copy_(torch.tensor([2.0, 4.0, 3.0]))
    batch = make_batch()
    got = counts(batch["item_id"], batch["item_seq"])
    # the model holds the unit vectors normalised in float32: the same ones here
    unit = F.normalize(tables["item_emb"].float(), dim=1).double()
    for b in range(len(batch["item_id"])):
        target = unit[batch["item_id"][b]]
        for k in range(3):
            mass = 0.0
            for j, item in enumerate(batch["item_seq"][b].tolist()):
                if item == 0:
                    continue
                cos = torch.dot(unit[item], target)
                weight = math.exp(-(L - 1 - j) / math.exp(counts.log_rho[k].item()))
                mass += weight * max(0.0, cos.item() - counts.tau[k].item())
            assert got[b, k].item() == pytest.approx(math.log1p(mass / 0.05), rel=1e-12, abs=1e-14)


# ---------------------------------------------------------------------------------------------
# equal forms of the same function
# ---------------------------------------------------------------------------------------------

def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_fast_asta_equals_literal_asta(activation):
    torch.manual_seed(0)
    fast = ASTA(12, activation=activation).double()
    literal = ASTA(12, activation=activation, fast=False).double()
    literal.load_state_dict(fast.state_dict())
    x_t = torch.randn(5, 12, dtype=torch.double)
    x_b = torch.randn(5, 7, 12, dtype=torch.double)
    mask = torch.rand(5, 7) > 0.3
    mask[0] = False
    out = [m(x_t, x_b, mask) for m in (fast, literal)]
    torch.testing.assert_close(out[0], out[1])
    for o in out:
        (o ** 2).sum().backward()
    for (n, g_fast), g_literal in zip(grads(fast).items(), grads(literal).values()):
        torch.testing.assert_close(g_fast, g_literal, msg=n)


def test_table_mode_equals_gather_mode():
    tables = make_tables()
    torch.manual_seed(0)
    gather = ItemEncoder(tables, 8, "gather").double()  # double: compare functions, not rounding
    table = ItemEncoder(tables, 8, "table").double()
    table.load_state_dict(gather.state_dict())
    for dtype in (torch.int32, torch.int64):
        batch = make_batch(dtype=dtype)
        out = [enc(batch["item_id"], batch["item_seq"]) for enc in (gather, table)]
        for a, b in zip(*out):
            torch.testing.assert_close(a, b)
        for enc, (x_t, x_b) in zip((gather, table), out):
            enc.zero_grad()
            ((x_t * torch.arange(24)).sum() + x_b.square().sum()).backward()
        for (n, g_gather), g_table in zip(grads(gather).items(), grads(table).values()):
            torch.testing.assert_close(g_gather, g_table, msg=n)


def test_items_come_out_in_bfloat16_under_autocast_once_cast_and_close_to_float32():
    """Under bfloat16 autocast the item table (or the gathered items) is cast once, before the
    gather: both modes give bfloat16 items equal to each other and to the float32 items rounded."""
    tables = make_tables()
    torch.manual_seed(0)
    encoders = {mode: ItemEncoder(tables, 8, mode) for mode in ("gather", "table")}
    encoders["table"].load_state_dict(encoders["gather"].state_dict())
    with torch.no_grad():  # weights of the size training reaches, not N(0, 1e-4)
        for p in encoders["gather"].parameters():
            p.normal_()
    encoders["table"].load_state_dict(encoders["gather"].state_dict())
    batch = make_batch()
    exact = encoders["gather"](batch["item_id"], batch["item_seq"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = {mode: enc(batch["item_id"], batch["item_seq"]) for mode, enc in encoders.items()}
    for mode, (x_t, x_b) in cast.items():
        assert x_t.dtype == x_b.dtype == torch.bfloat16, mode
        for low, high in zip((x_t, x_b), exact):  # bfloat16 matmul rounding, relative to the scale
            assert (low.float() - high).abs().max() <= 2e-2 * high.abs().max(), mode
    for a, b in zip(cast["gather"], cast["table"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_item_encoder_layout():
    tables = make_tables()
    enc = ItemEncoder(tables, 8)
    ids = torch.tensor([1, 2], dtype=torch.int32)
    x_t, _ = enc(ids, ids.view(2, 1))
    assert torch.equal(x_t[0, 8:16], torch.zeros(8))  # item 1 has no tags: zero tag mean
    tags = tables["item_tags"][2].long()
    torch.testing.assert_close(x_t[1, 8:16], enc.tag.weight[tags[tags > 0]].mean(0))
    torch.testing.assert_close(x_t[1, :8], enc.item_id.weight[2])
    torch.testing.assert_close(x_t[1, 16:], enc.mm(tables["item_emb"][2]))
    half = ItemEncoder({**tables, "item_emb": tables["item_emb"].half()}, 8)
    half.load_state_dict(enc.state_dict())
    assert half(ids, ids.view(2, 1))[0].dtype == torch.float32


@pytest.mark.parametrize("softmax", [False, True])
def test_din_attention_equals_its_literal_form(softmax):
    torch.manual_seed(0)
    unit = DINAttention(6, hidden=(8, 4), softmax=softmax).double()
    x_t, x_b = torch.randn(3, 6, dtype=torch.double), torch.randn(3, 5, 6, dtype=torch.double)
    mask = torch.rand(3, 5) > 0.3
    q = x_t.unsqueeze(1).expand_as(x_b)
    s = unit.score(unit.mlp(unit.act(unit.input(torch.cat([q, x_b, q - x_b, q * x_b], -1))))).squeeze(-1)
    a = masked_softmax(s, mask) if softmax else s * mask
    torch.testing.assert_close(unit(x_t, x_b, mask), (a.unsqueeze(-1) * x_b).sum(1))


@pytest.mark.parametrize("name", ["qin", "qin_plus", "dcnv2_tf_ser_wsf", "din_tf_moe_vf"])
def test_model_in_table_mode_equals_gather_mode(name):
    gather = build({**CONFIGS[name], "table_mode": "gather"}).eval()
    table = build({**CONFIGS[name], "table_mode": "table"}).eval()
    table.load_state_dict(gather.state_dict())
    batch = make_batch()
    torch.testing.assert_close(gather(batch), table(batch))


def test_masked_mean():  # the cross networks' formulas: tests/test_formulas.py
    x = torch.arange(12.0).view(1, 3, 4).repeat(2, 1, 1)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.stack([(x[0, 0] + x[0, 2]) / 2, torch.zeros(4)]))


# ---------------------------------------------------------------------------------------------
# the TF loss
# ---------------------------------------------------------------------------------------------

def test_tf_loss_matches_its_formula_by_hand():
    ln3 = math.log(3)
    # p_s = (0.75, 0.5), p_c = (0.5, 0.75), p = (0.5, 0.5); labels (1, 0)
    y_s, y_c, y = torch.tensor([ln3, 0.0]), torch.tensor([0.0, ln3]), torch.zeros(2)
    label = torch.tensor([1.0, 0.0])
    easy = (-math.log(0.75) * (0.8 + 0.75) ** 2 + math.log(2) * (0.8 + 0.5) ** 2) / 2
    hard = (math.log(2) * (1.2 - 0.5) ** 2 + -math.log(0.25) * (1.2 - 0.25) ** 2) / 2
    expected = math.log(2) + 0.25 * easy + 0.75 * hard
    loss = tf_loss(y, y_s, y_c, label, c=0.8, gamma=2.0, alpha=0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # gamma = 0 and alpha = 1: plain BCE of y plus plain BCE of y_s
    plain = F.binary_cross_entropy_with_logits(y, label) + F.binary_cross_entropy_with_logits(y_s, label)
    assert tf_loss(y, y_s, y_c, label, gamma=0.0, alpha=1.0).item() == pytest.approx(plain.item(), rel=1e-6)


def test_tf4ctr_loss_uses_the_tf_loss_of_its_twin_logits():
    """From the logits (test_model_loss_takes_the_loss_form has every TF4CTR config's fuxictr form)."""
    model = build({**DCN, **tf("ser", "vf")}).eval()
    batch, label = make_batch(), make_label()
    y, y_s, y_c = model.twin_logits(batch)
    loss, logits = model.loss(batch, label, "logits")
    torch.testing.assert_close(logits, y)
    torch.testing.assert_close(loss, tf_loss(y, y_s, y_c, label, 0.8, 2.0, 0.25, "logits"))


def literal_bce(p, t):
    """torch's binary_cross_entropy written out: -(t log p + (1 - t) log(1 - p)), each log clamped at -100."""
    return -(t * torch.log(p).clamp(min=-100) + (1 - t) * torch.log(1 - p).clamp(min=-100))


def test_bce_forms_agree_except_where_float32_probabilities_saturate():
    # rows 0-3 ordinary; row 4 a negative with logit 20 (float32 sigmoid is exactly 1.0); row 5 a
    # positive with logit -120 (sigmoid underflows to exactly 0.0)
    z = torch.tensor([0.3, -1.2, 2.5, -0.4, 20.0, -120.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    losses = {}
    for form in ("logits", "fuxictr"):
        z.grad = None
        losses[form] = layers.bce(z, t, form, reduction="none")
        losses[form].sum().backward()
        losses[form] = (losses[form].detach(), z.grad.clone())
    (by_logits, g_logits), (by_probs, g_probs) = losses["logits"], losses["fuxictr"]
    p = torch.sigmoid(z.detach())
    # the ordinary rows: the same loss, and the gradient p - t in both forms
    torch.testing.assert_close(by_probs[:4], by_logits[:4])
    torch.testing.assert_close(by_logits[:4], literal_bce(p[:4].double(), t[:4].double()).float())
    torch.testing.assert_close(g_logits[:4], p[:4] - t[:4])
    torch.testing.assert_close(g_probs[:4], p[:4] - t[:4])
    # the saturated rows: FuxiCTR's form counts the clamped log (100) and gives no gradient at all;
    # the logits form counts the true loss (about 20 and 120) and the gradient p - t = +1, -1
    assert p[4].item() == 1.0 and p[5].item() == 0.0
    assert by_probs[4:].tolist() == [100.0, 100.0] and g_probs[4:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(by_logits[4:], torch.tensor([20.0, 120.0]))
    assert g_logits[4:].tolist() == [1.0, -1.0]
    # the mean, which a model's loss takes
    torch.testing.assert_close(layers.bce(z, t, "fuxictr"), by_probs.mean())
    with pytest.raises(ValueError, match="loss"):
        layers.bce(z, t, "focal")


def test_bce_in_fuxictrs_form_turns_a_nan_logit_into_a_nan_loss_not_an_error():
    # torch's binary_cross_entropy raises on a NaN probability (a device-side assert on CUDA); fit
    # must see the NaN and report the divergence itself
    z, t = torch.tensor([0.3, float("nan"), -1.0]), torch.tensor([1.0, 0.0, 0.0])
    rows = layers.bce(z, t, "fuxictr", reduction="none")
    assert rows[1].isnan() and rows[[0, 2]].isfinite().all()
    torch.testing.assert_close(rows[[0, 2]], layers.bce(z[[0, 2]], t[[0, 2]], "fuxictr", reduction="none"))
    assert layers.bce(z, t, "fuxictr").isnan()


def test_bce_in_fuxictrs_form_runs_in_float32_under_autocast():
    z, t = torch.randn(8, dtype=torch.bfloat16), (torch.rand(8) < 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layers.bce(z, t, "fuxictr")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, literal_bce(torch.sigmoid(z.float()), t).mean())


def test_tf_loss_in_fuxictrs_form_is_tf4ctrv2s_probability_formula():
    """TF4CTRv2.py: every BCE on sigmoid probabilities, p_t from the probabilities."""
    y = torch.tensor([0.4, -20.0, 1.0, 25.0])
    y_s = torch.tensor([18.0, -0.3, 0.2, 0.7])
    y_c = torch.tensor([-0.6, 0.9, -30.0, 17.0])
    t = torch.tensor([0.0, 1.0, 1.0, 0.0])
    c, gamma, alpha = 0.9, 2.0, 0.35
    p, p_s, p_c = torch.sigmoid(y), torch.sigmoid(y_s), torch.sigmoid(y_c)
    p_t_s = t * p_s + (1 - t) * (1 - p_s)
    p_t_c = t * p_c + (1 - t) * (1 - p_c)
    easy = (literal_bce(p_s, t) * (c + p_t_s) ** gamma).mean()
    hard = (literal_bce(p_c, t) * ((2 - c) - p_t_c) ** gamma).mean()
    expected = literal_bce(p, t).mean() + alpha * easy + (1 - alpha) * hard
    torch.testing.assert_close(tf_loss(y, y_s, y_c, t, c, gamma, alpha, "fuxictr"), expected)
    # rows 0 (y_s), 3 (y, y_c) saturate: the logits form differs there
    assert abs(tf_loss(y, y_s, y_c, t, c, gamma, alpha).item() - expected.item()) > 1.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_loss_takes_the_loss_form(name):
    model = build(CONFIGS[name]).eval()
    batch, label = make_batch(), make_label()
    loss, logits = model.loss(batch, label, "fuxictr")
    if isinstance(model, TF4CTR):
        y, y_s, y_c = model.twin_logits(batch)
        expected = tf_loss(y, y_s, y_c, label, model.c, model.gamma, model.alpha, "fuxictr")
    else:
        expected = layers.bce(logits, label, "fuxictr")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.loss(batch, label, "fuxictr")[0],
                               fit.LossOf(model, "fuxictr")(batch, label)[0])


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, key", [
    (dict(name="deepfm"), "model.name"),
    ({**QIN, "qnn_lyers": 3}, "model.qnn_lyers"),
    ({**QIN, "attention": "sparse"}, "model.attention"),
    ({**QIN, "batch_norm": "yes"}, "model.batch_norm"),
    ({**QIN, "mlp_hidden": [32, "x"]}, "model.mlp_hidden"),
    ({**QIN, **tf()}, "model.tf4ctr.enabled"),
    ({**DIN, "attention_hidden": []}, "model.attention_hidden"),
    ({**DIN, "target_attention_layers": 1, "target_attention_heads": 5}, "model.target_attention_heads"),
    ({**DIN, "target_attention_layers": -1}, "model.target_attention_layers"),
    ({**CONFIGS["simqin"], "senet": True, "senet_activation": "tanh"}, "model.senet_activation"),
    ({**CONFIGS["simqin"], "senet": True, "senet_reduction": 0}, "model.senet_reduction"),
    ({**DCN, "tf4ctr": {"enabled": True, "c": 1.5}}, "model.tf4ctr.c"),
])
def test_bad_model_config_is_a_one_line_user_error(cfg, key):
    with pytest.raises(common.UserError) as err:
        model_config.build_model(cfg, make_tables())
    assert str(err.value).startswith(key + ":") and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["qin_small", "dcnv2_tf_small", "din_tf_small"])
def test_adam_lowers_the_training_loss(tiny_processed, config):
    arrays, manifest = processed_data.load_processed(tiny_processed)
    vocab = manifest["vocab"]
    tables = {name: torch.from_numpy(np.array(arrays[name])) for name in ITEM_TABLES}
    tables.update(n_items=vocab["item"], n_tags=vocab["tag"], n_users=vocab["user"], n_levels=vocab["level"])
    features = {name: torch.from_numpy(np.array(arrays[f"train_{name}"]))
                for name in ("user_id", "item_id", "item_seq", "likes_level", "views_level")}
    label = torch.from_numpy(np.array(arrays["train_label"]))
    cfg = common.load_config(common.CONFIG_DIR / f"{config}.yaml")
    torch.manual_seed(0)
    model = model_config.build_model(cfg["model"], tables)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["train"]["lr"])

    def bce(n=1024):  # on the first n training rows
        model.eval()
        with torch.no_grad():
            logits = model({k: v[:n] for k, v in features.items()})
            return F.binary_cross_entropy_with_logits(logits, label[:n]).item()

    before = bce()
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        rows = torch.randint(0, label.numel(), (64,), generator=g)
        loss, _ = model.loss({k: v[rows] for k, v in features.items()}, label[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = bce()
    assert after < 0.9 * before, (before, after)
