"""Transformer + DCNv2, the 1st-place model of EReL@MIR Task 2 (team momo, 0.9839 test AUC).

Every history item, concatenated with the target, goes through a transformer encoder; its last
first_k positions and a max-pool summary join the level and target embeddings in a DCNv2 (cross
network beside an MLP) whose outputs an MLP head reads. Built as released (docs/spec/
transformer_dcn.md: 267,898,881 parameters on the real vocabularies at the released sizes),
including the released history mask, with the corrected mask as a switch.

history_mask: the released loader marks real history items True and hands that to the encoder as
src_key_padding_mask, where True means "ignore": the released transformer attends only to the
padding (a row without padding un-ignores its last position), and its outputs at the real items
are then zeroed. 'released' reproduces that; 'fixed' ignores the padding instead, so the
transformer reads the history.

max_history (None: all 64, as released) keeps only the most recent positions: the encoder's cost
grows with the square of the length, which matters on a CPU.
"""
from typing import Literal, Optional

import torch
import torch.nn as nn

from .layers import Fraction, MLP, CrossNet, CTRModel, Float32Linear, ItemEncoder, LevelEmbedding, init_weights


class SequenceTransformer(nn.Module):
    """[x_bj, x_t] per history position -> nn.TransformerEncoder -> the last first_k outputs
    flattened, plus out_linear(max over the unmasked positions): width (first_k + 1) * 2I."""

    def __init__(self, item_dim, n_layers=2, n_heads=1, dim_feedforward=256, dropout: Fraction = 0.2, first_k=16,
                 max_pool=True, history_mask="released", max_history=None):
        super().__init__()
        if history_mask not in ("released", "fixed"):
            raise ValueError(f"history_mask: {history_mask!r} is not one of released, fixed")
        d = 2 * item_dim
        layer = nn.TransformerEncoderLayer(d, n_heads, dim_feedforward, dropout, batch_first=True)  # post-norm, ReLU
        # enable_nested_tensor=False: the same (padded) computation in training and inference
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_linear = nn.Linear(d, d) if max_pool else None
        self.first_k, self.history_mask, self.max_history = first_k, history_mask, max_history
        self.out_dim = (first_k + int(max_pool)) * d

    def ignored(self, item_seq):  # [B, L] -> [B, L] bool, True = the encoder ignores this key
        ignored = item_seq > 0 if self.history_mask == "released" else item_seq == 0
        # no row may ignore every key (softmax over nothing): un-ignore its last (most recent) one
        last = torch.zeros_like(ignored)
        last[:, -1] = ignored.all(-1)
        return ignored & ~last

    def forward(self, x_t, x_b, item_seq):  # [B, I], [B, L, I], [B, L] -> [B, out_dim]
        if self.max_history:  # the most recent positions only (history is left-padded)
            x_b, item_seq = x_b[:, -self.max_history:], item_seq[:, -self.max_history:]
        # a padding position holds the zero item, as in the released tables (zero id row, no
        # tags, zero multimodal vector), whatever row 0 of the tables holds
        x_b = x_b.masked_fill((item_seq == 0).unsqueeze(-1), 0.0)
        x = torch.cat([x_b, x_t.unsqueeze(1).expand_as(x_b)], -1)  # [B, L, 2I]
        ignored = self.ignored(item_seq)
        h = self.encoder(x, src_key_padding_mask=ignored)
        h = h.masked_fill(ignored.unsqueeze(-1), 0.0)  # [B, L, 2I]
        out = [h[:, -self.first_k:].flatten(1)]  # the most recent first_k positions
        if self.out_linear is not None:
            pooled = h.masked_fill(ignored.unsqueeze(-1), -1e9).max(1).values  # [B, 2I]
            out.append(self.out_linear(pooled))
        return torch.cat(out, -1)


class TransformerDCN(CTRModel):
    """x_0 = [likes/views embeddings (2E), target x_t (I), sequence output], I = 2E + mm_dim;
    cross network (full rank) and MLP in parallel on x_0; head MLP on [cross, MLP] -> 1."""

    def __init__(self, tables, emb_dim=64, mm_dim=128, transformer_layers=2, num_heads=1,
                 dim_feedforward=256, transformer_dropout: Fraction = 0.2, first_k_cols=16, max_pool=True,
                 history_mask: Literal["released", "fixed"] = "released",
                 max_history: Optional[int] = None, cross_layers=3, dcn_hidden=(1024, 512, 256),
                 head_hidden=(64, 32), dropout: Fraction = 0.2, batch_norm=False, table_mode="auto"):
        super().__init__()
        self.items = ItemEncoder(tables, emb_dim, table_mode, mm_dim)
        self.levels = LevelEmbedding(tables["n_levels"], emb_dim)
        item_dim = self.items.out_dim
        self.sequence = SequenceTransformer(item_dim, transformer_layers, num_heads, dim_feedforward,
                                            transformer_dropout, first_k_cols, max_pool, history_mask,
                                            max_history)
        dim = 2 * emb_dim + item_dim + self.sequence.out_dim
        self.cross = CrossNet(dim, cross_layers)
        self.mlp = MLP(dim, dcn_hidden, "relu", batch_norm, dropout)
        self.head = MLP(dim + self.mlp.out_dim, head_hidden, "relu")
        self.out = Float32Linear(self.head.out_dim, 1)
        # FuxiCTR resets exact nn.Linear layers only: the attention keeps torch's initialisation
        init_weights(self, keep=(nn.MultiheadAttention,))

    def forward(self, batch):  # -> logits [B]
        seq = batch["item_seq"]  # [B, L]
        x_t, x_b = self.items(batch["item_id"], seq)  # [B, I], [B, L, I]
        x0 = torch.cat([self.levels(batch["likes_level"], batch["views_level"]), x_t,
                        self.sequence(x_t, x_b, seq)], -1)  # [B, D]
        return self.out(self.head(torch.cat([self.cross(x0), self.mlp(x0)], -1))).squeeze(-1)
