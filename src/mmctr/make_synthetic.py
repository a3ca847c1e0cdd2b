"""Generate a synthetic dataset in exactly the competition's format, with a known click process.

    python src/make_synthetic.py --preset demo --out data/demo --seed 0

Writes ``train/valid/test/item_info.parquet`` (the real schema, see docs/spec/competition.md), the
per-item levels of ``item_feature.parquet`` (the real file's level columns), the four other 128-d
vectors per item of ``item_emb.parquet`` (the real file's columns; data.item_emb reads one) and,
in ``oracle/``, the true click probability of every row and the hidden test labels. The click
process (documented with its formula in data/README.md) rewards what the real task rewards:

* a sparse target attention: only the few history items very close to the target in semantic
  space matter, so mean pooling of the history dilutes the signal;
* real second-order interactions: the attention match times the target's likes level, and a
  bilinear user-taste x target-semantics term;
* a multimodal vector that carries most of an item's semantics, popularity-skewed items with a
  hidden per-item bias that only an item-id embedding of a frequent item can learn.

Everything is drawn from numpy Generators seeded from ``--seed``: the same seed gives the same
parquet bytes. Rows are generated and written in chunks of 200,000, each with its own generator,
so the full preset fits in 8 GB and ``--workers`` processes can draw the chunks side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mmctr import common
from mmctr.models.metrics import roc_auc
from mmctr.models.schema import EMB_DIM, SEQ_LEN, TAG_SLOTS

LATENT_DIM = 32       # true semantic space the multimodal vector is projected from
SUBTOPICS = 8         # each topic splits into tight clusters; attention fires within a cluster
TIMELINE_LEN = 80     # clicks stored per user; a row sees the last <= 64 before a random point
LEVELS = 11           # likes/views levels 0..10
TARGET_POSITIVE_RATE = 0.25
CHUNK_ROWS = 200_000  # rows generated, and written as one parquet row group, at a time
PILOT_ROWS = 50_000   # rows drawn (then discarded) to solve the intercept for a 25% positive rate

P_TARGET_FROM_INTERESTS = 0.6  # otherwise a popular item from anywhere
P_HISTORY_FROM_INTERESTS = 0.85


@dataclass(frozen=True)
class ClickProcess:
    """The click logit's weights (data/README.md has the formula and why each term is there)."""
    attn_tau: float = 0.75          # cosine threshold: only near-duplicates of the target count
    attn_scale: float = 0.05        # relevance units per log step
    attn_recency: float = 48.0      # history slots over which an item's weight decays by e
    attn_weight: float = 0.9        # alpha: attention match
    attn_x_likes_weight: float = 0.6  # beta: match x centred likes level (second order)
    taste_weight: float = 0.6       # gamma: bilinear user taste x target semantics (second order)
    quality_weight: float = 0.5     # hidden quality, partly visible through likes_level
    item_bias_std: float = 0.5      # hidden per-item bias: learnable only through an item-id embedding
    user_bias_std: float = 0.3      # hidden per-user bias: learnable only through a user-id embedding
    # delta: a hidden, persistent per-user affinity x target semantics, f_u . z_t with f_u a random
    # point of a rank-r subspace of the latent space: visible in no feature (not in the history),
    # learnable only through a user-id embedding crossed with the target, and only with many rows
    # per user. 0 draws nothing (the users' generator then makes exactly the draws it made before).
    user_affinity_weight: float = 0.0
    user_affinity_rank: int = 4     # r: a few numbers per user, so ~100 rows can pin them down
    rows_per_user: int = 0          # > 0: n_users = n_train / rows_per_user instead of the preset's


# --process: "default" is the demo's; "broad" moves the weight to other signals, so that a model
# tuned to one process can be checked on another: a broad, recency-heavy match (items of the same
# topic, the last few clicks) with no likes interaction, a stronger taste term, and users who
# differ more than items. "heavy" is default's match and crosses on the opposite of the real data's
# users (about 1M with a few rows each): ~100 train rows per user, each with a larger hidden bias
# and a hidden persistent affinity, the case where a user-id table pays.
PROCESSES = {
    "default": ClickProcess(),
    "broad": ClickProcess(attn_tau=0.35, attn_scale=0.2, attn_recency=8.0, attn_weight=0.7,
                          attn_x_likes_weight=0.0, taste_weight=1.0, quality_weight=0.7,
                          item_bias_std=0.3, user_bias_std=0.6),
    "heavy": ClickProcess(user_bias_std=0.5, user_affinity_weight=1.0, rows_per_user=100),
}


@dataclass(frozen=True)
class Preset:
    n_train: int
    n_valid: int
    n_test: int
    n_items: int   # item vocabulary, padding item 0 included
    n_users: int   # user ids are 1..n_users
    n_tags: int    # tag vocabulary, padding tag 0 included
    n_topics: int


PRESETS = {
    "tiny": Preset(4_000, 600, 600, n_items=400, n_users=800, n_tags=80, n_topics=8),
    "demo": Preset(150_000, 10_000, 20_000, n_items=3_000, n_users=20_000, n_tags=400, n_topics=30),
    "full": Preset(3_600_000, 10_000, 379_142, n_items=91_718, n_users=1_000_000, n_tags=11_740,
                   n_topics=300),
}

ROW_FIELDS = [
    ("user_id", pa.int64()),
    ("item_seq", pa.list_(pa.int64(), SEQ_LEN)),
    ("item_id", pa.int64()),
    ("likes_level", pa.int64()),
    ("views_level", pa.int64()),
]
TRAIN_SCHEMA = pa.schema(ROW_FIELDS + [("label", pa.int64())])
TEST_SCHEMA = pa.schema([("ID", pa.int64())] + ROW_FIELDS)
ITEM_SCHEMA = pa.schema([
    ("item_id", pa.int64()),
    ("item_tags", pa.list_(pa.int64(), TAG_SLOTS)),
    ("item_emb_d128", pa.list_(pa.float64(), EMB_DIM)),
])
# item_feature.parquet of the real download holds more columns (BERT and CLIP vectors); the per-item
# levels are what a model can use (QIN's stronger variant), one row per real item
ITEM_FEATURE_SCHEMA = pa.schema([("item_id", pa.int64()), ("likes_level", pa.int64()), ("views_level", pa.int64())])
# item_emb.parquet of the real download: four more 128-d vectors per item, keyed by item_id, no row for
# the padding item; what they are is undocumented. Here each is a view of the same latent semantics
# that item_emb_d128 projects, through its own projection and with its own noise (the value: noise
# sd relative to the signal's, item_emb_d128's is 0.15): v3 is cleaner than item_emb_d128, the
# others noisier, so the column data.item_emb picks helps or hurts a model. The element type is not
# documented either: float32 here (half the full preset's bytes of float64; preprocess takes both).
ITEM_EMB_VIEWS = {"item_emb_d128_v1": 0.5, "item_emb_d128_v2": 1.0, "item_emb_d128_v3": 0.05,
                  "item_emb_d128_e4": 2.0}
ITEM_EMB_STREAM = 6  # their generator, [seed, 6]: no other file's draws change with them
ITEM_EMB_SCHEMA = pa.schema([("item_id", pa.int64())]
                            + [(name, pa.list_(pa.float32(), EMB_DIM)) for name in ITEM_EMB_VIEWS])
ORACLE_PROB_SCHEMA = pa.schema([("split", pa.string()), ("row_id", pa.int64()), ("prob", pa.float64())])
TEST_LABEL_SCHEMA = pa.schema([("ID", pa.int64()), ("label", pa.int64())])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# the world: items, users and their click timelines
# ---------------------------------------------------------------------------------------------

@dataclass
class Items:
    semantic: np.ndarray        # float32 [V, d] unit vectors, row 0 zero
    tags: np.ndarray            # int64 [V, 5] left-padded
    emb: np.ndarray             # float64 [V, 128] the multimodal vector
    likes: np.ndarray           # int64 [V] the item's likes level (rows jitter it)
    views: np.ndarray           # int64 [V]
    quality: np.ndarray         # float64 [V] hidden, partly visible through likes
    bias: np.ndarray            # float64 [V] hidden, visible through nothing
    by_topic: np.ndarray        # int64 [V-1] real item ids sorted by topic
    popularity_cdf: np.ndarray  # float64 [V-1] cumulative popularity along by_topic
    topic_cdf_range: np.ndarray  # float64 [T, 2] the cdf interval each topic's items cover


@dataclass
class Users:
    interests: np.ndarray       # int64 [U+1, 3] interest topics (some unused, weight 0)
    interest_cdf: np.ndarray    # float64 [U+1, 3] cumulative interest weights
    timeline: np.ndarray        # int32 [U+1, TIMELINE_LEN] clicked items, oldest first
    timeline_len: np.ndarray    # int64 [U+1]
    taste: np.ndarray           # float32 [U+1, d] M @ (mean semantic vector of the timeline)
    bias: np.ndarray            # float64 [U+1] hidden
    affinity: np.ndarray | None = None  # float32 [U+1, d] hidden, W g_u (process.user_affinity_weight > 0)


def sample_popular_items(items: Items, n: int, rng) -> np.ndarray:
    u = rng.random(n) * items.popularity_cdf[-1]
    pos = np.searchsorted(items.popularity_cdf, u, side="right")
    return items.by_topic[np.minimum(pos, len(items.by_topic) - 1)]


def sample_items_in_topics(items: Items, topics: np.ndarray, rng) -> np.ndarray:
    """One popularity-weighted item inside each given topic (inverse cdf over the topic's range)."""
    low, high = items.topic_cdf_range[topics].T
    pos = np.searchsorted(items.popularity_cdf, low + rng.random(len(topics)) * (high - low),
                          side="right")
    return items.by_topic[np.minimum(pos, len(items.by_topic) - 1)]


def sample_user_topics(users: Users, user: np.ndarray, rng) -> np.ndarray:
    slot = (rng.random(len(user))[:, None] > users.interest_cdf[user]).sum(axis=1)
    return users.interests[user, np.minimum(slot, users.interests.shape[1] - 1)]


def make_items(p: Preset, rng: np.random.Generator, process: ClickProcess = PROCESSES["default"]) -> Items:
    n_items, n_topics = p.n_items, p.n_topics
    topic = np.zeros(n_items, np.int64)
    topic[1:] = rng.integers(0, n_topics, n_items - 1)

    # Semantics: topic centre + subtopic offset + item noise. Same-subtopic items are near
    # duplicates (cosine ~0.94), same-topic ones related (~0.5), others unrelated (~0).
    centres = _unit(rng.standard_normal((n_topics, LATENT_DIM)))
    sub_offsets = _unit(rng.standard_normal((n_topics, SUBTOPICS, LATENT_DIM)))
    subtopic = rng.integers(0, SUBTOPICS, n_items)
    noise = rng.standard_normal((n_items, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    semantic = _unit(centres[topic] + 0.9 * sub_offsets[topic, subtopic] + 0.35 * noise)
    semantic[0] = 0.0

    # Tags: 1..5 distinct ones, mostly from the item's topic pool (tag t belongs to pool t mod T).
    pool_members = [np.arange(1, p.n_tags)[np.arange(1, p.n_tags) % n_topics == t]
                    for t in range(n_topics)]
    pool_size = min(len(members) for members in pool_members)
    pools = np.stack([members[:pool_size] for members in pool_members])          # [T, P]
    picks = np.argsort(rng.random((n_items, pool_size)), axis=1)[:, :TAG_SLOTS]  # distinct
    tags = pools[topic[:, None], picks]
    tags = np.where(rng.random(tags.shape) < 0.15, rng.integers(1, p.n_tags, tags.shape), tags)
    n_item_tags = rng.integers(1, TAG_SLOTS + 1, n_items)
    tags = np.sort(np.where(np.arange(TAG_SLOTS) >= TAG_SLOTS - n_item_tags[:, None], tags, 0))
    repeated = np.zeros_like(tags, bool)            # an off-topic draw may repeat a pool tag
    repeated[:, 1:] = (tags[:, 1:] == tags[:, :-1]) & (tags[:, 1:] > 0)
    tags = np.sort(np.where(repeated, 0, tags))     # sorting moves the padding zeros left
    tags[0] = 0

    # Multimodal vector: a fixed random projection of the semantics plus a little noise, the way
    # the organisers' PCA of text+image embeddings keeps most of an item's meaning.
    projection = rng.standard_normal((EMB_DIM, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    emb = semantic.astype(np.float64) @ projection.T
    emb_scale = np.linalg.norm(emb, axis=1, keepdims=True) / np.sqrt(EMB_DIM)
    emb += 0.15 * emb_scale * rng.standard_normal(emb.shape)

    # Popularity: Zipf over a random ranking, so a few items are everywhere and most are rare.
    popularity = 1.0 / (rng.permutation(n_items - 1) + 1.0) ** 0.9
    log_pop = np.log(popularity)
    pop_z = np.concatenate([[0.0], (log_pop - log_pop.mean()) / log_pop.std()])

    quality = np.concatenate([[0.0], rng.standard_normal(n_items - 1)])
    bias = np.concatenate([[0.0], process.item_bias_std * rng.standard_normal(n_items - 1)])
    likes = np.rint(5 + 1.6 * quality + 0.8 * pop_z + 0.7 * rng.standard_normal(n_items))
    views = np.rint(4 + 2.0 * pop_z + 0.4 * quality + 0.7 * rng.standard_normal(n_items))
    likes = np.clip(likes, 0, LEVELS - 1).astype(np.int64)
    views = np.clip(views, 0, LEVELS - 1).astype(np.int64)
    likes[0] = views[0] = 0

    # Sorting items by topic makes each topic one interval of the popularity cdf, so drawing
    # "a popular item of topic t" is a single vectorised searchsorted.
    by_topic = 1 + np.argsort(topic[1:], kind="stable")
    popularity_cdf = np.cumsum(popularity[by_topic - 1])
    bounds = np.searchsorted(topic[by_topic], np.arange(n_topics + 1))
    cdf = np.concatenate([[0.0], popularity_cdf])
    topic_cdf_range = np.stack([cdf[bounds[:-1]], cdf[bounds[1:]]], axis=1)
    return Items(semantic.astype(np.float32), tags, emb, likes, views, quality, bias,
                 by_topic, popularity_cdf, topic_cdf_range)


def make_users(p: Preset, items: Items, rng: np.random.Generator,
               process: ClickProcess = PROCESSES["default"]) -> Users:
    n_rows = p.n_users + 1  # row 0 is never sampled: user ids start at 1
    interests = rng.integers(0, p.n_topics, (n_rows, 3))
    n_interests = rng.choice([1, 2, 3], n_rows, p=[0.4, 0.4, 0.2])
    weights = rng.dirichlet(np.ones(3), n_rows) * (np.arange(3) < n_interests[:, None])
    interest_cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    users = Users(interests, interest_cdf, timeline=np.zeros((n_rows, TIMELINE_LEN), np.int32),
                  timeline_len=np.empty(n_rows, np.int64), taste=np.empty(0, np.float32),
                  bias=process.user_bias_std * rng.standard_normal(n_rows))

    # A quarter of the users are newcomers with short timelines (so their rows are left-padded).
    short = rng.random(n_rows) < 0.25
    users.timeline_len[:] = np.where(short, rng.integers(1, 21, n_rows),
                                     rng.integers(SEQ_LEN, TIMELINE_LEN + 1, n_rows))
    # One slot at a time for all users: memory stays O(users x d), never O(users x 80 x d).
    semantic_sum = np.zeros((n_rows, LATENT_DIM), np.float32)
    everyone = np.arange(n_rows)
    for slot in tqdm(range(TIMELINE_LEN), desc="user timelines", unit="slot", leave=False,
                     disable=p.n_users < 100_000):
        from_interest = rng.random(n_rows) < P_HISTORY_FROM_INTERESTS
        clicked = np.where(from_interest,
                           sample_items_in_topics(items, sample_user_topics(users, everyone, rng), rng),
                           sample_popular_items(items, n_rows, rng))
        clicked[slot >= users.timeline_len] = 0
        users.timeline[:, slot] = clicked
        semantic_sum += items.semantic[clicked]

    # Taste: a fixed random mixing of the user's mean clicked semantics, so taste x target is a
    # genuine bilinear cross (not a similarity). Scaled so the term has unit spread.
    mixing = rng.standard_normal((LATENT_DIM, LATENT_DIM)).astype(np.float32) / np.sqrt(LATENT_DIM)
    taste = (semantic_sum / users.timeline_len[:, None].astype(np.float32)) @ mixing.T
    probe_user, probe_item = rng.integers(1, n_rows, 10_000), rng.integers(1, p.n_items, 10_000)
    users.taste = taste / np.einsum("nd,nd->n", taste[probe_user], items.semantic[probe_item]).std()

    # Affinity: g_u ~ N(0, I_r) through a fixed random d x r map W, scaled like the taste so that
    # f_u . z_i has unit spread. Drawn last, and only when used, so the other processes' users are
    # the same draws.
    if process.user_affinity_weight:
        directions = rng.standard_normal((LATENT_DIM, process.user_affinity_rank)).astype(np.float32)
        affinity = rng.standard_normal((n_rows, process.user_affinity_rank)).astype(np.float32) @ directions.T
        probe_user, probe_item = rng.integers(1, n_rows, 10_000), rng.integers(1, p.n_items, 10_000)
        users.affinity = affinity / np.einsum("nd,nd->n", affinity[probe_user], items.semantic[probe_item]).std()
    return users


def process_preset(p: Preset, process: ClickProcess) -> Preset:
    """The preset a process draws from: the same rows, items and tags; a process with rows_per_user
    has n_train / rows_per_user users instead (valid and test rows come from the same users)."""
    if not process.rows_per_user:
        return p
    return replace(p, n_users=max(1, round(p.n_train / process.rows_per_user)))


# ---------------------------------------------------------------------------------------------
# rows: one (user, history, target) impression each, with its true click logit
# ---------------------------------------------------------------------------------------------

def attention_match(items: Items, target: np.ndarray, seq: np.ndarray, process: ClickProcess) -> np.ndarray:
    """log1p of the recency-weighted mass of history items whose cosine to the target exceeds tau."""
    recency = np.exp(-(SEQ_LEN - 1 - np.arange(SEQ_LEN)) / process.attn_recency).astype(np.float32)
    relevance = np.zeros(len(target), np.float32)
    target_vec = items.semantic[target]
    for slot in range(SEQ_LEN):  # a loop over the 64 slots keeps memory at O(rows x d)
        cos = np.einsum("nd,nd->n", items.semantic[seq[:, slot]], target_vec)
        relevance += recency[slot] * np.maximum(cos - process.attn_tau, 0.0)
    return np.log1p(relevance / process.attn_scale)


def sample_rows(items: Items, users: Users, n: int, rng: np.random.Generator,
                process: ClickProcess = PROCESSES["default"]) -> dict[str, np.ndarray]:
    user = rng.integers(1, len(users.timeline_len), n)
    # The row's moment in the user's timeline: the history is the last <= 64 clicks before it
    # (a long timeline always fills the 64 slots, a short one is shown whole, left-padded).
    length = users.timeline_len[user]
    end = length - rng.integers(0, np.maximum(length - SEQ_LEN + 1, 1))
    timeline_pos = end[:, None] - SEQ_LEN + np.arange(SEQ_LEN)
    seq = users.timeline[user[:, None], np.maximum(timeline_pos, 0)].astype(np.int64)
    seq[timeline_pos < 0] = 0

    from_interest = rng.random(n) < P_TARGET_FROM_INTERESTS
    target = np.where(from_interest,
                      sample_items_in_topics(items, sample_user_topics(users, user, rng), rng),
                      sample_popular_items(items, n, rng))
    jitter = rng.choice([-1, 0, 1], (2, n), p=[0.05, 0.9, 0.05])
    likes = np.clip(items.likes[target] + jitter[0], 0, LEVELS - 1)
    views = np.clip(items.views[target] + jitter[1], 0, LEVELS - 1)

    match = attention_match(items, target, seq, process).astype(np.float64)
    taste = np.einsum("nd,nd->n", users.taste[user], items.semantic[target]).astype(np.float64)
    logit = (process.attn_weight * match
             + process.attn_x_likes_weight * match * (likes - 5) / 5
             + process.taste_weight * taste
             + process.quality_weight * items.quality[target]
             + items.bias[target] + users.bias[user])
    if process.user_affinity_weight:
        affinity = np.einsum("nd,nd->n", users.affinity[user], items.semantic[target]).astype(np.float64)
        logit = logit + process.user_affinity_weight * affinity
    return {"user_id": user, "item_seq": seq, "item_id": target, "likes_level": likes,
            "views_level": views, "logit_no_intercept": logit}


def solve_intercept(logits: np.ndarray, rate: float) -> float:
    """Bisection on b so that mean(sigmoid(b + logit)) == rate (the mean is monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + logits).mean() < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def _fixed_list(values: np.ndarray, width: int, value_type) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type), width)


def rows_table(rows: dict, schema: pa.Schema, first_id: int | None,
               label: np.ndarray | None) -> pa.Table:
    columns = {}
    if first_id is not None:
        columns["ID"] = pa.array(np.arange(first_id, first_id + len(rows["user_id"]), dtype=np.int64))
    columns["user_id"] = pa.array(rows["user_id"].astype(np.int64))
    columns["item_seq"] = _fixed_list(rows["item_seq"].astype(np.int64), SEQ_LEN, pa.int64())
    for name in ("item_id", "likes_level", "views_level"):
        columns[name] = pa.array(rows[name].astype(np.int64))
    if label is not None:
        columns["label"] = pa.array(label)
    return pa.Table.from_pydict(columns, schema=schema)


def item_feature_table(items: Items) -> pa.Table:
    """The items' own likes/views levels, the ones every row's target levels jitter around."""
    ids = np.arange(1, len(items.likes), dtype=np.int64)
    return pa.Table.from_pydict({"item_id": pa.array(ids), "likes_level": pa.array(items.likes[1:]),
                                 "views_level": pa.array(items.views[1:])}, schema=ITEM_FEATURE_SCHEMA)


def item_emb_table(items: Items, rng: np.random.Generator) -> pa.Table:
    """item_emb.parquet: one row per real item (1..V-1), each ITEM_EMB_VIEWS column a noisy
    projection of the item's semantics, like item_emb_d128 (make_items) with other draws."""
    semantic = items.semantic[1:].astype(np.float64)
    columns = {"item_id": pa.array(np.arange(1, len(items.semantic), dtype=np.int64))}
    for name, noise in ITEM_EMB_VIEWS.items():
        projection = rng.standard_normal((EMB_DIM, LATENT_DIM)) / np.sqrt(LATENT_DIM)
        view = semantic @ projection.T
        scale = np.linalg.norm(view, axis=1, keepdims=True) / np.sqrt(EMB_DIM)
        view += noise * scale * rng.standard_normal(view.shape)
        columns[name] = _fixed_list(view.astype(np.float32), EMB_DIM, pa.float32())
    return pa.Table.from_pydict(columns, schema=ITEM_EMB_SCHEMA)


def item_table(items: Items) -> pa.Table:
    return pa.Table.from_pydict({
        "item_id": pa.array(np.arange(len(items.tags), dtype=np.int64)),
        "item_tags": _fixed_list(items.tags, TAG_SLOTS, pa.int64()),
        "item_emb_d128": _fixed_list(items.emb, EMB_DIM, pa.float64()),
    }, schema=ITEM_SCHEMA)


# The world a chunk is drawn from: set before the process pool forks, so workers inherit it
# (copy-on-write) instead of receiving hundreds of MB of user timelines per task.
_WORLD: dict = {}


def make_chunk(job: tuple) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """One chunk of one split: (its parquet rows, true probabilities, labels). Each chunk has its
    own generator, seeded by (seed, split, chunk): the output depends on the seed alone, not on
    which process drew the chunk or in which order."""
    split, split_index, chunk, start, n = job
    items, users, intercept, seed, process = (_WORLD[k] for k in ("items", "users", "intercept", "seed", "process"))
    rng = np.random.default_rng([seed, split_index, chunk])
    rows = sample_rows(items, users, n, rng, process)
    prob = _sigmoid(intercept + rows["logit_no_intercept"])
    label = (rng.random(n) < prob).astype(np.int64)
    if split == "test":
        return rows_table(rows, TEST_SCHEMA, first_id=start, label=None), prob, label
    return rows_table(rows, TRAIN_SCHEMA, first_id=None, label=label), prob, label


@contextlib.contextmanager
def chunk_map(workers: int, n_jobs: int):
    """map(make_chunk, jobs) in order: in a pool of forked processes when more than one worker
    is asked for and there is more than one chunk (where fork exists), else in this process."""
    workers = min(workers, n_jobs)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield lambda jobs: map(make_chunk, jobs)
        return
    # a worker dies with this process: a killed generator leaves no pool waiting forever
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=common.die_with_parent, initargs=(os.getpid(),)) as pool:
        yield lambda jobs: pool.map(make_chunk, jobs)


def write_splits(splits: list[tuple[str, int]], staging: Path, workers: int) -> dict:
    """Generate and write every split chunk by chunk (row group by row group, in order); returns
    split -> (true probabilities, labels)."""
    jobs = [(split, split_index, chunk, start, min(CHUNK_ROWS, n_rows - start))
            for split_index, (split, n_rows) in enumerate(splits, start=3)
            for chunk, start in enumerate(range(0, n_rows, CHUNK_ROWS))]
    out = {}
    with chunk_map(workers, len(jobs)) as map_chunks:
        results = iter(tqdm(map_chunks(jobs), total=len(jobs), desc="rows", unit="chunk", leave=False,
                            disable=len(jobs) < 6))
        for split, n_rows in splits:
            schema = TEST_SCHEMA if split == "test" else TRAIN_SCHEMA
            probs, labels = np.empty(n_rows), np.empty(n_rows, np.int64)
            with pq.ParquetWriter(staging / f"{split}.parquet", schema) as writer:
                for _, _, _, start, n in (job for job in jobs if job[0] == split):
                    table, probs[start:start + n], labels[start:start + n] = next(results)
                    writer.write_table(table)
            out[split] = probs, labels
    return out


# what generate writes, in the order it moves them into place: the oracle first (its test labels mark
# a folder as generated), item_info.parquet last (its presence means the set is complete)
ORACLE_MARK = "oracle/test_labels.parquet"
OUTPUT_FILES = (ORACLE_MARK, "oracle/click_prob.parquet", "item_feature.parquet", "item_emb.parquet",
                "train.parquet", "valid.parquet", "test.parquet", "item_info.parquet")


def generate(preset: str, out: Path, seed: int, workers: int = 1, process: str = "default") -> dict:
    """Write one synthetic dataset into ``out``; return a summary (rows, positive rate, oracle AUC).

    ``workers`` processes draw the row chunks (identical files for any number); ``process`` names
    the click process (PROCESSES)."""
    if preset not in PRESETS:
        raise common.UserError(f"--preset {preset!r}: unknown preset (known: {', '.join(PRESETS)})")
    if process not in PROCESSES:
        raise common.UserError(f"--process {process!r}: unknown click process (known: {', '.join(PROCESSES)})")
    click = PROCESSES[process]
    if seed < 0:
        raise common.UserError(f"--seed {seed}: must be >= 0")
    p = process_preset(PRESETS[preset], click)
    out = Path(out)
    try:  # before the minutes of generating: an unusable --out fails at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise common.UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    # a generated set may be written again; data of any other origin (the real files) is never replaced
    foreign = [name for name in OUTPUT_FILES if (out / name).exists()] if not (out / ORACLE_MARK).is_file() else []
    if foreign:
        raise common.UserError(f"--out {out}: holds {foreign[0]} but no {ORACLE_MARK}, so make_synthetic did not "
                               f"write it (the real data?); it is left alone: choose another folder")
    started = time.time()
    items = make_items(p, np.random.default_rng([seed, 0]), click)
    users = make_users(p, items, np.random.default_rng([seed, 1]), click)
    pilot = sample_rows(items, users, PILOT_ROWS, np.random.default_rng([seed, 2]), click)
    intercept = solve_intercept(pilot["logit_no_intercept"], TARGET_POSITIVE_RATE)

    # Everything is written into a staging folder first, then moved into place file by file, so
    # no file is ever visible half-written under its final name; item_info.parquet comes last, so
    # its presence means the set is complete (run.sh tests exactly that).
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "make_synthetic"  # the staging folders are .make_synthetic-tmp-<pid>-* in out
    common.sweep_staged_left_overs(scratch)  # a killed generation's (its process is gone)
    staging = common.scratch_folder(scratch, "tmp")
    summary = {"preset": preset, "seed": seed, "process": process, "out": str(out), "users": p.n_users,
               "intercept": intercept, "splits": {}}
    try:
        pq.write_table(item_table(items), staging / "item_info.parquet")
        pq.write_table(item_feature_table(items), staging / "item_feature.parquet")
        pq.write_table(item_emb_table(items, np.random.default_rng([seed, ITEM_EMB_STREAM])),
                       staging / "item_emb.parquet")
        oracle_probs, test_labels = [], None
        _WORLD.update(items=items, users=users, intercept=intercept, seed=seed, process=click)
        try:
            written = write_splits([("train", p.n_train), ("valid", p.n_valid), ("test", p.n_test)],
                                   staging, workers)
        finally:
            _WORLD.clear()
        for split, (probs, labels) in written.items():
            n_rows = len(probs)
            oracle_probs.append(pa.table({"split": pa.repeat(pa.scalar(split, pa.string()), n_rows),
                                          "row_id": pa.array(np.arange(n_rows, dtype=np.int64)),
                                          "prob": pa.array(probs)}, schema=ORACLE_PROB_SCHEMA))
            if split == "test":
                test_labels = labels
            summary["splits"][split] = {"rows": n_rows, "positive_rate": float(labels.mean()),
                                        "oracle_auc": roc_auc(labels, probs)}
        (staging / "oracle").mkdir()
        pq.write_table(pa.concat_tables(oracle_probs), staging / "oracle" / "click_prob.parquet")
        pq.write_table(pa.table({"ID": np.arange(p.n_test, dtype=np.int64), "label": test_labels},
                                schema=TEST_LABEL_SCHEMA), staging / ORACLE_MARK)

        (out / "oracle").mkdir(exist_ok=True)
        # item_info.parquet marks a complete set: gone while the set is a mix of old and new files
        (out / "item_info.parquet").unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="dataset size: tiny (tests), demo (run.sh default), full (real sizes)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--process", choices=sorted(PROCESSES), default="default",
                        help="the click process: default (the demo's), broad (other signals matter) or "
                             "heavy (~100 train rows per user, each with a hidden taste a user table can "
                             "learn): data/README.md")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes drawing the row chunks (default: one per core; the files are "
                             "the same for any number)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    summary = generate(args.preset, Path(args.out), args.seed, args.workers, args.process)
    common.log(f"wrote {args.preset} preset to {summary['out']} in {summary['seconds']} s "
               f"(seed {args.seed}, click process {args.process}, {summary['users']:,d} users)")
    for split, info in summary["splits"].items():
        print(f"  {split:5s} {info['rows']:>9,d} rows  positive rate {info['positive_rate']:.3f}  "
              f"oracle AUC {info['oracle_auc']:.4f}")
    print(f"  true click probabilities and test labels: {Path(args.out) / 'oracle'}")


if __name__ == "__main__":
    common.run_main(main)
