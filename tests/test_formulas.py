"""Blocks against their formulas, written out literally: explicit loops over samples, layers, experts
and history items, plain matrix-vector products on the module's own parameters.

Every parameter (and every batch-norm statistic) is overwritten with random values first, so a zero
bias, a unit variance or a 0.5 initialisation hides nothing: a wrong sign, a missing tanh or
residual, a softmax over the wrong axis or swapped operands each change the numbers. Modules run in
eval() mode (dropout off, batch norm on its running statistics), in double precision except where a
Float32Linear (the logits) insists on float32. Formulas: docs/spec/qin.md, docs/spec/tf4ctr.md and
the docstrings of src/mmctr/models/layers.py and src/mmctr/models/tf4ctr.py.
"""
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from mmctr.models.layers import ASTA, MLP, QNN, CrossNet, CrossNetMix, Dice, DINAttention
from mmctr.models.tf4ctr import DFM, SSEM, TF4CTR

B = 5  # batch rows


def randomize_(module, seed=0, scale=0.5):
    """Every parameter N(0, scale^2), every batch norm's running mean N(0, 1) and variance in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.double))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.double))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.double))
    return module.eval()


def randn(*shape, seed=1, dtype=torch.double):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# DCNv2 cross networks
# ---------------------------------------------------------------------------------------------

def test_cross_net_is_x0_times_wx_plus_b_plus_x():
    """x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, three layers (so x_l and x_0 differ)."""
    D, n_layers = 6, 3
    net = randomize_(CrossNet(D, n_layers).double())
    x0 = randn(B, D)
    expected = torch.empty(B, D, dtype=torch.double)
    for b in range(B):
        x = x0[b]
        for layer in net.layers:
            x = x0[b] * (layer.weight @ x + layer.bias) + x
        expected[b] = x
    assert_close(net(x0), expected)


def test_cross_net_mix_is_dcn_mix():
    """Per layer l and expert k: E_k(x_l) = x_0 * (U_k tanh(C_k tanh(V_k^T x_l)) + b_l),
    x_{l+1} = sum_k softmax(G x_l)_k E_k(x_l) + x_l, the softmax over the K experts, G shared by
    every layer (FuxiCTR's CrossNetMix).

    Layout: V[l, k] is V_k (D x r); C[l, k] and U[l, k] are stored as the maps a row vector is
    right-multiplied by, so C_k = C[l, k]^T (r x r) and U_k = U[l, k]^T (D x r); G = gate [K, D].
    """
    D, n_layers, rank, K = 6, 3, 3, 4
    net = randomize_(CrossNetMix(D, n_layers, rank=rank, n_experts=K).double(), scale=0.7)
    x0 = randn(B, D)
    expected = torch.empty(B, D, dtype=torch.double)
    for b in range(B):
        x = x0[b]
        for l in range(n_layers):
            gate = torch.softmax(net.gate @ x, dim=0)  # [K]
            mixed = torch.zeros(D, dtype=torch.double)
            for k in range(K):
                V_k, C_k, U_k = net.V[l, k], net.C[l, k].T, net.U[l, k].T
                E_k = x0[b] * (U_k @ torch.tanh(C_k @ torch.tanh(V_k.T @ x)) + net.bias[l])
                mixed = mixed + gate[k] * E_k
            x = mixed + x
        expected[b] = x
    assert_close(net(x0), expected)


def test_cross_net_mix_starts_as_fuxictrs():
    """FuxiCTR's CrossNetMix draws each layer's U, V and C by xavier_normal_ over the stacked experts'
    [K, D, r] and [K, r, r] tensors, and its gate as K Linear(D -> 1) (xavier-normal under FuxiCTR's
    model init): the stds below, checked on enough draws to tell a per-matrix xavier (8x larger here)."""
    D, rank, K = 512, 64, 4
    torch.manual_seed(0)
    net = CrossNetMix(D, 2, rank=rank, n_experts=K)
    xavier_std = lambda *shape: math.sqrt(2 / sum(nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))))
    for weight, shape in [(net.V, (K, D, rank)), (net.U, (K, D, rank)), (net.C, (K, rank, rank)),
                          (net.gate, (1, D))]:
        assert weight.std().item() == pytest.approx(xavier_std(*shape), rel=0.05)
    assert net.gate.shape == (K, D) and not net.bias.any()


def test_mlp_activations_are_fuxictrs_and_qnns_the_released_qins():
    """FuxiCTR's MLP_Block (DIN's MLP and attention unit): PReLU with one slope per unit at 0.1, Dice
    with BatchNorm eps 1e-9 and momentum 0.01. The released QNN: one PReLU slope per layer, at 0.25."""
    mlp = MLP(6, [5, 3], "prelu")
    slopes = [m.weight for m in mlp if isinstance(m, nn.PReLU)]
    assert [w.shape[0] for w in slopes] == [5, 3] and all((w == 0.1).all() for w in slopes)
    dice = next(m for m in MLP(6, [5], "dice") if isinstance(m, Dice))
    assert (dice.bn.eps, dice.bn.momentum, dice.bn.affine) == (1e-9, 0.01, False)
    qnn_slopes = [act.weight for act in QNN(6, n_layers=2, m=2).acts]
    assert [w.numel() for w in qnn_slopes] == [1, 1] and all((w == 0.25).all() for w in qnn_slopes)
    # DIN's attention unit runs its MLP on [B * L, h] rows: a slope per unit, not per history position
    I, n_hist = 4, 5
    unit = randomize_(DINAttention(I, hidden=(6, 3), activation="prelu").double())
    x_t, x_b, mask = randn(B, I), randn(B, n_hist, I, seed=2), torch.ones(B, n_hist, dtype=torch.bool)
    w_q, w_k, w_diff, w_prod = unit.input.weight.chunk(4, dim=1)
    h = torch.cat([x_t.unsqueeze(1).expand(-1, n_hist, -1), x_b, x_t.unsqueeze(1) - x_b, x_t.unsqueeze(1) * x_b],
                  -1) @ unit.input.weight.T + unit.input.bias  # [B, L, 6]
    prelu = lambda z, slope: torch.where(z > 0, z, slope * z)
    z = prelu(h, unit.act[0].weight) @ unit.mlp[0].weight.T + unit.mlp[0].bias
    s = (prelu(z, unit.mlp[1].weight) @ unit.score.weight.T + unit.score.bias).squeeze(-1)  # [B, L]
    assert_close(unit(x_t, x_b, mask), torch.einsum("bl,bli->bi", s, x_b))


# ---------------------------------------------------------------------------------------------
# QIN: ASTA and QNN (docs/spec/qin.md)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False])
def test_asta_is_the_spec_formula(fast):
    """q = W_q x_t, k_j = W_k x_bj, v_j = W_v x_bj; s_j = m_j (q . k_j) / sqrt(A) with A = 2I;
    o = W_o sum_j ReLU(s_j) v_j + x_t."""
    I, n_hist = 4, 6
    asta = randomize_(ASTA(I, fast=fast).double())
    x_t, x_b = randn(B, I), randn(B, n_hist, I, seed=2)
    mask = torch.rand(B, n_hist, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[0] = False  # an all-padding history: o = x_t
    mask[1] = True
    expected = torch.empty(B, I, dtype=torch.double)
    for b in range(B):
        q = asta.W_q.weight @ x_t[b]
        pooled = torch.zeros(2 * I, dtype=torch.double)
        for j in range(n_hist):
            k, v = asta.W_k.weight @ x_b[b, j], asta.W_v.weight @ x_b[b, j]
            s = float(mask[b, j]) * (q @ k) / math.sqrt(2 * I)
            pooled = pooled + torch.relu(s) * v
        expected[b] = asta.W_o.weight @ pooled + x_t[b]
    assert_close(asta(x_t, x_b, mask), expected)
    assert_close(expected[0], x_t[0])


@pytest.mark.parametrize("batch_norm, activation", [(True, "prelu"), (False, "relu")])
def test_qnn_is_the_released_quadratic_layer(batch_norm, activation):
    """Per layer: h = Linear(D -> M*D)(x) as (M, D); x' = x * sum_r h_r;
    x <- act(BatchNorm1d(x')) + x, with one PReLU slope per layer (dropout is off in eval)."""
    D, M, n_layers = 5, 3, 2
    qnn = randomize_(QNN(D, n_layers=n_layers, m=M, dropout=0.3, batch_norm=batch_norm,
                         activation=activation).double())
    x_in = randn(B, D)
    expected = torch.empty(B, D, dtype=torch.double)
    for b in range(B):
        x = x_in[b]
        for l in range(n_layers):
            linear = qnn.linears[l]
            h = linear.weight @ x + linear.bias  # [M * D]
            z = x * sum(h[r * D:(r + 1) * D] for r in range(M))
            if batch_norm:
                bn = qnn.norms[l]
                z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            if activation == "prelu":
                slope = qnn.acts[l].weight
                assert slope.numel() == 1
                z = torch.where(z >= 0, z, slope * z)
            else:
                z = torch.clamp(z, min=0)
            x = z + x
        expected[b] = x
    assert_close(qnn(x_in), expected)


def test_qnn_in_training_drops_each_of_the_m_products_as_released():
    """Training: Dropout on Linear(x)'s M*D outputs, then the sum over M, as released. The layer
    drops the [B, M, D] view of them (its gradient needs no copy): the same masks in the same order,
    so the same outputs and gradients bit for bit as dropping before the view."""
    D, M = 6, 3
    qnn = randomize_(QNN(D, n_layers=2, m=M, dropout=0.3).float()).train()
    x_in = randn(B, D).float().requires_grad_()

    def released(x):
        for linear, norm, act in zip(qnn.linears, qnn.norms, qnn.acts):
            h = qnn.dropout(linear(x)).view(x.shape[0], M, -1).sum(1)
            x = qnn.dropout(act(norm(x * h))) + x
        return x

    results = []
    for forward in (qnn, released):
        torch.manual_seed(7)
        qnn.zero_grad()
        x_in.grad = None
        out = forward(x_in)
        out.square().sum().backward()
        results.append([out.detach(), x_in.grad, *(p.grad.clone() for p in qnn.parameters())])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)
    assert not torch.equal(results[0][0], qnn.eval()(x_in))  # the masks did drop something


# ---------------------------------------------------------------------------------------------
# TF4CTR: SSEM (docs/spec/tf4ctr.md, part 1)
# ---------------------------------------------------------------------------------------------

class PassThrough(nn.Module):
    """An 'embedder' whose embedding is the batch itself, so e is under the test's control."""

    def __init__(self, width):
        super().__init__()
        self.out_dim = width

    def forward(self, batch):
        return batch


def make_ssem(mode, d=12):
    return randomize_(SSEM(PassThrough, d, mode, dropout=0.1, batch_norm=True).double(), scale=0.8)


def dense_bn_relu(mlp, layer, x):
    """Hidden layer ``layer`` of an MLP (Linear, BatchNorm, ReLU, Dropout each) in eval mode:
    ReLU(BatchNorm(W x + b)) on a single vector."""
    linear, bn = mlp[4 * layer], mlp[4 * layer + 1]
    z = linear.weight @ x + linear.bias
    return torch.relu((z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)


def test_ssem_gm_is_one_scalar_gate_per_sample():
    """GM as the authors wrote it (TF4CTRv2.py, Gate): g = sigmoid(w . ReLU(BN(W_1 e + b_1)) + b) in
    (0, 1), ONE number per sample, hidden width |e|/4; simple input e * g, complex input e * (1 - g)."""
    d = 12
    ssem = make_ssem("gm", d)
    hidden, out = ssem.gate[0], ssem.gate[1]
    assert hidden[0].out_features == d // 4 and len(hidden) == 4 and out.out_features == 1
    e = randn(B, d, seed=4)
    expected_s, expected_c = torch.empty(B, d, dtype=torch.double), torch.empty(B, d, dtype=torch.double)
    for b in range(B):
        g = torch.sigmoid(out.weight[0] @ dense_bn_relu(hidden, 0, e[b]) + out.bias[0])  # a scalar
        assert 0 < g < 1
        expected_s[b], expected_c[b] = e[b] * g, e[b] * (1 - g)
    e_s, e_c = ssem(e)
    assert_close(e_s, expected_s)
    assert_close(e_c, expected_c)


def test_ssem_moe_is_an_mmoe_of_two_relu_mlp_experts():
    """MoE as the authors wrote it (TF4CTRv2.py, MMoE_Layer): expert j = ReLU MLP [|e|/2, |e|] (each
    layer Linear, BatchNorm, ReLU); gate k = Linear(ReLU MLP [|e|/4]) -> 2; input k = sum_j
    softmax_j(gate k) expert j, the softmax over the experts; k = 0 feeds the simple encoder."""
    d = 12
    ssem = make_ssem("moe", d)
    e = randn(B, d, seed=5)
    expected = torch.empty(2, B, d, dtype=torch.double)
    for b in range(B):
        experts = []
        for expert in ssem.experts:
            h = dense_bn_relu(expert, 0, e[b])
            assert h.shape == (d // 2,)
            experts.append(dense_bn_relu(expert, 1, h))
        for k, gate in enumerate(ssem.gates):
            hidden, out = gate[0], gate[1]
            logits = out.weight @ dense_bn_relu(hidden, 0, e[b]) + out.bias  # [2]
            weights = torch.exp(logits) / torch.exp(logits).sum()
            expected[k, b] = weights[0] * experts[0] + weights[1] * experts[1]
    e_s, e_c = ssem(e)
    assert_close(e_s, expected[0])
    assert_close(e_c, expected[1])
    assert (e_s >= 0).all() and (e_c >= 0).all()  # mixtures of ReLU outputs


# ---------------------------------------------------------------------------------------------
# TF4CTR: DFM (docs/spec/tf4ctr.md, part 3)
# ---------------------------------------------------------------------------------------------

D_S, D_C = 3, 4


def dfm_inputs(dtype):
    return (randn(B, D_S, seed=6, dtype=dtype), randn(B, D_C, seed=7, dtype=dtype),
            randn(B, seed=8, dtype=dtype), randn(B, seed=9, dtype=dtype))


def test_dfm_cf_is_one_linear_on_both_encoder_outputs():
    """CF: y = w . [h_s, h_c] + b (float32: the fusion is a Float32Linear)."""
    dfm = randomize_(DFM(D_S, D_C, "cf"))
    h_s, h_c, y_s, y_c = dfm_inputs(torch.float32)
    w, bias = dfm.fuse.weight[0], dfm.fuse.bias[0]
    expected = torch.stack([sum(w[i] * h_s[b, i] for i in range(D_S))
                            + sum(w[D_S + i] * h_c[b, i] for i in range(D_C)) + bias for b in range(B)])
    assert_close(dfm(h_s, h_c, y_s, y_c), expected)


def vf_literal(dfm, h_s, h_c, y_s, y_c, noise=None):
    """VF: pi = [w_s . h_s + b_s, w_c . h_c + b_c]; p = softmax((pi + noise) / 0.8); y = p_s y_s + p_c y_c."""
    out = torch.empty(B, dtype=torch.double)
    for b in range(B):
        pi = torch.stack([dfm.pi_s.weight[0] @ h_s[b] + dfm.pi_s.bias[0],
                          dfm.pi_c.weight[0] @ h_c[b] + dfm.pi_c.bias[0]])
        if noise is not None:
            pi = pi + noise[b]
        p = torch.softmax(pi / 0.8, dim=0)
        out[b] = p[0] * y_s[b] + p[1] * y_c[b]
    return out


def test_dfm_vf_in_eval_is_the_noiseless_gumbel_softmax():
    """In eval the Gumbel noise is left out (a deterministic prediction): p = softmax(pi / tau)."""
    dfm = randomize_(DFM(D_S, D_C, "vf").double())
    inputs = dfm_inputs(torch.double)
    assert_close(dfm(*inputs), vf_literal(dfm, *inputs))


def test_dfm_vf_in_training_is_gumbel_softmax_with_tau_0_8():
    """In training p = gumbel_softmax(pi, tau=0.8) = softmax((pi + g) / 0.8), g = -log(Exp(1)) drawn
    from the same seed as torch's gumbel_softmax draws it."""
    dfm = randomize_(DFM(D_S, D_C, "vf").double()).train()
    inputs = dfm_inputs(torch.double)
    torch.manual_seed(11)
    got = dfm(*inputs)
    torch.manual_seed(11)
    gumbel = -torch.empty(B, 2, dtype=torch.double).exponential_().log()
    assert_close(got, vf_literal(dfm, *inputs, noise=gumbel))
    assert not torch.allclose(got, vf_literal(dfm, *inputs), atol=1e-3)  # the noise is there


def test_dfm_moef_is_a_softmax_gate_over_two_linear_experts_on_both_outputs():
    """MoEF: h = [h_s, h_c]; y = sum_j softmax_j(G h + g)_j (E h + e)_j over the 2 experts."""
    dfm = randomize_(DFM(D_S, D_C, "moef"))
    h_s, h_c, y_s, y_c = dfm_inputs(torch.float32)
    G, g, E, e = dfm.gate.weight, dfm.gate.bias, dfm.experts.weight, dfm.experts.bias
    expected = torch.empty(B)
    for b in range(B):
        h = torch.cat([h_s[b], h_c[b]])
        weights = torch.exp(torch.stack([G[j] @ h + g[j] for j in range(2)]))
        weights = weights / weights.sum()
        expected[b] = sum(weights[j] * (E[j] @ h + e[j]) for j in range(2))
    assert_close(dfm(h_s, h_c, y_s, y_c), expected)


@pytest.mark.parametrize("mode", ["wsf", "sum"])
def test_dfm_wsf_and_sum(mode):
    """WSF: y = w_1 y_s + w_2 y_c, [w_1, w_2] learned from 0.5; sum: y = y_s + y_c."""
    dfm = DFM(D_S, D_C, mode).double()
    if mode == "wsf":
        assert_close(dfm.w, torch.full((2,), 0.5, dtype=torch.double))
    randomize_(dfm)
    h_s, h_c, y_s, y_c = dfm_inputs(torch.double)
    w = dfm.w if mode == "wsf" else torch.ones(2, dtype=torch.double)
    expected = torch.stack([w[0] * y_s[b] + w[1] * y_c[b] for b in range(B)])
    assert_close(dfm(h_s, h_c, y_s, y_c), expected)


# ---------------------------------------------------------------------------------------------
# TF4CTR: the wiring SSEM -> encoders -> own heads -> DFM
# ---------------------------------------------------------------------------------------------

class Projector(nn.Module):
    def __init__(self, d_in, width):
        super().__init__()
        self.linear, self.out_dim = nn.Linear(d_in, width), width

    def forward(self, x):
        return self.linear(x)


class Deep(Projector):
    def __init__(self, d_in):
        super().__init__(d_in, 6)

    def forward(self, x):
        return torch.tanh(self.linear(x))


def test_tf4ctr_feeds_each_encoder_its_own_input_and_head():
    """SER: the simple encoder gets the half-width embedding, the complex one the full one; each ends
    in its own Linear -> 1 (y_s, y_c), and WSF fuses the two logits."""
    emb_dim, d_in = 4, 5
    model = TF4CTR(make_embedder=lambda e: Projector(d_in, 2 * e), make_simple=lambda d: Projector(d, 3),
                   make_complex=Deep, emb_dim=emb_dim, dropout=0.0, batch_norm=False, ssem="ser", dfm="wsf")
    randomize_(model)
    assert model.ssem.dims == (emb_dim, 2 * emb_dim)  # the simple encoder's embedding: half the width
    x = randn(B, d_in, seed=12, dtype=torch.float32)
    y, y_s, y_c = model.twin_logits(x)
    ssem, w = model.ssem, model.dfm.w
    for b in range(B):
        e_s = ssem.embed_s.linear.weight @ x[b] + ssem.embed_s.linear.bias
        e_c = ssem.embed.linear.weight @ x[b] + ssem.embed.linear.bias
        h_s = model.simple.linear.weight @ e_s + model.simple.linear.bias
        h_c = torch.tanh(model.complex.linear.weight @ e_c + model.complex.linear.bias)
        logit_s = model.head_s.weight[0] @ h_s + model.head_s.bias[0]
        logit_c = model.head_c.weight[0] @ h_c + model.head_c.bias[0]
        assert_close(y_s[b], logit_s)
        assert_close(y_c[b], logit_c)
        assert_close(y[b], w[0] * logit_s + w[1] * logit_c)
    assert_close(model(x), y)
