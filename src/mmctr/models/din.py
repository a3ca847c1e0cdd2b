"""DIN (Zhou et al., KDD 2018), the organisers' official baseline, plain or inside TF4CTR.

The attention unit pools the history against the target; [likes/views embeddings, target item,
pooled interest] (FeatureEmbedding) goes through a deep MLP. target_attention_layers > 0 appends a
multi-head target attention's output (layers.TargetAttention, MHTA) to that input, beside the
pooled interest, as the 0.9853 valid-AUC Task 2 solution does; 0 (default) is the released DIN.
"""
from typing import Literal

from .layers import (Count, Fraction, MLP, CTRModel, DINAttention, FeatureEmbedding, Float32Linear, TargetAttention,
                     init_weights)
from .tf4ctr import TF4CTR


def din_attention(hidden, activation, dropout, softmax):
    return lambda dim: DINAttention(dim, hidden, activation, dropout, softmax)


def target_attention(n_layers, n_heads, dropout):
    """The factory of the optional MHTA beside the pooling, None when n_layers is 0 (nothing built)."""
    if n_layers == 0:
        return None
    return lambda dim: TargetAttention(dim, n_layers, n_heads, dropout)


class DIN(CTRModel):
    """[levels, target, attention-pooled interest (, MHTA output)] [B, 2E + 2I (+ I)] -> MLP -> Linear -> 1."""

    def __init__(self, tables, emb_dim=64, mm_dim=128, attention_hidden=(512, 256),
                 attention_activation: Literal["relu", "dice", "prelu"] = "relu", attention_dropout: Fraction = 0.1,
                 attention_softmax=False, mlp_hidden=(1024, 512, 256),
                 mlp_activation: Literal["relu", "prelu", "dice"] = "relu", dropout: Fraction = 0.1, batch_norm=True,
                 table_mode: Literal["auto", "gather", "table"] = "auto", target_attention_layers: Count = 0,
                 target_attention_heads: int = 4, target_attention_dropout: Fraction = 0.1):
        super().__init__()
        pool = din_attention(attention_hidden, attention_activation, attention_dropout, attention_softmax)
        mhta = target_attention(target_attention_layers, target_attention_heads, target_attention_dropout)
        self.embedding = FeatureEmbedding(tables, emb_dim, pool, table_mode, mm_dim, mhta)
        self.mlp = MLP(self.embedding.out_dim, mlp_hidden, mlp_activation, batch_norm, dropout)
        self.out = Float32Linear(self.mlp.out_dim, 1)
        init_weights(self)

    def forward(self, batch):  # -> logits [B]
        return self.out(self.mlp(self.embedding(batch))).squeeze(-1)


def din_tf4ctr(tables, emb_dim=64, mm_dim=128, attention_hidden=(512, 256),
               attention_activation: Literal["relu", "dice", "prelu"] = "relu", attention_dropout: Fraction = 0.1,
               attention_softmax=False, mlp_hidden=(1024, 512, 256),
               mlp_activation: Literal["relu", "prelu", "dice"] = "relu", dropout: Fraction = 0.1, batch_norm=True,
               table_mode: Literal["auto", "gather", "table"] = "auto", target_attention_layers: Count = 0,
               target_attention_heads: int = 4, target_attention_dropout: Fraction = 0.1,
               simple_hidden=(256,), ssem="ser", dfm="wsf", c=0.8, gamma=2.0, alpha=0.25):
    """DIN in TF4CTR.

    The split: the embedder includes the attention pooling, so under SER each embedder attends
    with its own unit at its own width and the two encoders really see different interests;
    DIN's deep MLP is the complex encoder and a shallow MLP (simple_hidden, one layer by default)
    the simple one, as TF4CTR does for a plain DNN. The optional MHTA belongs to the embedder too:
    under SER each embedder has its own at its own item width (the heads must divide both).
    """
    pool = din_attention(attention_hidden, attention_activation, attention_dropout, attention_softmax)
    mhta = target_attention(target_attention_layers, target_attention_heads, target_attention_dropout)
    return TF4CTR(
        make_embedder=lambda e: FeatureEmbedding(tables, e, pool, table_mode, mm_dim, mhta),
        make_simple=lambda d: MLP(d, simple_hidden, mlp_activation, batch_norm, dropout),
        make_complex=lambda d: MLP(d, mlp_hidden, mlp_activation, batch_norm, dropout),
        emb_dim=emb_dim, dropout=dropout, batch_norm=batch_norm, ssem=ssem, dfm=dfm, c=c, gamma=gamma,
        alpha=alpha)
