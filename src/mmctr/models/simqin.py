"""SimQIN: the repo's own model. QIN (ASTA + QNN, the 2nd place) with the inputs the winners found
after the deadline or left as future work:

- semantic similarity counts (the 1st-place team's future work): K soft counts of the recent history
  items whose frozen multimodal vector is close to the target's,
      c_k = log1p(sum_j r_k(j) ReLU(s_j - tau_k) / 0.05),
  s_j the cosine of the target's and history item j's 128-d vectors, r_k(j) = exp(-(L - 1 - j) / rho_k)
  a recency decay, with a threshold tau_k and a decay rho_k learned per count. A target attention
  over learned embeddings finds such items only as far as its embeddings keep the semantics; the
  counts hand it the similarity itself;
- the plain mean of the history items: the user's taste as a whole, which a target attention reads
  only through the items it attends to;
- the user_id embedding of QIN's stronger variant (its authors' 0.9838 valid AUC run after the
  deadline); user_min_rows > 0 gives a row only to the users with at least that many train rows
  (tables["user_rows"]), every other user the zero padding row: a user table where a user's rows
  can teach it something, and none where they cannot.

X_0 = [user (E), likes/views (2E), target x_t (I), ASTA output o (I), history mean m (I), counts (K)]
goes through QIN's QNN. Every part has a switch (similarity, mean_pool, use_user_id) for the
ablation in docs/OWN_MODEL.md; semantic_codes (off) adds the 1st-place team's other future-work
idea, learned embeddings of residual k-means codes of the multimodal vectors, measured there too.
target_attention_layers > 0 (off: 0) adds a multi-head target attention's output (layers.TargetAttention,
MHTA, I wide) after o, a softmax reading of the history beside ASTA's sparse one; senet (off) gates the
fields of X_0 (user, likes, views, x_t, o, MHTA, m, counts) by squeeze-and-excitation (layers.SENet)
before the QNN.
"""
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Count, Fraction, ASTA, QNN, CTRModel, Float32Linear, ItemEncoder, LevelEmbedding,
                     SENet, TargetAttention, init_weights, masked_mean)


class SimilarityCounts(nn.Module):
    """K learned soft counts of history items close to the target in the frozen multimodal space.

    Thresholds start spread over [0, 0.9] (the strictest first), decays alternate between the whole
    history and its last 8 items, so the counts begin as different questions."""

    def __init__(self, item_emb, n_counts=8, seq_len=64):
        super().__init__()
        # in the default dtype (float32; a float64 build is exact to its last bit on any CPU); the
        # padding row stays zero: cosine 0
        unit = F.normalize(item_emb.to(torch.get_default_dtype()), dim=1)
        self.register_buffer("unit", unit, persistent=False)  # [V, 128], rebuilt from the tables
        self.tau = nn.Parameter(torch.linspace(0.9, 0.0, n_counts))  # [K]
        self.log_rho = nn.Parameter(torch.tensor([math.log(seq_len if k % 2 == 0 else 8.0)
                                                  for k in range(n_counts)]))  # [K]
        self.register_buffer("age", torch.arange(seq_len - 1, -1, -1, dtype=torch.float32),
                             persistent=False)  # [L]: slot L-1 is the most recent click
        self.out_dim = n_counts

    def forward(self, item_id, item_seq):  # [B], [B, L] -> [B, K]
        with torch.autocast(item_id.device.type, enabled=False):  # cosines near tau need float32
            q = F.embedding(item_id, self.unit).unsqueeze(2)  # [B, 128, 1]
            s = torch.bmm(F.embedding(item_seq, self.unit), q).squeeze(2)  # [B, L]
            above = torch.relu(s.unsqueeze(1) - self.tau.view(1, -1, 1))  # [B, K, L]
            # the mask after the ReLU: a threshold learned below 0 must not count the padding
            above = above * (item_seq > 0).unsqueeze(1)
            recency = torch.exp(-self.age[-item_seq.shape[1]:] / self.log_rho.exp().unsqueeze(1))  # [K, L]
            return torch.log1p(torch.einsum("bkl,kl->bk", above, recency) / 0.05)


def residual_codes(vectors, n_codes, levels, iterations=10, seed=0):
    """Residual k-means codes of the rows of ``vectors`` [V, d] (row 0, the padding item, excluded):
    level 1 clusters the unit vectors, each next level the residuals the previous one left.
    Returns int64 codes [V, levels] in 1..n_codes (0 for the padding row). Deterministic: the
    initial centroids are rows drawn by a generator of its own."""
    x = F.normalize(vectors[1:].to(torch.get_default_dtype()), dim=1)
    generator = torch.Generator().manual_seed(seed)
    codes = torch.zeros(vectors.shape[0], levels, dtype=torch.int64)
    for level in range(levels):
        k = min(n_codes, x.shape[0])
        centroids = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
        for _ in range(iterations):
            assign = torch.cdist(x, centroids).argmin(1)  # [V-1]
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # empty: kept
        assign = torch.cdist(x, centroids).argmin(1)
        codes[1:, level] = assign + 1
        x = x - centroids[assign]
    return codes


class SemanticCodes(nn.Module):
    """A learned embedding per residual k-means code of the frozen multimodal vectors, summed over
    the levels (the 1st-place team's other future work, their Transformer_DCN_Quant): items with
    close vectors share rows, so a rare item borrows what its semantic neighbours learned."""

    def __init__(self, item_emb, emb_dim, n_codes=256, levels=2):
        super().__init__()
        self.register_buffer("codes", residual_codes(item_emb, n_codes, levels), persistent=False)  # [V, levels]
        self.tables = nn.ModuleList(nn.Embedding(n_codes + 1, emb_dim, padding_idx=0) for _ in range(levels))
        self.out_dim = emb_dim

    def forward(self, ids):  # [...] -> [..., E]
        codes = self.codes[ids]  # [..., levels]
        return sum(table(codes[..., level]) for level, table in enumerate(self.tables))


class SimQIN(CTRModel):
    def __init__(self, tables, emb_dim=128, mm_dim=128, qnn_layers=4, qnn_m=4,
                 qnn_activation: Literal["prelu", "relu"] = "prelu", dropout: Fraction = 0.1, batch_norm=True,
                 similarity=True, n_counts=8, mean_pool=True, use_user_id=True, semantic_codes=False,
                 n_codes=256, code_levels=2, asta_bias=False,
                 table_mode: Literal["auto", "gather", "table"] = "auto", target_attention_layers: Count = 0,
                 target_attention_heads: int = 4, target_attention_dropout: Fraction = 0.1, user_min_rows: Count = 0,
                 senet=False, senet_reduction: int = 3, senet_activation: Literal["relu", "sigmoid"] = "relu"):
        super().__init__()
        self.items = ItemEncoder(tables, emb_dim, table_mode, mm_dim)
        self.levels = LevelEmbedding(tables["n_levels"], emb_dim)
        # semantic codes widen every item by E: [id, tags, multimodal, codes]
        self.codes = SemanticCodes(tables["item_emb"], emb_dim, n_codes, code_levels) if semantic_codes else None
        item_dim = self.items.out_dim + (emb_dim if semantic_codes else 0)
        self.asta = ASTA(item_dim, out_bias=asta_bias)
        self.mhta = None
        if target_attention_layers > 0:
            self.mhta = TargetAttention(item_dim, target_attention_layers, target_attention_heads,
                                        target_attention_dropout)
        self.mean_pool = mean_pool
        self.counts = SimilarityCounts(tables["item_emb"], n_counts) if similarity else None
        # user 0 is the padding index, as FuxiCTR builds every categorical feature
        self.user = None
        self.register_buffer("user_row", None, persistent=False)  # [U] when user_min_rows > 0
        if use_user_id and user_min_rows > 0:
            if "user_rows" not in tables:
                raise ValueError("user_min_rows: the tables carry no user_rows (the train rows of each user)")
            kept = tables["user_rows"] >= user_min_rows  # [U]
            kept[0] = False
            # user -> its row: 1..n kept users in id order, 0 (padding, zeros) for the others
            self.user_row = torch.cumsum(kept, 0) * kept  # [U]
            self.user = nn.Embedding(int(kept.sum()) + 1, emb_dim, padding_idx=0)
        elif use_user_id:
            self.user = nn.Embedding(tables["n_users"], emb_dim, padding_idx=0)
        n_item_parts = 2 + int(mean_pool) + int(self.mhta is not None)  # x_t, o (, m) (, MHTA)
        n_fields = 2 + n_item_parts + int(similarity) + int(use_user_id)  # likes, views, items (, counts) (, user)
        self.senet = SENet(n_fields, senet_reduction, senet_activation) if senet else None
        dim = (2 * emb_dim + n_item_parts * item_dim + (emb_dim if use_user_id else 0)
               + (n_counts if similarity else 0))
        self.interaction = QNN(dim, qnn_layers, qnn_m, dropout, batch_norm, qnn_activation)
        self.out = Float32Linear(self.interaction.out_dim, 1)
        init_weights(self)

    def forward(self, batch):  # -> logits [B]
        seq = batch["item_seq"]  # [B, L]
        mask = seq > 0
        x_t, x_b = self.items(batch["item_id"], seq)  # [B, I], [B, L, I]
        if self.codes is not None:  # items I + E wide
            x_t = torch.cat([x_t, self.codes(batch["item_id"]).to(x_t.dtype)], -1)
            x_b = torch.cat([x_b, self.codes(seq).to(x_b.dtype)], -1)
        features = [*self.levels(batch["likes_level"], batch["views_level"]).chunk(2, -1), x_t,  # 2 [B, E], [B, I]
                    self.asta(x_t, x_b, mask)]  # [B, I]
        if self.mhta is not None:
            features.append(self.mhta(x_t, x_b, mask))  # [B, I]
        if self.mean_pool:
            features.append(masked_mean(x_b, mask))  # [B, I]
        if self.counts is not None:
            features.append(self.counts(batch["item_id"], seq).to(x_t.dtype))  # [B, K]
        if self.user is not None:
            user = batch["user_id"] if self.user_row is None else self.user_row[batch["user_id"]]
            features.insert(0, self.user(user))  # [B, E]
        if self.senet is not None:
            features = self.senet(features)
        x = torch.cat(features, -1)  # [B, D]
        return self.out(self.interaction(x)).squeeze(-1)
