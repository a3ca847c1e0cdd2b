"""QIN: Quadratic Interest Network (Li et al., 2025), the 2nd-place model of EReL@MIR Task 2.

ASTA pools the user's history against the target item, then a QNN models quadratic interactions
of all features. Built exactly as released (docs/spec/qin.md), with switches for the paper's
ablations and for the stronger variant the authors found after the deadline.
"""
from typing import Literal

import torch
import torch.nn as nn

from .layers import (Fraction, ASTA, MLP, QNN, CTRModel, Float32Linear, ItemEncoder, LevelEmbedding, MeanPooling,
                    check_choice, init_weights)


class QIN(CTRModel):
    """Input X_0 = [likes/views embeddings (2E), target x_t (I), ASTA output o (I)], D = 2E + 2I.

    The authors' stronger variant (their main branch, 177,801,093 parameters at E=128, M=3):
    use_user_id puts a user_id embedding (E) in front of X_0; history_levels attaches likes/views
    embeddings to every item, the target's from its row and each history item's from the per-item
    level tables, so items are I + 2E wide and X_0 = [user, levels, x_t, o]; asta_bias gives W_o a
    bias. A history item's level and the row's level mean the same thing, so both go through the
    same two level tables.
    """

    def __init__(self, tables, emb_dim=128, mm_dim=128, qnn_layers=4, qnn_m=4,
                 qnn_activation: Literal["prelu", "relu"] = "prelu",
                 interaction: Literal["qnn", "mlp"] = "qnn", mlp_hidden=(1024, 512, 256), dropout: Fraction = 0.1,
                 batch_norm=True, attention: Literal["relu", "softmax", "mean"] = "relu",
                 attention_dropout: Fraction = 0.0, asta_fast=True, use_user_id=False, history_levels=False, asta_bias=False,
                 table_mode: Literal["auto", "gather", "table"] = "auto"):
        super().__init__()
        check_choice("attention", attention, ("relu", "softmax", "mean"))
        check_choice("interaction", interaction, ("qnn", "mlp"))
        self.items = ItemEncoder(tables, emb_dim, table_mode, mm_dim)
        self.levels = LevelEmbedding(tables["n_levels"], emb_dim)
        self.history_levels = history_levels
        item_dim = self.items.out_dim
        if history_levels:
            self.register_buffer("item_likes_level", tables["item_likes_level"], persistent=False)  # [V]
            self.register_buffer("item_views_level", tables["item_views_level"], persistent=False)  # [V]
            item_dim += 2 * emb_dim
        # user 0 is FuxiCTR's padding index, as for every categorical feature (real ids start at 1)
        self.user = nn.Embedding(tables["n_users"], emb_dim, padding_idx=0) if use_user_id else None
        if attention == "mean":  # ablation: mean pooling instead of ASTA
            self.asta = MeanPooling()
        else:
            self.asta = ASTA(item_dim, activation=attention, dropout=attention_dropout, fast=asta_fast,
                             out_bias=asta_bias)
        dim = 2 * item_dim + 2 * emb_dim + (emb_dim if use_user_id else 0)
        if interaction == "qnn":
            self.interaction = QNN(dim, qnn_layers, qnn_m, dropout, batch_norm, qnn_activation)
        else:  # ablation: MLP instead of QNN
            self.interaction = MLP(dim, mlp_hidden, "relu", batch_norm, dropout)
        self.out = Float32Linear(self.interaction.out_dim, 1)
        init_weights(self)

    def forward(self, batch):  # -> logits [B]
        seq = batch["item_seq"]  # [B, L]
        x_t, x_b = self.items(batch["item_id"], seq)  # [B, I], [B, L, I]
        levels = self.levels(batch["likes_level"], batch["views_level"])  # [B, 2E]
        if self.history_levels:  # items become I + 2E wide
            x_t = torch.cat([x_t, levels], -1)
            x_b = torch.cat([x_b, self.levels(self.item_likes_level[seq], self.item_views_level[seq])], -1)
        o = self.asta(x_t, x_b, seq > 0)  # [B, I]
        features = [levels, x_t, o]
        if self.user is not None:
            features.insert(0, self.user(batch["user_id"]))
        x = torch.cat(features, -1)  # [B, D]
        return self.out(self.interaction(x)).squeeze(-1)
