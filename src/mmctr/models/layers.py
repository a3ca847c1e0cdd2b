"""Building blocks shared by every model: the item encoder, MLPs, attention and interaction layers.

Imports torch alone, as every model file does (layers, qin, tf4ctr, dcnv2, din, transformer_dcn,
simqin), so they can be pasted into a notebook as they are. Shapes: B batch, L history length (64),
E embedding width, I = 2E + M item width (M: the multimodal width, 128 as released).
"""
import math
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def init_weights(model, keep=()):
    """FuxiCTR's initialisation, which the released QIN and the official DIN use.

    Embeddings N(0, 1e-4) (tiny, so the frozen multimodal vector dominates the item at the start),
    Linear weights xavier-normal with zero bias. Modules of the types in ``keep``, and everything
    inside them, keep torch's own initialisation.
    """
    kept = {id(inner) for m in model.modules() if isinstance(m, keep) for inner in m.modules()}
    for m in model.modules():
        if id(m) in kept:
            continue
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1e-4)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def masked_mean(x, mask):
    """Mean of x [B, L, d] over the positions where mask [B, L] holds; all-padding rows give zeros."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def masked_softmax(s, mask):
    """Softmax of scores s [B, L] over the unmasked positions; padding gets -inf first.

    An all-padding row would be all -inf (NaN in forward and backward), so its scores are replaced
    by zeros and the mask then zeroes its weights.
    """
    s = torch.where(mask.any(-1, keepdim=True), s.masked_fill(~mask, float("-inf")), 0.0)
    return torch.softmax(s, -1) * mask


LOSS_FORMS = ("logits", "fuxictr")


def bce(logits, label, form="logits", reduction="mean"):
    """Binary cross-entropy of click logits [B] against 0/1 labels [B], computed in float32.

    logits: torch's stable form from the logits. fuxictr: BCE of the float32 probability
    sigmoid(logit), as every released model computes it (they output probabilities and FuxiCTR
    takes F.binary_cross_entropy of them). Equal up to rounding, except for a row whose probability
    rounds to exactly 1.0 (a logit above about 16.6) or 0.0 (below about -88) against its label:
    its log is clamped at -100 and its gradient is exactly zero, where the logits form gives it
    p - y (docs/REPRODUCTION.md).
    """
    check_choice("loss", form, LOSS_FORMS)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for a float64 model
    logits, label = logits.to(dtype), label.to(dtype)
    if form == "logits":
        return F.binary_cross_entropy_with_logits(logits, label, reduction=reduction)
    # autocast refuses binary_cross_entropy on CUDA; the probabilities are float32 already
    with torch.autocast(logits.device.type, enabled=False):
        p = torch.sigmoid(logits)
        # binary_cross_entropy refuses a NaN probability (on CUDA, a device-side assert that kills
        # the process): a diverged model's NaN rows go in as 0.5 and their NaN is added back to the
        # loss's value (elsewhere an exact +0, and no gradient), so that fit reports the divergence
        p_number = p.nan_to_num(0.5)
        nan_back = (p - p_number).detach()
        loss = F.binary_cross_entropy(p_number, label, reduction=reduction)
        return loss + (nan_back if reduction == "none" else nan_back.sum())


# Bounds of the models' keyword arguments, on the argument itself: the config loader
# (src/mmctr/model_config.py) checks a config's values against them
Fraction = Annotated[float, {"range": (0, 1)}]   # a dropout rate, a weight in [0, 1]
NonNegative = Annotated[float, {"min": 0}]
Count = Annotated[int, {"min": 0}]   # a number of layers where 0 switches the part off


class CTRModel(nn.Module):
    """A model mapping a batch to click logits [B], trained with binary cross-entropy (``bce``)."""

    def loss(self, batch, label, form="logits"):
        logits = self(batch)
        return bce(logits, label, form), logits


class Float32Linear(nn.Linear):
    """A Linear that stays in float32 under autocast, for the logits: a bfloat16 logit keeps about
    three significant digits, which ties thousands of test predictions and costs AUC."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))  # float32 (float64 in a float64 model)


class MultimodalProjection(nn.Linear):
    """W_mm: the frozen 128-d multimodal vector -> mm_dim, no bias. It belongs to the embedding
    module (FuxiCTR's FeatureEmbedding holds it), so the embedding L2 covers it too: the training
    loop decays every module marked ``embedding_l2``."""
    embedding_l2 = True

    def __init__(self, in_dim, out_dim):
        super().__init__(in_dim, out_dim, bias=False)


def to_autocast_dtype(x):
    """x in autocast's dtype where autocast is on (else x itself, as on every CPU run). The layers
    that multiply the items (einsums, Linear) cast them to that dtype anyway: casting the [V, I]
    table once replaces a cast of the gathered [B, 1 + L, I] history at each of them, and the
    elementwise readers (the masked mean) then also run in bfloat16, within its rounding."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


class ItemEncoder(nn.Module):
    """An item as [item_id embedding, mean tag embedding, W_mm * multimodal vector]: width I = 2E + M.

    M = mm_dim: the released models keep the multimodal feature at its own width, 128, whatever E is
    (FuxiCTR's embedding-type feature); mm_dim=None gives M = E. Item 0 and tag 0 are padding:
    fixed zero rows (padding_idx 0), as in FuxiCTR's tables.

    The multimodal vectors (item_emb) and tag lists (item_tags) are frozen data held as buffers
    that are not saved (persistent=False): they are rebuilt from the processed tables at load time.
    The representation depends on the item id alone, so when a batch looks up more ids than the
    vocabulary holds it is cheaper to encode the whole table once and gather rows ('table') than
    to encode every lookup ('gather'); 'auto' picks per call. Both are the same function.
    """

    def __init__(self, tables, emb_dim, table_mode="auto", mm_dim=None):
        super().__init__()
        check_choice("table_mode", table_mode, ("auto", "gather", "table"))
        mm_dim = mm_dim or emb_dim
        self.table_mode = table_mode
        self.register_buffer("item_tags", tables["item_tags"], persistent=False)  # [V, 5] int
        self.register_buffer("item_emb", tables["item_emb"], persistent=False)  # [V, 128] float
        self.item_id = nn.Embedding(self.item_tags.shape[0], emb_dim, padding_idx=0)
        self.tag = nn.Embedding(tables["n_tags"], emb_dim, padding_idx=0)
        self.mm = MultimodalProjection(self.item_emb.shape[1], mm_dim)
        self.out_dim = 2 * emb_dim + mm_dim

    def encode(self, id_vec, tags, mm_vec):  # [N, E], [N, 5], [N, 128] -> [N, I]
        # embedding_bag 'mean' with padding_idx leaves padding tags out of the mean and gives
        # zeros for an all-padding list, without materialising [N, 5, E]
        tag_mean = F.embedding_bag(tags, self.tag.weight, mode="mean", padding_idx=0)
        return torch.cat([id_vec, tag_mean, self.mm(mm_vec.to(self.mm.weight.dtype))], -1)

    def forward(self, item_id, item_seq):  # [B], [B, L] -> x_t [B, I], x_b [B, L, I]
        ids = torch.cat([item_id.unsqueeze(1), item_seq], 1)  # [B, 1 + L]
        mode = self.table_mode
        if mode == "auto":
            mode = "table" if ids.numel() > self.item_tags.shape[0] else "gather"
        if mode == "table":
            table = self.encode(self.item_id.weight, self.item_tags, self.item_emb)  # [V, I]
            x = F.embedding(ids, to_autocast_dtype(table))
        else:
            flat = ids.reshape(-1)
            x = self.encode(self.item_id(flat), self.item_tags[flat], self.item_emb[flat])
            x = to_autocast_dtype(x).view(*ids.shape, -1)
        # split, not x[:, 0] and x[:, 1:]: its backward concatenates the two gradients, where
        # indexing would zero-fill a [B, 1 + L, I] gradient for each part and add them
        x_t, x_b = x.split([1, item_seq.shape[1]], dim=1)
        return x_t.squeeze(1), x_b


class LevelEmbedding(nn.Module):
    """likes_level and views_level embeddings, concatenated: [*] x 2 -> [*, 2E]. Level 0 is a fixed
    zero vector (padding_idx 0), as in the released FuxiCTR feature config."""

    def __init__(self, n_levels, emb_dim):
        super().__init__()
        self.likes = nn.Embedding(n_levels, emb_dim, padding_idx=0)
        self.views = nn.Embedding(n_levels, emb_dim, padding_idx=0)

    def forward(self, likes_level, views_level):
        return torch.cat([self.likes(likes_level), self.views(views_level)], -1)


class FeatureEmbedding(nn.Module):
    """[likes/views embeddings, target item, pooled history]: width 2E + 2I (QIN's X_0 layout).

    The input of DCNv2 and DIN, and the embedder TF4CTR's SSEM builds for them.
    make_pool(I) gives the history pooling, a module (x_t [B, I], x_b [B, L, I], mask [B, L]) -> [B, I].
    make_mhta(I), when given, a second such module whose output is appended (width 2E + 3I): DIN's
    optional multi-head target attention (TargetAttention) beside its own pooling.
    """

    def __init__(self, tables, emb_dim, make_pool, table_mode="auto", mm_dim=None, make_mhta=None):
        super().__init__()
        self.items = ItemEncoder(tables, emb_dim, table_mode, mm_dim)
        self.levels = LevelEmbedding(tables["n_levels"], emb_dim)
        self.pool = make_pool(self.items.out_dim)
        self.mhta = make_mhta(self.items.out_dim) if make_mhta is not None else None
        self.out_dim = 2 * emb_dim + (2 if self.mhta is None else 3) * self.items.out_dim

    def forward(self, batch):  # -> [B, 2E + 2I] (+ I with the MHTA)
        x_t, x_b = self.items(batch["item_id"], batch["item_seq"])
        mask = batch["item_seq"] > 0
        parts = [self.levels(batch["likes_level"], batch["views_level"]), x_t, self.pool(x_t, x_b, mask)]
        if self.mhta is not None:
            parts.append(self.mhta(x_t, x_b, mask))
        return torch.cat(parts, -1)


class MeanPooling(nn.Module):
    """Masked mean of the history, ignoring the target: the baseline pooling."""

    def forward(self, x_t, x_b, mask):  # [B, I], [B, L, I], [B, L] -> [B, I]
        return masked_mean(x_b, mask)


class Dice(nn.Module):
    """DIN's data-adaptive activation: p = sigmoid(BN(x)), f(x) = p x + (1 - p) alpha x. The
    BatchNorm's eps and momentum are FuxiCTR's (1e-9, 0.01: slow running statistics for eval)."""

    def __init__(self, dim, eps=1e-9):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=0.01, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x):  # [..., dim]; statistics over every leading position
        p = torch.sigmoid(self.bn(x.reshape(-1, x.shape[-1]))).view_as(x)
        return x * (p + (1 - p) * self.alpha)


def make_activation(name, dim):
    """An MLP's hidden activation over dim units, as FuxiCTR builds it: PReLU with one slope per
    unit starting at 0.1, Dice per unit. (QNN's PReLU is the released QIN's: one slope, at 0.25.)"""
    check_choice("activation", name, ("relu", "prelu", "dice"))
    return {"relu": nn.ReLU, "prelu": lambda: nn.PReLU(dim, init=0.1), "dice": lambda: Dice(dim)}[name]()


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer; out_dim = last hidden width.

    Batch norm expects [B, d] input; without it any leading shape works.
    """

    def __init__(self, in_dim, hidden, activation="relu", batch_norm=False, dropout=0.0):
        layers = []
        for width in hidden:
            layers.append(nn.Linear(in_dim, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(activation, width))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        super().__init__(*layers)
        self.out_dim = in_dim


class ASTA(nn.Module):
    """Adaptive Sparse Target Attention (QIN): single-head target attention, ReLU instead of softmax.

    s_j = m_j (q . k_j) / sqrt(A), o = W_o sum_j ReLU(s_j) v_j + x_t, with q = W_q x_t, k_j = W_k x_bj,
    v_j = W_v x_bj, A = 2I, no biases (out_bias: W_o with a bias, the authors' later variant). The
    padding mask multiplies the scores before the activation, as released. Single-head projections
    reassociate: q . k_j = (W_k^T q) . x_bj and sum_j a_j v_j = W_v (sum_j a_j x_bj), so the fast form
    (default) never projects the L history items; fast=False is the literal form (same function, for
    checking).
    activation 'softmax' is the paper's ablation; dropout (on the weights) another.
    """

    def __init__(self, dim, activation="relu", dropout=0.0, fast=True, out_bias=False):
        super().__init__()
        check_choice("attention", activation, ("relu", "softmax"))
        attn_dim = 2 * dim  # A, as released
        self.W_q = nn.Linear(dim, attn_dim, bias=False)
        self.W_k = nn.Linear(dim, attn_dim, bias=False)
        self.W_v = nn.Linear(dim, attn_dim, bias=False)
        self.W_o = nn.Linear(attn_dim, dim, bias=out_bias)
        self.activation, self.fast, self.scale = activation, fast, 1 / math.sqrt(attn_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_t, x_b, mask):  # [B, I], [B, L, I], [B, L] bool -> [B, I]
        q = self.W_q(x_t)  # [B, A]
        if self.fast:
            s = torch.einsum("bli,bi->bl", x_b, q @ self.W_k.weight)  # W_k.weight: [A, I]
        else:
            s = torch.einsum("bla,ba->bl", self.W_k(x_b), q)
        s = s * self.scale  # [B, L]
        a = torch.relu(s * mask) if self.activation == "relu" else masked_softmax(s, mask)
        a = self.dropout(a)
        if self.fast:
            o = self.W_v(torch.einsum("bl,bli->bi", a, x_b))
        else:
            o = torch.einsum("bl,bla->ba", a, self.W_v(x_b))
        return self.W_o(o) + x_t


class DINAttention(nn.Module):
    """DIN's local activation unit: score_j = MLP([q, k_j, q - k_j, q * k_j]) -> 1, masked weighted sum.

    Like FuxiCTR's DIN (the organisers' baseline), the attention dropout sits in the unit's hidden
    layers; weights are the raw masked scores unless softmax is asked for.
    """

    def __init__(self, dim, hidden=(512, 256), activation="relu", dropout=0.0, softmax=False):
        super().__init__()
        if not hidden:
            raise ValueError("attention_hidden: the attention unit needs at least one hidden layer")
        self.input = nn.Linear(4 * dim, hidden[0])  # the first layer, on [q, k, q - k, q * k]
        self.act = nn.Sequential(make_activation(activation, hidden[0]), nn.Dropout(dropout))
        self.mlp = MLP(hidden[0], hidden[1:], activation, dropout=dropout)
        self.score = nn.Linear(self.mlp.out_dim, 1)
        self.softmax = softmax

    def forward(self, x_t, x_b, mask):  # [B, I], [B, L, I], [B, L] bool -> [B, I]
        # [q, k, q - k, q * k] W^T = q (W_1 + W_3)^T + k (W_2 - W_3)^T + (q * k) W_4^T: the target's
        # term once per row instead of once per history item, and no [B, L, 4I] concatenation
        w_q, w_k, w_diff, w_prod = self.input.weight.chunk(4, dim=1)  # [h, I] each
        h = (F.linear(x_t, w_q + w_diff, self.input.bias).unsqueeze(1) + F.linear(x_b, w_k - w_diff)
             + F.linear(x_t.unsqueeze(1) * x_b, w_prod))  # [B, L, h]
        # the unit's MLP on [B * L, h] rows, as FuxiCTR's: a per-unit PReLU or Dice acts on the units
        s = self.score(self.mlp(self.act(h.flatten(0, 1)))).view(mask.shape)  # [B, L]
        a = masked_softmax(s, mask) if self.softmax else s * mask
        return torch.einsum("bl,bli->bi", a, x_b)


class RMSNorm(nn.Module):
    """x / sqrt(mean_i x_i^2 + eps) * g (Zhang & Sennrich 2019): LayerNorm without the centring and
    the bias. Computed in float32 at least (a bfloat16 mean of squares loses the scale), returned in
    x's dtype. Own module: torch's nn.RMSNorm is not in every torch this repo supports."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))  # g
        self.eps = eps

    def forward(self, x):  # [..., dim] -> [..., dim]
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


class TargetAttentionLayer(nn.Module):
    """One layer of multi-head target attention: the target (one query token) reads the history.

        h = RMSNorm_kv(x_b)                                        pre-norm, keys and values only
        a = MHA(q = W_q x, k = W_k h, v = W_v h), W_o on the heads, padding masked
        x = RMSNorm_out(x + Dropout(a))                            post-norm
        out = x + Dropout(FFN(x)),  FFN = Linear -> ReLU -> Dropout -> Linear  (I -> I -> I)

    Heads: H of width d = I / H, scores q_h . k_hj / sqrt(d), a softmax per head over the real
    history items (masked_softmax: an all-padding row gets zero weights, so a = W_o's bias, finite in
    forward and backward), dropout on the weights. W_k has no bias: q_h . b_k,h is the same for every
    j and cancels in the softmax. The two norms are separate modules (the reference solution shares
    one): the gain that shapes what the attention reads then need not be the gain of what the layer
    writes, for I parameters more.

    fast (default) never projects the L history items: per head q_h . W_k,h h_j = (W_k,h^T q_h) . h_j
    and sum_j a_hj (W_v,h h_j + b_v,h) = W_v,h (sum_j a_hj h_j) + b_v,h sum_j a_hj, so the history is
    only read by two einsums of B H L I multiply-adds, not projected by two of B L I^2 (H = 4, I = 256:
    64 times fewer; as ASTA's fast form); fast=False is the literal form, the same function, for checking.
    """

    def __init__(self, dim, n_heads=4, dropout=0.1, fast=True):
        super().__init__()
        if n_heads < 1 or dim % n_heads:
            raise ValueError(f"target_attention_heads: {n_heads} heads do not divide the item width {dim}")
        self.n_heads, self.head_dim, self.fast = n_heads, dim // n_heads, fast
        self.norm_kv, self.norm_out = RMSNorm(dim), RMSNorm(dim)
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(dim, dim, bias=False)
        self.W_v = nn.Linear(dim, dim)
        self.W_o = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)  # on the attention weights and both residual branches

    def forward(self, x, x_b, mask):  # query [B, I], history [B, L, I], mask [B, L] bool -> [B, I]
        B, I = x.shape
        H, d = self.n_heads, self.head_dim
        h = self.norm_kv(x_b)  # [B, L, I]
        q = self.W_q(x).view(B, H, d)  # [B, H, d]
        if self.fast:
            q_k = torch.einsum("bhd,hdi->bhi", q, self.W_k.weight.view(H, d, I))  # W_k,h^T q_h [B, H, I]
            s = torch.einsum("bhi,bli->bhl", q_k, h)  # [B, H, L]
        else:
            k = self.W_k(h).view(B, -1, H, d)  # [B, L, H, d]
            s = torch.einsum("bhd,blhd->bhl", q, k)
        a = self.dropout(masked_softmax(s / math.sqrt(d), mask.unsqueeze(1)))  # [B, H, L]
        if self.fast:
            ctx = torch.einsum("bhl,bli->bhi", a, h)  # [B, H, I]
            o = torch.einsum("bhi,hdi->bhd", ctx, self.W_v.weight.view(H, d, I))  # [B, H, d]
            o = o + self.W_v.bias.view(H, d) * a.sum(-1, keepdim=True)
        else:
            v = self.W_v(h).view(B, -1, H, d)  # [B, L, H, d]
            o = torch.einsum("bhl,blhd->bhd", a, v)
        x = self.norm_out(x + self.dropout(self.W_o(o.reshape(B, I))))  # [B, I]
        return x + self.dropout(self.ffn(x))


class TargetAttention(nn.Module):
    """MHTA: a stack of TargetAttentionLayer, the target x_t the first query, each next layer's query
    the previous output, every layer reading the same un-normalised history x_b.

    After the 0.9853 valid-AUC Task 2 solution (Gavin113/WWW2025_MMCTR, DIN_att6.py: 2 layers, 4
    heads, dropout 0.1, RMSNorm eps 1e-6), whose output joins DIN's MLP input. It projects q, k and
    v twice (its own Linears, then nn.MultiheadAttention's in-projection): here once per layer, the
    same function class (two stacked affine maps are one) with fewer parameters. Per layer:
    6 I^2 + 7 I parameters (W_q, W_v, W_o with bias, W_k without; FFN 2 (I^2 + I); the two gains).
    """

    def __init__(self, dim, n_layers=2, n_heads=4, dropout=0.1, fast=True):
        super().__init__()
        self.layers = nn.ModuleList(TargetAttentionLayer(dim, n_heads, dropout, fast) for _ in range(n_layers))
        self.out_dim = dim

    def forward(self, x_t, x_b, mask):  # [B, I], [B, L, I], [B, L] bool -> [B, I]
        x = x_t
        for layer in self.layers:
            x = layer(x, x_b, mask)
        return x


class SENet(nn.Module):
    """Squeeze-and-excitation over feature fields (FiBiNET's SENET layer, FuxiCTR's
    SqueezeExcitation; the Task 2 award paper puts one on DIN beside its multi-head target
    attention): every field squeezed to its mean, a bottleneck without biases turns the F means
    into F gates, every field scaled by its own gate.

        z_f = mean_i v_f,i                                       [B, F]
        A = act(W_2 ReLU(W_1 z)),  W_1: F -> max(1, F // r), W_2: back to F
        v_f <- A_f v_f

    Fields may differ in width (SimQIN's X_0 has fields of E, I and K); each is squeezed over its
    own width. act: ReLU as FuxiCTR's default (a gate can shut a field for a row), or sigmoid.
    """

    def __init__(self, n_fields, reduction_ratio=3, activation="relu"):
        super().__init__()
        check_choice("senet_activation", activation, ("relu", "sigmoid"))
        hidden = max(1, n_fields // reduction_ratio)
        self.excitation = nn.Sequential(nn.Linear(n_fields, hidden, bias=False), nn.ReLU(),
                                        nn.Linear(hidden, n_fields, bias=False),
                                        nn.ReLU() if activation == "relu" else nn.Sigmoid())

    def forward(self, fields):  # F tensors [B, d_f] -> the same F, gated
        z = torch.stack([f.mean(-1) for f in fields], -1)  # [B, F]
        a = self.excitation(z).to(fields[0].dtype)  # [B, F]
        return [f * a[:, i:i + 1] for i, f in enumerate(fields)]


class CrossNet(nn.Module):
    """DCNv2 cross network, full rank: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, dim, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        self.out_dim = dim

    def forward(self, x0):  # [B, D] -> [B, D]
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class CrossNetMix(nn.Module):
    """DCNv2's low-rank mixture of cross experts (DCN-Mix), per layer l and expert k:

    E_k(x_l) = x_0 * (U_k tanh(C_k tanh(V_k^T x_l)) + b_l),  x_{l+1} = sum_k softmax(G x_l)_k E_k(x_l) + x_l.

    As FuxiCTR's CrossNetMix (which the released DCNv2 models import): one gate matrix G [K, D]
    shared by every layer, and its initialisation: each layer's U, V and C xavier-normal over the
    [K, D, r] and [K, r, r] tensors of all experts, G row by row as K Linear(D -> 1).
    """

    def __init__(self, dim, n_layers, rank=64, n_experts=4):
        super().__init__()
        std_uv = math.sqrt(2 / (rank * (dim + n_experts)))  # xavier-normal of a [K, D, r] tensor
        std_c = math.sqrt(2 / (rank * (rank + n_experts)))  # of a [K, r, r] tensor
        self.V = nn.Parameter(torch.randn(n_layers, n_experts, dim, rank) * std_uv)
        self.C = nn.Parameter(torch.randn(n_layers, n_experts, rank, rank) * std_c)
        self.U = nn.Parameter(torch.randn(n_layers, n_experts, rank, dim) * std_uv)
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        # a Parameter, not a Linear, so that init_weights leaves the Linear(D -> 1) scale alone
        self.gate = nn.Parameter(torch.randn(n_experts, dim) * math.sqrt(2 / (dim + 1)))  # G
        self.out_dim = dim

    def forward(self, x0):  # [B, D] -> [B, D]
        x = x0
        for V, C, U, b in zip(self.V, self.C, self.U, self.bias):
            h = torch.tanh(torch.einsum("bd,kdr->bkr", x, V))  # [B, K, r]
            h = torch.tanh(torch.einsum("bkr,krs->bks", h, C))
            experts = x0.unsqueeze(1) * (torch.einsum("bkr,krd->bkd", h, U) + b)  # [B, K, D]
            x = torch.einsum("bk,bkd->bd", torch.softmax(F.linear(x, self.gate), -1), experts) + x
        return x


class QNN(nn.Module):
    """QIN's Quadratic Neural Network, L layers of the Khatri-Rao quadratic form:

    h = Dropout(Linear(D -> M*D)(x)) as (M, D); x' = x * sum_r h_r; x <- Dropout(act(BN(x'))) + x.
    """

    def __init__(self, dim, n_layers=4, m=4, dropout=0.1, batch_norm=True, activation="prelu"):
        super().__init__()
        check_choice("qnn_activation", activation, ("prelu", "relu"))
        self.linears = nn.ModuleList(nn.Linear(dim, m * dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(dim) if batch_norm else nn.Identity()
                                   for _ in range(n_layers))
        # one PReLU slope per layer, as the released QNN (an MLP's PReLU has one per unit: make_activation)
        self.acts = nn.ModuleList(nn.PReLU() if activation == "prelu" else nn.ReLU() for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.m, self.out_dim = m, dim

    def forward(self, x):  # [B, D] -> [B, D]
        for linear, norm, act in zip(self.linears, self.norms, self.acts):
            # dropout on the [B, M, D] view, not before it: the sum's gradient, broadcast over M, then
            # meets the mask as it is, where a view after the dropout had it copied to [B, M*D] first
            h = self.dropout(linear(x).view(x.shape[0], self.m, -1)).sum(1)  # [B, M, D] -> [B, D]
            x = self.dropout(act(norm(x * h))) + x
        return x
