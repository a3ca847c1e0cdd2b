# %% [markdown]
# # One QIN fold, in memory, from the four competition files
#
# Opens as a notebook in Jupyter (jupytext), VS Code and Kaggle ("# %%" cells); also runs as a
# script. It needs torch, numpy and pandas (with pyarrow) and the repo's kit, the folder
# src/mmctr/models/ (torch and numpy only), copied beside this notebook as models/ (on Kaggle:
# a dataset holding models/ at its top, attached; or set KIT to the folder that holds models/).
#
# It reads train/valid/test/item_info.parquet from DATA, builds the item tables, trains QIN on
# 90 % of the train rows (the other 10 % held out) with QIN's released schedule, and writes
# submission.zip (prediction.csv: ID, Task2) for the leaderboard. The defaults are a CPU-sized QIN;
# on a GPU with the real data use `QIN(tables)` (the released size) and `FitSettings()`.

# %%
import glob
import os
import sys
import zipfile

import numpy as np
import pandas as pd
import torch

# where the kit folder models/ is: KIT, beside the notebook, the repo's, or an attached Kaggle dataset
kit_parents = [os.environ.get("KIT", "."), ".", "src/mmctr", "../src/mmctr", *sorted(glob.glob("/kaggle/input/*"))]
kit = next((parent for parent in kit_parents if os.path.isfile(os.path.join(parent, "models", "fit.py"))), None)
if kit is None:
    raise SystemExit(f"no kit: models/fit.py is in none of {kit_parents}; copy src/mmctr/models/ beside this "
                     f"notebook as models/, or set KIT to the folder that holds models/")
sys.path.insert(0, kit)  # the notebook's one path line

from models.fit import FitSettings, fit, predict  # noqa: E402
from models.qin import QIN  # noqa: E402
from models.tables import item_tables, row_arrays, to_device  # noqa: E402

DATA = os.environ.get("DATA", "data/demo")         # the folder with the four parquet files
OUT = os.environ.get("OUT", ".")                   # where submission.zip goes
SEED = 20242025
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
missing = [f"{name}.parquet" for name in ("train", "valid", "test", "item_info")
           if not os.path.isfile(os.path.join(DATA, f"{name}.parquet"))]
if missing:
    raise SystemExit(f"DATA={DATA}: no {missing[0]} there; set DATA to the folder of the four competition files")

# %% the data: item tables and each split's columns, on the device
frames = {split: pd.read_parquet(os.path.join(DATA, f"{split}.parquet")) for split in ("train", "valid", "test")}
tables = to_device(item_tables(pd.read_parquet(os.path.join(DATA, "item_info.parquet")), frames.values(),
                               train=frames["train"]), device)
data = {split: to_device(row_arrays(frame), device) for split, frame in frames.items()}
print({split: len(frame) for split, frame in frames.items()}, "items:", tables["n_items"])

# %% one fold: a stratified 10 % of the train rows held out
rng = np.random.default_rng(SEED)
label = frames["train"]["label"].to_numpy()
holdout = np.concatenate([rng.permutation(np.flatnonzero(label == c))[: int(0.1 * np.sum(label == c))]
                          for c in (0, 1)])
in_fold = np.ones(len(label), bool)
in_fold[holdout] = False
train_rows = torch.from_numpy(np.flatnonzero(in_fold)).to(device)
eval_sets = {"valid": ("valid", torch.arange(len(frames["valid"]), device=device)),  # decides, as released
             "holdout": ("train", torch.from_numpy(np.sort(holdout)).to(device))}

# %% train: the model, then fit (the released schedule, CPU-sized batches, epochs and patience)
torch.manual_seed(SEED)  # weight init and dropout; fit shuffles with settings.seed
model = QIN(tables, emb_dim=16, mm_dim=16, qnn_layers=2, qnn_m=2).to(device)
settings = FitSettings(seed=SEED, batch_size=1024, max_epochs=int(os.environ.get("EPOCHS", 4)), patience=1)
result = fit(model, data, train_rows, eval_sets, settings,
             on_epoch=lambda r: print(f"epoch {r['epoch']}: loss {r['train_loss']:.4f}  "
                                      f"valid AUC {r['valid_auc']:.4f}  holdout AUC {r['holdout_auc']:.4f}"))
print(f"best epoch {result.best_epoch}: valid AUC {result.scores['valid_auc']:.4f}, "
      f"holdout AUC {result.scores['holdout_auc']:.4f}")

# %% the submission: the best epoch's model on the test rows
test_probs = predict(result.model, data["test"], batch_size=settings.eval_batch_size)
submission = pd.DataFrame({"ID": frames["test"]["ID"].to_numpy(), "Task2": test_probs})
os.makedirs(OUT, exist_ok=True)
with zipfile.ZipFile(os.path.join(OUT, "submission.zip"), "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("prediction.csv", submission.to_csv(index=False))
print(f"wrote {os.path.join(OUT, 'submission.zip')}: {len(submission):,} rows")
