"""TF4CTR: Twin Focus Framework (Li et al., 2024), a plug-in for any model split into a simple and a
complex encoder (docs/spec/tf4ctr.md).

SSEM gives the two encoders different inputs, each encoder ends in its own Linear -> 1 (y_s, y_c),
DFM fuses them into the final logit y, and the TF loss trains the simple encoder on easy samples
and the complex one on hard samples. A model joins by handing over three factories:
  make_embedder(emb_dim) -> module(batch) -> [B, out_dim]
  make_simple(in_dim), make_complex(in_dim) -> module([B, in_dim]) -> [B, out_dim]
each module exposing .out_dim.
"""
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Fraction, NonNegative, MLP, Float32Linear, bce, check_choice, init_weights


def tf_loss(y, y_s, y_c, label, c: Fraction = 0.8, gamma: NonNegative = 2.0, alpha: Fraction = 0.25, form="logits"):
    """BCE(y) + alpha * L_easy(y_s) + (1 - alpha) * L_hard(y_c), all from logits [B] and 0/1 labels [B].

    L_easy = mean(BCE(p_s) (c + p_t(s))^gamma), L_hard = mean(BCE(p_c) ((2 - c) - p_t(c))^gamma),
    with p_t = t p + (1 - t)(1 - p) the probability given to the true label; every BCE in ``form``
    (layers.bce: from logits, or FuxiCTR's from float32 probabilities, as TF4CTRv2.py computes it).
    """
    dtype = torch.promote_types(y.dtype, torch.float32)  # float32, or float64 for a float64 model
    t = label.to(dtype)
    y, y_s, y_c = y.to(dtype), y_s.to(dtype), y_c.to(dtype)

    def p_true(z):
        p = torch.sigmoid(z)
        return t * p + (1 - t) * (1 - p)

    easy = bce(y_s, t, form, reduction="none") * (c + p_true(y_s)) ** gamma
    hard = bce(y_c, t, form, reduction="none") * ((2 - c) - p_true(y_c)) ** gamma
    return bce(y, t, form) + alpha * easy.mean() + (1 - alpha) * hard.mean()


class SSEM(nn.Module):
    """Sample Selection Embedding Module: the (simple, complex) encoder inputs.

    As the authors wrote them (TF4CTRv2.py), with d = |e| and every MLP in the model's own batch
    norm and dropout settings:
    ser: two separate embedders, the simple one at half the embedding width;
    gm: one embedding e and one scalar gate per sample, g(e) = sigmoid(Linear(MLP_[d/4](e)) -> 1) in
        (0, 1): e * g for the simple encoder, e * (1 - g) for the complex;
    moe: an MMoE layer: two experts, each a ReLU MLP [d/2, d], mixed for encoder k by the softmax of
        gate k, a ReLU MLP [d/4] -> Linear -> 2;
    none: both encoders share one embedding.
    """

    def __init__(self, make_embedder, emb_dim, mode="ser", dropout=0.0, batch_norm=False):
        super().__init__()
        check_choice("ssem", mode, ("ser", "gm", "moe", "none"))
        self.mode = mode
        self.embed = make_embedder(emb_dim)
        d = self.embed.out_dim
        self.dims = (d, d)

        def mlp(hidden):
            return MLP(d, hidden, "relu", batch_norm, dropout)

        if mode == "ser":
            self.embed_s = make_embedder(max(emb_dim // 2, 1))
            self.dims = (self.embed_s.out_dim, d)
        elif mode == "gm":
            self.gate = nn.Sequential(mlp([max(d // 4, 1)]), nn.Linear(max(d // 4, 1), 1))
        elif mode == "moe":
            self.experts = nn.ModuleList([mlp([max(d // 2, 1), d]) for _ in range(2)])
            self.gates = nn.ModuleList([nn.Sequential(mlp([max(d // 4, 1)]), nn.Linear(max(d // 4, 1), 2))
                                        for _ in range(2)])

    def forward(self, batch):  # -> e_s [B, dims[0]], e_c [B, dims[1]]
        e = self.embed(batch)  # [B, d]
        if self.mode == "ser":
            return self.embed_s(batch), e
        if self.mode == "gm":
            g = torch.sigmoid(self.gate(e))  # [B, 1]
            return e * g, e * (1 - g)
        if self.mode == "moe":
            experts = torch.stack([expert(e) for expert in self.experts], 1)  # [B, expert, d]
            e_s, e_c = (torch.einsum("be,bed->bd", torch.softmax(gate(e), -1), experts) for gate in self.gates)
            return e_s, e_c
        return e, e


class DFM(nn.Module):
    """Dynamic Fusion Module: the final logit from the encoder outputs h and logits y.

    wsf: w1 y_s + w2 y_c, [w1, w2] learned from 0.5; cf: Linear([h_s, h_c]) -> 1;
    vf: gumbel-softmax (tau 0.8) weights from Linear(h) -> 1 per encoder, softmax(pi / tau) in eval;
    moef: softmax gate over two Linear([h_s, h_c]) -> 1 experts; sum: y_s + y_c.
    """

    def __init__(self, d_s, d_c, mode="wsf", tau=0.8):
        super().__init__()
        check_choice("dfm", mode, ("wsf", "cf", "vf", "moef", "sum"))
        self.mode, self.tau = mode, tau
        if mode == "wsf":
            self.w = nn.Parameter(torch.full((2,), 0.5))
        elif mode == "cf":
            self.fuse = Float32Linear(d_s + d_c, 1)
        elif mode == "vf":
            self.pi_s, self.pi_c = nn.Linear(d_s, 1), nn.Linear(d_c, 1)
        elif mode == "moef":
            self.gate = nn.Linear(d_s + d_c, 2)
            self.experts = Float32Linear(d_s + d_c, 2)  # both experts in one matmul

    def forward(self, h_s, h_c, y_s, y_c):  # [B, d_s], [B, d_c], [B], [B] -> [B]
        if self.mode == "wsf":
            return self.w[0] * y_s + self.w[1] * y_c
        if self.mode == "cf":
            return self.fuse(torch.cat([h_s, h_c], -1)).squeeze(-1)
        if self.mode == "vf":
            pi = torch.cat([self.pi_s(h_s), self.pi_c(h_c)], -1)  # [B, 2]
            p = F.gumbel_softmax(pi, tau=self.tau) if self.training else torch.softmax(pi / self.tau, -1)
            return (p * torch.stack([y_s, y_c], -1)).sum(-1)
        if self.mode == "moef":
            h = torch.cat([h_s, h_c], -1)
            return (torch.softmax(self.gate(h), -1) * self.experts(h)).sum(-1)
        return y_s + y_c


class TF4CTR(nn.Module):
    """Any model as SSEM -> (simple, complex) encoders -> own Linear -> 1 each -> DFM, with the TF loss.

    dropout and batch_norm are the wrapped model's own (net_dropout, batch_norm in TF4CTRv2.py), used
    by SSEM's gate and expert MLPs. init_weights runs over the whole wrapper, so the factories'
    modules start like every model here.
    """

    def __init__(self, make_embedder, make_simple, make_complex, emb_dim, dropout, batch_norm,
                 ssem: Literal["ser", "gm", "moe", "none"] = "ser",
                 dfm: Literal["wsf", "cf", "vf", "moef", "sum"] = "wsf", c: Fraction = 0.8, gamma: NonNegative = 2.0, alpha: Fraction = 0.25):
        super().__init__()
        if not 0 <= c <= 1:  # keeps (2 - c) - p_t, the hard-sample focus, non-negative
            raise ValueError(f"c: {c} is not in [0, 1]")
        if gamma < 0:
            raise ValueError(f"gamma: {gamma} is negative")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha: {alpha} is not in [0, 1]")
        self.ssem = SSEM(make_embedder, emb_dim, ssem, dropout, batch_norm)
        self.simple = make_simple(self.ssem.dims[0])
        self.complex = make_complex(self.ssem.dims[1])
        self.head_s = Float32Linear(self.simple.out_dim, 1)
        self.head_c = Float32Linear(self.complex.out_dim, 1)
        self.dfm = DFM(self.simple.out_dim, self.complex.out_dim, dfm)
        self.c, self.gamma, self.alpha = c, gamma, alpha
        init_weights(self)

    def twin_logits(self, batch):  # -> y, y_s, y_c, each [B]
        e_s, e_c = self.ssem(batch)
        h_s, h_c = self.simple(e_s), self.complex(e_c)
        y_s, y_c = self.head_s(h_s).squeeze(-1), self.head_c(h_c).squeeze(-1)
        return self.dfm(h_s, h_c, y_s, y_c), y_s, y_c

    def forward(self, batch):  # -> logits [B]
        return self.twin_logits(batch)[0]

    def loss(self, batch, label, form="logits"):
        y, y_s, y_c = self.twin_logits(batch)
        return tf_loss(y, y_s, y_c, label, self.c, self.gamma, self.alpha, form), y
