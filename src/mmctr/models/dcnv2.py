"""DCNv2 (Wang et al., WWW 2021) on the multimodal task, plain or inside TF4CTR.

x_0 = [likes/views embeddings, target item, pooled history] (FeatureEmbedding), then a cross
network (full rank or the low-rank mixture CrossNetMix) and an MLP, stacked or in parallel.
Under TF4CTR the cross network is the simple encoder and the MLP the complex one, which is the
parallel structure by construction.
"""
from typing import Literal

import torch

from .layers import (Fraction, ASTA, MLP, CrossNet, CrossNetMix, CTRModel, FeatureEmbedding, Float32Linear, MeanPooling,
                    check_choice, init_weights)
from .tf4ctr import TF4CTR


def history_pooling(pooling):
    """mean: masked mean; asta: QIN's ReLU target attention (item width -> module)."""
    check_choice("pooling", pooling, ("mean", "asta"))
    return (lambda dim: ASTA(dim)) if pooling == "asta" else (lambda dim: MeanPooling())


def cross_network(dim, cross, cross_layers, cross_rank, cross_experts):
    check_choice("cross", cross, ("full", "mix"))
    if cross == "full":
        return CrossNet(dim, cross_layers)
    return CrossNetMix(dim, cross_layers, cross_rank, cross_experts)


class DCNv2(CTRModel):
    """x_0 [B, D = 2E + 2I] -> cross network and MLP, stacked or in parallel -> Linear -> 1."""

    def __init__(self, tables, emb_dim=64, mm_dim=128, pooling: Literal["mean", "asta"] = "mean",
                 cross: Literal["full", "mix"] = "full", cross_layers=3, cross_rank=64, cross_experts=4,
                 structure: Literal["stacked", "parallel"] = "parallel", mlp_hidden=(1024, 512, 256),
                 dropout: Fraction = 0.1, batch_norm=True, table_mode: Literal["auto", "gather", "table"] = "auto"):
        super().__init__()
        check_choice("structure", structure, ("stacked", "parallel"))
        self.embedding = FeatureEmbedding(tables, emb_dim, history_pooling(pooling), table_mode, mm_dim)
        dim = self.embedding.out_dim
        self.cross = cross_network(dim, cross, cross_layers, cross_rank, cross_experts)
        self.mlp = MLP(dim, mlp_hidden, "relu", batch_norm, dropout)
        self.stacked = structure == "stacked"
        self.out = Float32Linear(self.mlp.out_dim + (0 if self.stacked else dim), 1)
        init_weights(self)

    def forward(self, batch):  # -> logits [B]
        x0 = self.embedding(batch)  # [B, D]
        if self.stacked:
            h = self.mlp(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.mlp(x0)], -1)
        return self.out(h).squeeze(-1)


def dcnv2_tf4ctr(tables, emb_dim=64, mm_dim=128, pooling: Literal["mean", "asta"] = "mean",
                 cross: Literal["full", "mix"] = "full", cross_layers=3, cross_rank=64, cross_experts=4,
                 mlp_hidden=(1024, 512, 256), dropout: Fraction = 0.1, batch_norm=True,
                 table_mode: Literal["auto", "gather", "table"] = "auto",
                 ssem="ser", dfm="wsf", c=0.8, gamma=2.0, alpha=0.25):
    """DCNv2 in TF4CTR: cross network = simple encoder, MLP = complex encoder, each on its SSEM input."""
    return TF4CTR(
        make_embedder=lambda e: FeatureEmbedding(tables, e, history_pooling(pooling), table_mode, mm_dim),
        make_simple=lambda d: cross_network(d, cross, cross_layers, cross_rank, cross_experts),
        make_complex=lambda d: MLP(d, mlp_hidden, "relu", batch_norm, dropout),
        emb_dim=emb_dim, dropout=dropout, batch_norm=batch_norm, ssem=ssem, dfm=dfm, c=c, gamma=gamma,
        alpha=alpha)
