"""From the competition's parquet files (read with pandas) to what the models and fit.py take.

    frames = {split: pd.read_parquet(f"{split}.parquet") for split in ("train", "valid", "test")}
    tables = item_tables(pd.read_parquet("item_info.parquet"), frames.values(),
                         item_feature=pd.read_parquet("item_feature.parquet"),  # optional
                         train=frames["train"])  # optional: train rows per user (SimQIN's user_min_rows)
    data = {split: to_device(row_arrays(frame), device) for split, frame in frames.items()}
    tables = to_device(tables, device)

The same arrays src/preprocess.py writes (it also validates every value and streams the files),
built in memory for a notebook. Imports numpy and torch only; the frames may be any table whose
columns index by name and convert with np.asarray (pandas, polars).
"""
import numpy as np
import torch

from .schema import EMB_DIM, FEATURES, LIST_FEATURES, N_LEVELS, SEQ_LEN, TAG_SLOTS


def list_column(column, width):
    """A column of equal-length lists as an [N, width] array."""
    values = np.stack([np.asarray(v) for v in column]) if len(column) else np.zeros((0, width))
    if values.shape[1:] != (width,):
        raise ValueError(f"expected lists of {width} values, got shape {values.shape}")
    return values


def row_arrays(frame):
    """A split's columns as arrays: ids and levels int32 [N], item_seq int32 [N, 64], label float32."""
    arrays = {name: (list_column(frame[name], SEQ_LEN) if name in LIST_FEATURES else np.asarray(frame[name]))
              .astype(np.int32) for name in FEATURES}
    if "label" in frame.columns:
        arrays["label"] = np.asarray(frame["label"], dtype=np.float32)
    return arrays


def item_levels(n_items, frames, item_feature=None):
    """Per-item likes/views levels [2, V]: item_feature.parquet's (item_id, likes_level, views_level;
    items it lacks get 0) when given, else the rounded mean of the item's rows over every split (0 if
    unseen). Rows carry their target item's levels; these tables let a model attach levels to
    history items.
    """
    if item_feature is not None:
        levels = np.zeros((2, n_items), np.int32)
        item = np.asarray(item_feature["item_id"], dtype=np.int64)
        for k, name in enumerate(("likes_level", "views_level")):
            levels[k, item] = np.asarray(item_feature[name])
        return levels
    sums, counts = np.zeros((2, n_items)), np.zeros(n_items)
    for frame in frames:
        item = np.asarray(frame["item_id"], dtype=np.int64)
        counts += np.bincount(item, minlength=n_items)
        for k, name in enumerate(("likes_level", "views_level")):
            sums[k] += np.bincount(item, weights=np.asarray(frame[name], dtype=np.float64), minlength=n_items)
    levels = np.floor(sums / np.maximum(counts, 1) + 0.5)  # halves round up
    levels[:, counts == 0] = 0
    return levels.astype(np.int32)


def item_tables(item_info, frames, emb_dtype=np.float32, item_feature=None, train=None):
    """The ``tables`` dict every model takes: item tables as tensors [V, ...] and vocabulary sizes.

    item_info: item_id (= row number), item_tags (5 ids, 0 = padding), item_emb_d128 (128 floats);
    frames: every split (their user ids size the user vocabulary, their levels the level tables
    unless item_feature, the optional item_feature.parquet, gives them); train, when given, the
    train split, whose rows per user give user_rows [U] (what SimQIN's user_min_rows reads).
    """
    frames = list(frames)
    item_id = np.asarray(item_info["item_id"])
    if not np.array_equal(item_id, np.arange(len(item_id))):
        raise ValueError("item_info: item_id must equal the row number")
    tags = list_column(item_info["item_tags"], TAG_SLOTS).astype(np.int32)
    likes, views = item_levels(len(item_id), frames, item_feature)
    n_users = max(int(np.asarray(f["user_id"]).max()) for f in frames) + 1
    user_rows = {} if train is None else {"user_rows": torch.from_numpy(user_row_counts(train["user_id"], n_users))}
    return {
        "item_tags": torch.from_numpy(tags),
        "item_emb": torch.from_numpy(list_column(item_info["item_emb_d128"], EMB_DIM).astype(emb_dtype)),
        "item_likes_level": torch.from_numpy(likes),
        "item_views_level": torch.from_numpy(views),
        "n_items": len(item_id),
        "n_tags": int(tags.max()) + 1,
        "n_users": n_users,
        "n_levels": N_LEVELS,
        **user_rows,
    }


def user_row_counts(user_id, n_users):
    """The number of rows of each user id 0..n_users-1 (int64 [U]): a count, no label is read."""
    return np.bincount(np.asarray(user_id, dtype=np.int64), minlength=n_users)


def to_device(arrays, device):
    """Every array (or tensor) of a dict as a tensor on ``device``; other values pass through."""
    return {name: (torch.as_tensor(value).to(device) if isinstance(value, (np.ndarray, torch.Tensor)) else value)
            for name, value in arrays.items()}
