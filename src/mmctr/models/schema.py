"""The competition's data format in one place (docs/spec/competition.md): what the files hold and
what a model reads. The generator, the validator, the processed folder, the training loop and the
notebook tables all take their sizes and column names from here; adding a row column means adding
it to FEATURES and to the model that reads it."""

SPLITS = ("train", "valid", "test")
SEQ_LEN = 64       # item_seq: the last 64 clicked items, left-padded with 0, most recent last
TAG_SLOTS = 5      # item_tags: up to 5 tag ids per item, left-padded with 0
EMB_DIM = 128      # item_emb_d128: the frozen multimodal vector of each item
N_LEVELS = 11      # likes_level / views_level: 0..10

# what a model reads of each row (a batch is these columns gathered at the batch's rows)
FEATURES = ("user_id", "item_id", "item_seq", "likes_level", "views_level")
LIST_FEATURES = ("item_seq",)  # [N, SEQ_LEN]; the others are one integer per row
# the per-item tables every model gets beside the rows: [V, ...], row 0 the padding item
ITEM_TABLES = ("item_tags", "item_emb", "item_likes_level", "item_views_level")
