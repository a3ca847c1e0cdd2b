"""The 1st-place Transformer + DCNv2: released size, the released history mask and the fixed one."""
import pytest
import torch

from mmctr import common
from mmctr import model_config
from helpers import L, V, make_batch, make_label, make_tables
from mmctr.models.transformer_dcn import TransformerDCN

SMALL = dict(name="transformer_dcn", emb_dim=8, mm_dim=8, dim_feedforward=16, first_k_cols=4,
             cross_layers=2, dcn_hidden=[32, 16], head_hidden=[16, 8])


def build(history_mask, seed=0, **changes):
    torch.manual_seed(seed)
    return model_config.build_model({**SMALL, "history_mask": history_mask, **changes}, make_tables()).eval()


def test_released_configuration_has_the_released_parameter_count():
    """docs/spec/transformer_dcn.md: 267,898,881 on the real vocabularies, and each part's share."""
    V, T = 91_718, 11_740
    cfg = common.load_config(common.CONFIG_DIR / "transformer_dcn.yaml")["model"]
    with torch.device("meta"):  # 268M parameters: counted without memory
        tables = make_tables(n_items=V, n_tags=T, n_users=1_000_001)
        model = model_config.build_model(cfg, tables)
    parts = {"embeddings": [model.items, model.levels], "transformer": [model.sequence],
             "cross network": [model.cross], "parallel MLP": [model.mlp], "head": [model.head, model.out]}
    counts = {part: sum(p.numel() for m in modules for p in m.parameters()) for part, modules in parts.items()}
    assert counts == {"embeddings": 6_639_104, "transformer": 2_893_824, "cross network": 247_802_496,
                      "parallel MLP": 9_963_264, "head": 600_193}
    assert model_config.count_parameters(model) == 267_898_881


def left_padded_batch():
    batch = make_batch()
    lengths = (batch["item_seq"] > 0).sum(1)
    assert lengths[0] == 0 and lengths[1] == L and ((lengths > 0) & (lengths < L)).any()
    return batch


def with_other_item(batch, rows, position):
    """The batch with another real item at ``position`` of ``rows``."""
    seq = batch["item_seq"].clone()
    seq[rows, position] = seq[rows, position] % (V - 1) + 1  # 1..V-1, never the item it was
    return {**batch, "item_seq": seq}


def test_released_mask_ignores_every_real_history_item_of_a_padded_row():
    model = build("released")
    batch = left_padded_batch()
    padded = ((batch["item_seq"] == 0).any(1)).nonzero().squeeze(1)  # rows with some padding
    with torch.no_grad():
        before = model(batch)
        for position in (L - 1, L - 5, L - 30):  # real items wherever the row has them
            real = padded[batch["item_seq"][padded, position] > 0]
            assert len(real) > 0
            after = model(with_other_item(batch, real, position))
            torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_released_mask_sees_only_the_last_item_of_a_row_without_padding():
    model = build("released")
    batch = left_padded_batch()  # row 1 holds 64 real items
    with torch.no_grad():
        before = model(batch)
        earlier = model(with_other_item(batch, [1], 10))
        last = model(with_other_item(batch, [1], L - 1))
    torch.testing.assert_close(earlier, before, rtol=0, atol=1e-6)
    assert (last[1] - before[1]).abs() > 1e-6
    torch.testing.assert_close(last[2:], before[2:], rtol=0, atol=1e-6)  # other rows untouched


def test_fixed_mask_reads_the_real_items_and_ignores_the_padding():
    model = build("fixed")
    batch = left_padded_batch()
    padded = ((batch["item_seq"] == 0).any(1) & (batch["item_seq"] > 0).any(1)).nonzero().squeeze(1)
    with torch.no_grad():
        before = model(batch)
        real_changed = model(with_other_item(batch, padded, L - 1))  # the most recent item: real in these rows
        # what a padding position holds (the item tables' row 0) makes no difference
        model.items.item_id.weight[0].normal_()
        model.items.item_emb[0].normal_()
        padding_changed = model(batch)
    assert ((real_changed[padded] - before[padded]).abs() > 1e-6).all()
    torch.testing.assert_close(padding_changed, before, rtol=0, atol=1e-6)


def test_the_masks_differ_only_in_what_they_ignore():
    released, fixed = build("released"), build("fixed")
    fixed.load_state_dict(released.state_dict())  # one set of weights, two masks
    batch = left_padded_batch()
    with torch.no_grad():
        a, b = released(batch), fixed(batch)
    assert ((a - b).abs() > 1e-6).sum() >= len(a) // 2


@pytest.mark.parametrize("history_mask", ["released", "fixed"])
def test_backward_reaches_every_parameter(history_mask):
    model = build(history_mask).train()
    loss, logits = model.loss(make_batch(), make_label())
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (16,)
    for name, p in model.named_parameters():  # a branch cut off (times 0) would get zero gradients
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_bad_history_mask_is_a_one_line_error():
    with pytest.raises(common.UserError, match="history_mask"):
        model_config.build_model({**SMALL, "history_mask": "both"}, make_tables())


def test_the_model_file_builds_without_the_config_layer():
    model = TransformerDCN(make_tables(), emb_dim=8, mm_dim=8, first_k_cols=2, dcn_hidden=(16,), head_hidden=(8,))
    assert model(make_batch()).shape == (16,)
