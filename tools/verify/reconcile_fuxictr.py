"""Reconcile the project's QIN and DIN with the released code on the same synthetic data.

NOT part of CI and imported by no test: it needs things the project does not install.

- A separate virtual environment with the released code's stack (FuxiCTR 2.3.7), e.g.

      python3 -m venv /tmp/fxenv
      /tmp/fxenv/bin/pip install torch==2.13.0          # the local CPU wheel, the main env's torch
      /tmp/fxenv/bin/pip install "numpy<2" "pandas<3" "pyarrow<20" "scikit-learn<1.5" \\
          "polars<=1.0.0" keras_preprocessing h5py tqdm PyYAML
      /tmp/fxenv/bin/pip install --no-deps fuxictr==2.3.7

- Checkouts (or bare git mirrors) of the released code, given by path:
  salmon1802/QIN, branch master (src/QIN_variety_v9.py, run_expid.py, src/mmctr_dataloader.py),
  and reczoo/WWW2025_MMCTR_Challenge, branch main (src/DIN.py, run_expid.py). A git directory is
  exported with ``git archive REF`` (only run_expid.py, fuxictr_version.py, src/ and config/), a
  plain folder is copied; either way into a temporary folder under --work, outside the repo: no
  released code is ever copied into the repository.

What it does, all under --work (default /tmp/reconcile):

1. generates a synthetic preset (src/make_synthetic.py) and, with --train-rows N, keeps a seeded
   random N of its train rows (with --test-rows M the first M test rows, which both codes predict
   and nothing scores; valid and item_info unchanged): raw/;
2. builds the project's processed folder from raw/ (src/preprocess.py): project/;
3. for each model (qin, din) and seed, writes a FuxiCTR dataset config for raw/ (vocabulary sizes
   from the synthetic item_info rows and levels 0..10, exactly the released feature list) and a
   model config (the released one, with the shared settings below), and runs the released
   run_expid.py with the venv's python on the CPU (--gpu -1); the per-epoch valid AUC is parsed
   from FuxiCTR's log: released/<model>_s<seed>/;
4. for each model and seed, runs the project's refit (one model on every train row, early
   stopping on the valid split, as released) with the project's python (the one running this
   script; it must not be the venv's): ``src/train.py --config configs/<model>.yaml --refit --set ...``
   with the same settings; the per-epoch valid AUC is its refit/history.json;
5. prints (and writes to table.md, results.json) a markdown table of valid AUC per epoch and seed
   for both, with the mean and the seed spread (min..max) per epoch;
6. with --check-forward (after each model's runs), in the venv: loads the first seed's released
   checkpoint into the project's model (state_dict names mapped one to one) and compares the
   predictions on the valid split (eval mode), the loss and every gradient on one train batch
   (train mode, dropout off), and 10 training steps from one fresh initialisation on the same
   batches (the released train_step against fit.py's step, plus diagnostic variants of the
   latter): forward_check.json and the last table;
7. --sides picks the columns: released, project (the configs as they are), and the project with
   the two training-step keys pinned (PROJECT_SIDES): project_logits (train.loss=logits, the L2
   by Adam after the clip), project_fxbce (FuxiCTR's BCE on probabilities only), project_fuxictr
   (FuxiCTR's step: train.loss=fuxictr and train.emb_l2_in_loss=true).

Both sides get the same settings from one place (SETTINGS below plus --emb-dim, --max-epochs and
the seeds): batch size, learning rate, embedding L2, patience, lr decay factor, max epochs, seed,
E, and for DIN the reduced attention and MLP widths (identical on both sides). The multimodal
projection keeps its released width 128 on both sides. Seeds are labels: the two codes draw from
different random streams (and the project's refit seeds itself with train.seed + n_folds), so
runs are compared as distributions over seeds, never pair by pair.

Finished runs are reused on a rerun (a FuxiCTR log that reached "Training finished", a project
refit that is done); --force reruns them.

    nice -n 10 PYTHONPATH=src python3 tools/verify/reconcile_fuxictr.py --venv-python /tmp/fxenv/bin/python \\
        --qin-repo QIN_CLONE --din-repo MMCTR_CHALLENGE_CLONE \\
        --work /tmp/reconcile --preset demo --train-rows 20000 --test-rows 2000 --batch-size 2048 \\
        --max-epochs 4 --seeds 20242025,1,2 --check-forward

docs/REPRODUCTION.md has the commands, settings and results.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tools/verify/ in the repo

# the settings both implementations get, per model (the project's configs/<model>.yaml key, the
# released config key, value). Values are the released ones (QIN: config/qin_config; DIN: the
# official tuner config DIN_microlens_mmctr_tuner_config_01.yaml), except the widths reduced for
# the CPU, which are identical on both sides.
SETTINGS = {
    "qin": [
        ("train.batch_size", "batch_size", 8192),
        ("train.lr", "learning_rate", 2.0e-3),
        ("train.emb_l2", "embedding_regularizer", 2.0e-4),
        ("train.patience", "early_stop_patience", 8),
        ("train.lr_decay", "factor", 0.5),
        ("model.qnn_layers", "num_layers", 4),
        ("model.qnn_m", "num_row", 4),
        ("model.dropout", "net_dropout", 0.1),
        ("model.batch_norm", "batch_norm", True),
    ],
    "din": [
        ("train.batch_size", "batch_size", 8192),
        ("train.lr", "learning_rate", 1.0e-3),
        ("train.emb_l2", "embedding_regularizer", 1.0e-6),
        ("train.patience", "early_stop_patience", 3),
        ("train.lr_decay", None, 0.1),  # FuxiCTR BaseModel.lr_decay's default factor (not a config key)
        ("model.attention_hidden", "attention_hidden_units", [64, 32]),  # released [512, 256]: CPU
        ("model.mlp_hidden", "dnn_hidden_units", [256, 128]),            # released [1024, 512, 256]: CPU
        ("model.attention_dropout", "attention_dropout", 0.1),
        ("model.dropout", "net_dropout", 0.1),
        ("model.batch_norm", "batch_norm", True),
    ],
}

# the released model_config entries (their fixed keys); the shared settings above are added
RELEASED = {
    "qin": {
        "repo_arg": "qin_repo", "ref_arg": "qin_ref", "model": "QIN_variety_v9",
        "config": {"model": "QIN_variety_v9", "loss": "binary_crossentropy", "metrics": ["AUC", "logloss"],
                   "task": "binary_classification", "optimizer": "adam", "net_regularizer": 0,
                   "monitor": {"AUC": 1, "logloss": 0}, "monitor_mode": "max", "max_len": 64,
                   "accumulation_steps": 1, "shuffle": True},
    },
    "din": {
        "repo_arg": "din_repo", "ref_arg": "din_ref", "model": "DIN",
        "config": {"model": "DIN", "loss": "binary_crossentropy", "metrics": ["AUC", "logloss"],
                   "task": "binary_classification", "optimizer": "adam", "net_regularizer": 0,
                   "dnn_activations": "ReLU", "attention_hidden_activations": "ReLU",
                   "attention_output_activation": None, "din_use_softmax": False,
                   "monitor": "AUC", "monitor_mode": "max", "max_len": 64, "accumulation_steps": 1,
                   "shuffle": True},
    },
}
BASE = {"save_best_only": True, "eval_steps": None, "debug_mode": False, "group_id": "user_id",
        "use_features": None, "feature_specs": None, "feature_config": None, "pickle_feature_encoder": True}
EXPORT_PATHS = ["run_expid.py", "fuxictr_version.py", "src", "config"]


def log(msg: str) -> None:
    print(f"[reconcile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path, out: Path | None = None, env: dict | None = None) -> None:
    log(" ".join(str(c) for c in cmd) + (f"  > {out}" if out else ""))
    if out is None:
        subprocess.run(cmd, cwd=cwd, check=True, env=env)
        return
    with open(out, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = out.read_text().splitlines()[-30:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n" + "\n".join(tail))


def yaml_dump(data) -> str:
    """Flow-style YAML (JSON with YAML 1.1 floats): PyYAML, which FuxiCTR reads configs with, takes
    1e-06 for a string, so every float is written with a dot in its mantissa (1.0e-06)."""
    if isinstance(data, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {yaml_dump(v)}" for k, v in data.items()) + "}"
    if isinstance(data, list):
        return "[" + ", ".join(yaml_dump(v) for v in data) + "]"
    if isinstance(data, float):
        mantissa, _, exponent = repr(data).partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        return mantissa + (f"e{exponent}" if exponent else "")
    return json.dumps(data)  # str, int, bool, None


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def make_data(args, python: str) -> tuple[Path, dict]:
    """raw/ (the four files, train optionally subsampled) and the project's processed folder."""
    import numpy as np
    import pandas as pd

    work = args.work
    full = work / f"synthetic_{args.preset}_{args.data_seed}"
    if not (full / "item_info.parquet").is_file():
        run([python, "src/make_synthetic.py", "--preset", args.preset, "--out", str(full),
             "--seed", str(args.data_seed)], REPO)
    raw = work / "raw"
    stamp = {"preset": args.preset, "data_seed": args.data_seed, "train_rows": args.train_rows,
             "test_rows": args.test_rows}
    if not (raw / "stamp.json").is_file() or json.loads((raw / "stamp.json").read_text()) != stamp:
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True)
        for name in ("valid", "test", "item_info"):
            shutil.copy(full / f"{name}.parquet", raw / f"{name}.parquet")
        if args.test_rows:  # the test split is only predicted, never scored here: its first N rows
            test = pd.read_parquet(full / "test.parquet")
            test.iloc[:args.test_rows].to_parquet(raw / "test.parquet", index=False)
        train = pd.read_parquet(full / "train.parquet")
        if args.train_rows and args.train_rows < len(train):
            keep = np.sort(np.random.default_rng(args.data_seed).choice(len(train), args.train_rows, replace=False))
            train = train.iloc[keep].reset_index(drop=True)
        train.to_parquet(raw / "train.parquet", index=False)
        (raw / "stamp.json").write_text(json.dumps(stamp))
    item_info = pd.read_parquet(raw / "item_info.parquet")
    tags = np.stack(item_info["item_tags"].to_numpy())
    levels = pd.concat([pd.read_parquet(raw / f"{s}.parquet", columns=["likes_level", "views_level"])
                        for s in ("train", "valid", "test")])
    vocab = {"item": int(len(item_info)), "tag": int(tags.max()) + 1,
             "level": max(11, int(levels.to_numpy().max()) + 1),
             "train_rows": int(len(pd.read_parquet(raw / "train.parquet", columns=["label"])))}
    if not (item_info["item_id"].to_numpy() == np.arange(len(item_info))).all():
        raise SystemExit("item_info: row i must hold item i (the released loader indexes it by position)")
    run([python, "src/preprocess.py", "--config", "configs/data.yaml", "--set", f"data.raw_dir={raw}",
         "--set", f"data.work_dir={work / 'project'}"], REPO)
    return raw, vocab


# ---------------------------------------------------------------------------------------------
# the released code
# ---------------------------------------------------------------------------------------------

def export_released(source: Path, ref: str, dest: Path) -> None:
    """The released code at ``ref`` of the checkout or git mirror ``source`` into ``dest``."""
    dest.mkdir(parents=True)
    is_git = subprocess.run(["git", "-C", str(source), "rev-parse", "--git-dir"], capture_output=True).returncode == 0
    if is_git:
        archive = subprocess.run(["git", "-C", str(source), "archive", ref, "--", *EXPORT_PATHS],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", ref], capture_output=True, text=True,
                                check=True).stdout.strip()
    else:
        for name in EXPORT_PATHS:
            if (source / name).is_dir():
                shutil.copytree(source / name, dest / name)
            elif (source / name).is_file():
                shutil.copy(source / name, dest / name)
        commit = "working tree"
    (dest / "EXPORTED_FROM").write_text(f"{source} {ref} {commit}\n")
    if not (dest / "run_expid.py").is_file():
        raise SystemExit(f"{source}: no run_expid.py at {ref}")


def dataset_config(raw: Path, vocab: dict) -> dict:
    """The released feature list for the synthetic files (rebuild_dataset False, as released)."""
    return {"synthetic": {
        "data_root": None,  # set per run
        "data_format": "parquet",
        "train_data": str(raw / "train.parquet"), "valid_data": str(raw / "valid.parquet"),
        "test_data": str(raw / "test.parquet"), "item_info": str(raw / "item_info.parquet"),
        "rebuild_dataset": False,
        "feature_cols": [
            {"name": "user_id", "active": True, "dtype": "int", "type": "meta"},
            {"name": "item_seq", "active": True, "dtype": "int", "type": "meta"},
            {"name": "likes_level", "active": True, "dtype": "int", "type": "categorical", "vocab_size": vocab["level"]},
            {"name": "views_level", "active": True, "dtype": "int", "type": "categorical", "vocab_size": vocab["level"]},
            {"name": "item_id", "active": True, "dtype": "int", "type": "categorical", "vocab_size": vocab["item"],
             "source": "item"},
            {"name": "item_tags", "active": True, "dtype": "int", "type": "sequence", "max_len": 5,
             "vocab_size": vocab["tag"], "source": "item"},
            {"name": "item_emb_d128", "active": True, "dtype": "float", "type": "embedding", "source": "item",
             "embedding_dim": 128},
        ],
        "label_col": {"name": "label", "dtype": "float"},
    }}


def parse_fuxictr_log(text: str) -> dict:
    """Per-epoch valid AUC/logloss and train loss from a FuxiCTR 2.3.7 log (eval once per epoch)."""
    epochs, train_loss, params = [], None, None
    pending = None
    for line in text.splitlines():
        m = re.search(r"Total number of parameters: (\d+)", line)
        if m:
            params = int(m.group(1))
        m = re.search(r"Train loss: ([0-9.eE+-]+)", line)
        if m:
            train_loss = float(m.group(1))
        m = re.search(r"Evaluation @epoch (\d+) - batch", line)
        if m:
            pending = int(m.group(1))
            continue
        # the monitor's metrics only (DIN monitors AUC alone, QIN AUC and logloss); the final
        # "Validation evaluation" comes after no "Evaluation @epoch" line and is skipped
        m = re.search(r"\[Metrics\] AUC: ([0-9.]+)(?: - logloss: ([0-9.]+))?", line)
        if m and pending is not None:
            epochs.append({"epoch": pending, "valid_auc": float(m.group(1)),
                           "valid_logloss": float(m.group(2)) if m.group(2) else None, "train_loss": train_loss})
            pending = None
    return {"epochs": epochs, "params": params, "finished": "Training finished." in text}


def run_released(model: str, seed: int, args, raw: Path, vocab: dict, code_dir: Path) -> dict:
    run_dir = args.work / "released" / f"{model}_s{seed}"
    expid = f"{RELEASED[model]['model']}_reconcile"
    log_file = run_dir / "checkpoints" / "synthetic" / f"{expid}.log"
    if log_file.is_file() and not args.force:
        parsed = parse_fuxictr_log(log_file.read_text())
        if parsed["finished"]:
            log(f"released {model} seed {seed}: done before, reused ({log_file})")
            return parsed
    shutil.rmtree(run_dir, ignore_errors=True)
    config_dir = run_dir / "config"
    config_dir.mkdir(parents=True)
    dataset = dataset_config(raw, vocab)
    dataset["synthetic"]["data_root"] = str(run_dir / "data") + "/"
    (config_dir / "dataset_config.yaml").write_text(yaml_dump(dataset))
    entry = dict(RELEASED[model]["config"], dataset_id="synthetic", embedding_dim=args.emb_dim,
                 epochs=args.max_epochs, seed=seed)
    for _, key, value in SETTINGS[model]:
        if key is not None:
            entry[key] = value
    base = dict(BASE, model_root=str(run_dir / "checkpoints") + "/", num_workers=args.num_workers, verbose=0)
    (config_dir / "model_config.yaml").write_text(yaml_dump({"Base": base, expid: entry}))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [args.venv_python, str(code_dir / "run_expid.py"), "--config", str(config_dir), "--expid", expid,
           "--gpu", "-1"]
    start = time.time()
    run(cmd, code_dir, out=run_dir / "stdout.log", env=env)
    parsed = parse_fuxictr_log(log_file.read_text())
    parsed["seconds"] = time.time() - start
    (run_dir / "parsed.json").write_text(json.dumps(parsed, indent=1))
    log(f"released {model} seed {seed}: {len(parsed['epochs'])} epochs, {parsed['params']:,} parameters, "
        f"{parsed['seconds']:.0f}s")
    return parsed


# ---------------------------------------------------------------------------------------------
# the project
# ---------------------------------------------------------------------------------------------

def set_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# the project's sides: label, extra --set overrides, run-name suffix. "project" is the configs as
# they are; the others pin the two training-step keys that FuxiCTR does differently (fit.py's
# train.loss and train.emb_l2_in_loss, docs/REPRODUCTION.md), whatever the configs' defaults.
PROJECT_SIDES = {
    "project": ("project (configs as they are)", [], ""),
    "project_logits": ("project, BCE on logits, L2 by Adam after the clip",
                       ["train.loss=logits", "train.emb_l2_in_loss=false"], "logits"),
    "project_fxbce": ("project, FuxiCTR's BCE on probabilities only",
                      ["train.loss=fuxictr", "train.emb_l2_in_loss=false"], "fxbce"),
    "project_fuxictr": ("project, FuxiCTR's step (BCE on probabilities, L2 in the loss before the clip)",
                        ["train.loss=fuxictr", "train.emb_l2_in_loss=true"], "fuxictr"),
}


def run_project(model: str, seed: int, args, raw: Path, python: str, side: str = "project") -> dict:
    _, side_overrides, variant = PROJECT_SIDES[side]
    name = f"reconcile_{model}{'_' + variant if variant else ''}_s{seed}"
    overrides = [f"data.raw_dir={raw}", f"data.work_dir={args.work / 'project'}", f"run.name={name}",
                 f"train.seed={seed}", f"train.max_epochs={args.max_epochs}", "train.device=cpu",
                 "train.refit_epochs=valid", "train.early_stopping=valid", f"model.emb_dim={args.emb_dim}",
                 "model.mm_dim=128"]
    overrides += [f"{key}={set_value(value)}" for key, _, value in SETTINGS[model]] + side_overrides
    run_dir = args.work / "project" / "runs" / name
    if args.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [python, "src/train.py", "--config", f"configs/{model}.yaml", "--refit"]
    for o in overrides:
        cmd += ["--set", o]
    out = args.work / "project_logs" / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run(cmd, REPO, out=out)
    history = json.loads((run_dir / "refit" / "history.json").read_text())
    text = out.read_text()
    m = re.search(r"([\d,]+) parameters", text)
    params = int(m.group(1).replace(",", "")) if m else None
    if params is None:  # a reused refit does not print its count: read it from an earlier log
        old = args.work / "project_logs" / f"{name}.params"
        params = int(old.read_text()) if old.is_file() else None
    else:
        (args.work / "project_logs" / f"{name}.params").write_text(str(params))
    epochs = [{"epoch": r["epoch"], "valid_auc": r["valid_auc"], "valid_logloss": r.get("valid_logloss"),
               "train_loss": r.get("train_loss")} for r in history]
    log(f"{side} {model} seed {seed}: {len(epochs)} epochs, {params} parameters, {time.time() - start:.0f}s")
    return {"epochs": epochs, "params": params}


# ---------------------------------------------------------------------------------------------
# same weights, same function: the released checkpoint loaded into the project's model
# ---------------------------------------------------------------------------------------------

def map_name(model: str, name: str, n_mlp: int) -> str | None:
    """The project's state_dict name of a released one (None: nothing to map)."""
    emb = "" if model == "qin" else "embedding."
    fixed = {"likes_level": "levels.likes", "views_level": "levels.views", "item_id": "items.item_id",
             "item_tags": "items.tag"}
    m = re.fullmatch(r"embedding_layer\.embedding_layer\.embedding_layers\.(\w+)\.weight", name)
    if m:
        return f"{emb}{fixed[m.group(1)]}.weight"
    if name == "embedding_layer.embedding_layer.feature_encoders.item_emb_d128.weight":
        return f"{emb}items.mm.weight"
    if model == "qin":
        for pattern, repl in ((r"attention_layers\.(.*)", r"asta.\1"), (r"qnn\.norm\.(.*)", r"interaction.norms.\1"),
                              (r"qnn\.layer\.(\d+)\.linear\.0\.(.*)", r"interaction.linears.\1.\2"),
                              (r"qnn\.activation\.(.*)", r"interaction.acts.\1"), (r"qnn\.fc\.(.*)", r"out.\1")):
            if re.fullmatch(pattern, name):
                return re.sub(pattern, repl, name)
        return None
    m = re.fullmatch(r"attention_layers\.attention_layer\.mlp\.(\d+)\.(.*)", name)
    if m:  # Linear, ReLU, Dropout per hidden layer, then the score Linear
        k = int(m.group(1)) // 3  # the last Linear (the score) is renamed by the caller
        return f"embedding.pool.{'input' if k == 0 else f'mlp.{3 * (k - 1)}'}.{m.group(2)}"
    m = re.fullmatch(r"dnn\.mlp\.(\d+)\.(.*)", name)
    if m:  # Linear, BatchNorm, ReLU, Dropout per hidden layer, then the output Linear
        k = int(m.group(1))
        return f"out.{m.group(2)}" if k == 4 * n_mlp else f"mlp.{k}.{m.group(2)}"
    return None


def forward_check_child(model: str, code_dir: Path, run_dir: Path, raw: Path, emb_dim: int, rows: int,
                        n_steps: int = 10) -> None:
    """Runs in the venv: the released model with its trained checkpoint, the project's model with
    the same weights; prints one JSON line comparing predictions, valid AUC, loss and gradients."""
    import numpy as np
    import pandas as pd
    import torch
    from fuxictr.features import FeatureMap
    from fuxictr.utils import load_config
    from sklearn.metrics import roc_auc_score
    import src as zoo  # the released package (exported code)
    from src.mmctr_dataloader import MMCTRDataLoader
    from mmctr.models import fit as pfit  # the project's models kit
    from mmctr.models import tables as ptables
    from mmctr.models.din import DIN
    from mmctr.models.qin import QIN

    torch.use_deterministic_algorithms(True)
    expid = f"{RELEASED[model]['model']}_reconcile"
    params = load_config(str(run_dir / "config"), expid)
    params["gpu"] = -1
    data_dir = run_dir / "data" / "synthetic"
    fm = FeatureMap("synthetic", str(data_dir))
    fm.load(str(data_dir / "feature_map.json"), params)
    rel = getattr(zoo, params["model"])(fm, **params)
    rel.load_weights(str(run_dir / "checkpoints" / "synthetic" / f"{expid}.model"))

    item_info = pd.read_parquet(raw / "item_info.parquet")
    frames = {s: pd.read_parquet(raw / f"{s}.parquet") for s in ("train", "valid")}
    tables = ptables.item_tables(item_info, frames.values())
    kwargs = {key.split(".", 1)[1]: value for key, _, value in SETTINGS[model] if key.startswith("model.")}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    proj = (QIN if model == "qin" else DIN)(tables, emb_dim=emb_dim, mm_dim=128, **kwargs)
    n_mlp = len(kwargs.get("mlp_hidden", ()))
    rel_state = rel.state_dict()
    att_linears = sorted({int(m.group(1)) for n in rel_state
                          for m in [re.fullmatch(r"attention_layers\.attention_layer\.mlp\.(\d+)\..*", n)] if m})
    mapping = {}
    for name in rel_state:
        target = map_name(model, name, n_mlp)
        if model == "din" and att_linears and name.startswith(f"attention_layers.attention_layer.mlp.{att_linears[-1]}."):
            target = "embedding.pool.score." + name.rsplit(".", 1)[1]
        if target is not None:
            mapping[name] = target
    proj_state = proj.state_dict()
    missing = sorted(set(proj_state) - set(mapping.values()))
    if missing:
        raise SystemExit(f"forward check: project parameters with no released counterpart: {missing}")
    proj.load_state_dict({mapping[n]: v for n, v in rel_state.items() if n in mapping})

    def project_batch(frame):
        arrays = ptables.row_arrays(frame)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def released_batches(split, batch_size):
        loader = MMCTRDataLoader(fm, str(raw / f"{split}.parquet"), str(raw / "item_info.parquet"),
                                 batch_size=batch_size, shuffle=False, num_workers=0, max_len=64)
        return iter(loader)

    # 1. eval mode, the whole valid split: the same probabilities and AUC?
    rel.eval()
    proj.eval()
    with torch.no_grad():
        p_rel = np.concatenate([rel.forward(b)["y_pred"].view(-1).numpy() for b in released_batches("valid", 8192)])
        pb = project_batch(frames["valid"])
        p_proj = torch.sigmoid(proj(pb)).numpy()
    labels = frames["valid"]["label"].to_numpy()
    out = {"model": model, "checkpoint": str(run_dir.name), "valid_rows": int(len(labels)),
           "max_abs_prob_diff": float(np.abs(p_rel - p_proj).max()),
           "valid_auc_released_model": float(roc_auc_score(labels, p_rel)),
           "valid_auc_project_model": float(roc_auc_score(labels, p_proj))}

    # 2. train mode (batch norm on batch statistics), dropout off on both sides, one batch: the
    # same loss (BCE + embedding L2) and the same gradient of every parameter?
    for net in (rel, proj):
        net.train()
        for mod in net.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    batch = next(released_batches("train", rows))
    rel.zero_grad()
    pred_rel = rel.forward(batch)["y_pred"]
    y_rel = rel.get_labels(batch)
    loss_rel = rel.compute_loss({"y_pred": pred_rel}, y_rel)
    loss_rel.backward()
    grads_rel = {name: p.grad.clone() for name, p in rel.named_parameters()}
    settings = pfit.FitSettings(emb_l2=float(params["embedding_regularizer"]))
    decayed = pfit.embedding_parameters(proj)
    frame = frames["train"].iloc[:rows]
    label = torch.from_numpy(frame["label"].to_numpy()).float()
    proj_params = dict(proj.named_parameters())

    def project_grads(fuxictr_loss: bool):
        """The project's loss and gradients on the batch; fit.py's Adam adds emb_l2 * W to the
        decayed parameters' gradients (weight_decay), the gradient of the penalty emb_l2/2 ||W||^2
        that FuxiCTR adds to its loss, so the penalty is added here to compare like with like.
        fuxictr_loss: BCE on sigmoid probabilities (FuxiCTR's loss) instead of on logits (fit.py's)."""
        proj.zero_grad()
        state = {k: v.clone() for k, v in proj.state_dict().items()}  # batch norm statistics move
        loss, _ = proj.loss(project_batch(frame), label, "fuxictr" if fuxictr_loss else "logits")
        loss = loss + sum((p * p).sum() for p in decayed) * settings.emb_l2 / 2
        loss.backward()
        proj.load_state_dict(state)
        grads = {name: proj_params[mapping[name]].grad.clone() for name in grads_rel}
        diff = sum(float(((grads_rel[n] - grads[n]) ** 2).sum()) for n in grads) ** 0.5
        norm = sum(float((g ** 2).sum()) for g in grads_rel.values()) ** 0.5
        worst = max(grads, key=lambda n: float((grads_rel[n] - grads[n]).norm()) / max(float(grads_rel[n].norm()), 1e-3 * norm))
        return float(loss.detach()), diff / norm, worst

    loss_proj, grad_diff, worst = project_grads(False)
    loss_proj_fx, grad_diff_fx, worst_fx = project_grads(True)
    saturated = int(((pred_rel.view(-1) == 1.0) & (y_rel.view(-1) == 0)).sum())
    out.update(train_rows=rows, loss_released=float(loss_rel.detach()), loss_project=loss_proj,
               grad_rel_diff=grad_diff, worst_param=worst, loss_project_fuxictr_bce=loss_proj_fx,
               grad_rel_diff_fuxictr_bce=grad_diff_fx, worst_param_fuxictr_bce=worst_fx,
               saturated_negatives=saturated, grad_norm_released=sum(float((g ** 2).sum()) for g in grads_rel.values()) ** 0.5,
               decayed_params_project=sorted(n for n, p in proj.named_parameters() if any(p is q for q in decayed)))

    # 3. a few training steps from the same fresh initial weights on the same batches (the first
    # train rows in order), dropout off: the released train_step against fit.py's step (loss,
    # backward, clip_grad_norm_, Adam with the embedding L2 as weight decay), once with fit.py's BCE
    # on logits, once with FuxiCTR's BCE on probabilities, once with that BCE and the L2 penalty in
    # the loss (clipped with it, plain Adam: FuxiCTR's step), and once more on logits from weights
    # perturbed by 1e-6 (relative): how fast float noise alone makes two runs part. Losses shown
    # with the L2 penalty added on the project's side, as FuxiCTR's loss includes it.
    torch.manual_seed(0)
    rel = getattr(zoo, params["model"])(fm, **params)
    rel._max_gradient_norm = 10.0  # fit()'s default, which run_expid.py does not override
    copies = {}
    noise = torch.Generator().manual_seed(1)
    for variant in ("logits", "fuxictr_bce", "fuxictr_bce_l2_in_loss", "logits_perturbed"):
        net = (QIN if model == "qin" else DIN)(tables, emb_dim=emb_dim, mm_dim=128, **kwargs)
        net.load_state_dict({mapping[n]: v for n, v in rel.state_dict().items() if n in mapping})
        if variant == "fuxictr_bce_l2_in_loss":
            # FuxiCTR's order too: the penalty in the loss, so that clipping scales its gradient with
            # the rest (fit.py clips the data gradient, then Adam adds emb_l2 * W unscaled)
            decayed_ = pfit.embedding_parameters(net)
            copies[variant] = (net, torch.optim.Adam(net.parameters(), lr=float(params["learning_rate"])), decayed_)
            continue
        if variant == "logits_perturbed":  # how far float noise alone carries a run: weights x (1 + 1e-6 N(0, 1))
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(1 + 1e-6 * torch.randn(p.shape, generator=noise))
        # the L2 by Adam's weight decay after the clip (train.emb_l2_in_loss=false)
        copies[variant] = (net, pfit.make_optimizer(net, pfit.FitSettings(lr=float(params["learning_rate"]),
                                                                          emb_l2=settings.emb_l2,
                                                                          emb_l2_in_loss=False)), None)
    # and fit.py's own loop (train_one_epoch, one batch per call) with FuxiCTR's step switched on:
    # train.loss=fuxictr, train.emb_l2_in_loss=true
    fit_net = (QIN if model == "qin" else DIN)(tables, emb_dim=emb_dim, mm_dim=128, **kwargs)
    fit_net.load_state_dict({mapping[n]: v for n, v in rel.state_dict().items() if n in mapping})
    fit_settings = pfit.FitSettings(lr=float(params["learning_rate"]), emb_l2=settings.emb_l2, batch_size=rows,
                                    grad_clip=10.0, loss="fuxictr", emb_l2_in_loss=True)
    fit_loss_fn, _, fit_opt, fit_autocast = pfit.make_step_parts(fit_net, fit_settings)
    fit_shuffle = torch.Generator().manual_seed(0)
    for net in [rel, fit_net] + [c[0] for c in copies.values()]:
        net.train()
        for mod in net.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    columns = project_batch(frames["train"])
    columns["label"] = columns["label"].float()
    steps = []
    for i, batch in enumerate(released_batches("train", rows)):
        if i >= n_steps:
            break
        rel._batch_index = i
        record = {"step": i + 1, "released": float(rel.train_step(batch).detach())}
        idx = torch.arange(i * rows, min((i + 1) * rows, len(frames["train"])))
        for variant, (net, opt, in_loss) in copies.items():
            if not variant.startswith("fuxictr_bce"):
                loss, logits = net.loss(pfit.gather(columns, idx), columns["label"][idx])
            else:
                logits = net(pfit.gather(columns, idx))
                loss = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), columns["label"][idx])
            if in_loss is not None:
                loss = loss + sum((p * p).sum() for p in in_loss) * settings.emb_l2 / 2
                penalty = 0.0
            else:
                with torch.no_grad():
                    penalty = sum(float((p * p).sum()) for g in opt.param_groups if g["weight_decay"] > 0
                                  for p in g["params"]) * settings.emb_l2 / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 10.0, foreach=True)
            opt.step()
            record[variant] = float(loss.detach()) + penalty
            record[f"{variant}_grad_norm"] = float(norm)
            record[f"{variant}_saturated_negatives"] = int(((torch.sigmoid(logits.detach()) == 1.0)
                                                            & (columns["label"][idx] == 0)).sum())
        with torch.no_grad():
            penalty = sum(float((p * p).sum()) for p in pfit.embedding_parameters(fit_net)) * settings.emb_l2 / 2
        loss, _ = pfit.train_one_epoch(fit_net, fit_loss_fn, fit_opt, columns, idx, fit_shuffle, fit_settings,
                                       fit_autocast)
        record["fit_fuxictr"] = loss + penalty
        steps.append(record)
    out["steps"] = steps
    print("FORWARD_CHECK " + json.dumps(out))


def forward_check(model: str, seed: int, args, raw: Path, code_dir: Path) -> dict:
    run_dir = args.work / "released" / f"{model}_s{seed}"
    cmd = [args.venv_python, str(Path(__file__).resolve()), "--venv-python", args.venv_python,
           "--child-forward-check", model, str(code_dir), str(run_dir), str(raw), str(args.emb_dim)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    log(" ".join(cmd))
    # the child imports the released package (src/ of the clone) and the project's (mmctr)
    path = os.pathsep.join([str(code_dir), str(REPO / "src")])
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("FORWARD_CHECK ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"forward check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(line.split(" ", 1)[1])
    log(f"forward check {model}: {result}")
    return result


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def stats(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


SIDE_NAMES = {"released": "released", **{side: label for side, (label, _, _) in PROJECT_SIDES.items()}}


def table(results: dict, seeds: list[int], models: list[str], sides_asked: list[str]) -> str:
    lines = []
    for model in models:
        sides = [side for side in sides_asked if results.get((side, model))]
        if not sides:
            continue
        lines.append(f"### {model}: valid AUC per epoch\n")
        lines.append("Trainable parameters: " + "; ".join(
            f"{SIDE_NAMES[side]} " + ", ".join(f"{p:,}" for p in sorted({r.get('params') for r in results[(side, model)].values()} - {None}))
            for side in sides) + ".\n")
        head = ["epoch"]
        for side in sides:
            head += [f"{side} s{s}" for s in seeds] + [f"{side} mean", f"{side} min..max"]
        head += [f"{side} - released (means)" for side in sides if side != "released" and "released" in sides]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---:"] * len(head)) + "|")
        n_epochs = max(len(r["epochs"]) for side in sides for r in results[(side, model)].values())
        for e in range(1, n_epochs + 1):
            row, means = [str(e)], {}
            for side in sides:
                vals = []
                for s in seeds:
                    rec = next((x for x in results[(side, model)].get(s, {"epochs": []})["epochs"] if x["epoch"] == e), None)
                    row.append(f"{rec['valid_auc']:.4f}" if rec else "-")
                    if rec:
                        vals.append(rec["valid_auc"])
                if len(vals) == len(seeds):
                    mean, lo, hi = stats(vals)
                    means[side] = mean
                    row += [f"{mean:.4f}", f"{lo:.4f}..{hi:.4f}"]
                else:
                    row += ["-", "-"]
            for side in sides:
                if side != "released" and "released" in sides:
                    row.append(f"{means[side] - means['released']:+.4f}" if side in means and "released" in means else "-")
            lines.append("| " + " | ".join(row) + " |")
        # the same, compact: mean (min..max) per side and epoch, over the seeds that every side has
        lines.append("\nCompact: mean (min..max) over the seeds.\n")
        head = ["epoch"] + [side for side in sides] + [f"{side} - released" for side in sides
                                                       if side != "released" and "released" in sides]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---:"] * len(head)) + "|")
        for e in range(1, n_epochs + 1):
            row, means = [str(e)], {}
            for side in sides:
                vals = [x["valid_auc"] for s in seeds for x in results[(side, model)].get(s, {"epochs": []})["epochs"]
                        if x["epoch"] == e]
                if len(vals) == len(seeds):
                    mean, lo, hi = stats(vals)
                    means[side] = mean
                    row.append(f"{mean:.4f} ({lo:.4f}..{hi:.4f})")
                else:
                    row.append("-")
            row += [f"{means[side] - means['released']:+.4f}" if side in means and "released" in means else "-"
                    for side in sides if side != "released" and "released" in sides]
            lines.append("| " + " | ".join(row) + " |")
        best = {}  # the epoch early stopping keeps: each run's best valid AUC
        for side in sides:
            vals = [max(x["valid_auc"] for x in results[(side, model)][s]["epochs"]) for s in seeds
                    if results[(side, model)].get(s, {}).get("epochs")]
            if len(vals) == len(seeds):
                best[side] = stats(vals)
        if "released" in best:
            rm, rlo, rhi = best["released"]
            lines.append(f"\nBest epoch (the one early stopping keeps): released mean {rm:.4f} ({rlo:.4f}..{rhi:.4f}, "
                         f"spread {rhi - rlo:.4f})" + "".join(
                             f"; {SIDE_NAMES[side]} mean {m:.4f} ({lo:.4f}..{hi:.4f}), {m - rm:+.4f}, "
                             f"{'within' if rlo <= m <= rhi else 'OUTSIDE'} the released min..max"
                             for side, (m, lo, hi) in best.items() if side != "released") + ".")
        # the project's sides share each seed's initial weights, dropout and shuffles: paired
        project_sides = [side for side in sides if side in PROJECT_SIDES]
        for a, b in itertools.combinations(project_sides, 2):
            diffs = [max(x["valid_auc"] for x in results[(b, model)][s]["epochs"])
                     - max(x["valid_auc"] for x in results[(a, model)][s]["epochs"])
                     for s in seeds if results[(a, model)].get(s) and results[(b, model)].get(s)]
            if diffs:
                lines.append(f"\nBest epoch, {b} - {a} per seed (same initial weights and shuffles): "
                             + ", ".join(f"{d:+.4f}" for d in diffs) + f"; mean {sum(diffs) / len(diffs):+.4f}, "
                             f"positive for {sum(d > 0 for d in diffs)} of {len(diffs)} seeds.")
        lines.append("")
    return "\n".join(lines)


def check_table(checks: dict) -> str:
    lines = ["### Same weights: each released checkpoint loaded into the project's model\n",
             "Eval mode on the whole valid split; train mode (batch statistics, dropout off) on the first train "
             "batch: loss (BCE + embedding L2) and the relative difference of all gradients, "
             "||g_project - g_released|| / ||g_released||, with the project's BCE on logits and with FuxiCTR's "
             "BCE on sigmoid probabilities.\n",
             "| model | checkpoint | max abs prob. diff (valid) | valid AUC released / project model | train rows | "
             "rows p = 1.0, label 0 | loss released | loss project (logits) | grad diff | "
             "loss project (FuxiCTR BCE) | grad diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, c in checks.items():
        lines.append(f"| {model} | {c['checkpoint']} | {c['max_abs_prob_diff']:.1e} | "
                     f"{c['valid_auc_released_model']:.6f} / {c['valid_auc_project_model']:.6f} | {c['train_rows']:,} | "
                     f"{c['saturated_negatives']} | {c['loss_released']:.6f} | {c['loss_project']:.6f} | "
                     f"{c['grad_rel_diff']:.1e} | {c['loss_project_fuxictr_bce']:.6f} | {c['grad_rel_diff_fuxictr_bce']:.1e} |")
    for model, c in checks.items():
        if not c.get("steps"):
            continue
        lines += ["", f"{model}: training steps from the same fresh initial weights (torch seed 0) on the same "
                  f"batches of {c['train_rows']:,} train rows, dropout off; loss before each step (BCE + embedding L2). "
                  "Project: fit.py's step with its BCE on logits, and with FuxiCTR's BCE on sigmoid probabilities "
                  "(diagnostic). Rows p = 1.0, label 0: saturated negatives in the batch (project, logits run).\n",
                  "| step | released | project (logits) | grad norm | rows p = 1.0, label 0 | project (FuxiCTR BCE) | grad norm "
                  "| project (FuxiCTR BCE, L2 in the loss before clipping) | project (logits), weights x (1 + 1e-6 N(0,1)) "
                  "| fit.py, train.loss=fuxictr, train.emb_l2_in_loss=true |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in c["steps"]:
            lines.append(f"| {r['step']} | {r['released']:.4f} | {r['logits']:.4f} | {r['logits_grad_norm']:.2f} | "
                         f"{r['logits_saturated_negatives']} | {r['fuxictr_bce']:.4f} | {r['fuxictr_bce_grad_norm']:.2f} | "
                         + (f"{r['fuxictr_bce_l2_in_loss']:.4f} |" if "fuxictr_bce_l2_in_loss" in r else "- |")
                         + (f" {r['logits_perturbed']:.4f} |" if "logits_perturbed" in r else " - |")
                         + (f" {r['fit_fuxictr']:.4f} |" if "fit_fuxictr" in r else " - |"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv-python", required=True, help="python of the venv with fuxictr==2.3.7")
    parser.add_argument("--qin-repo", type=Path, help="checkout or git mirror of salmon1802/QIN")
    parser.add_argument("--qin-ref", default="master")
    parser.add_argument("--din-repo", type=Path, help="checkout or git mirror of reczoo/WWW2025_MMCTR_Challenge")
    parser.add_argument("--din-ref", default="main")
    parser.add_argument("--work", type=Path, default=Path("/tmp/reconcile"), help="everything goes here")
    parser.add_argument("--preset", default="demo", help="src/make_synthetic.py preset")
    parser.add_argument("--data-seed", type=int, default=20242025)
    parser.add_argument("--train-rows", type=int, default=0, help="keep a seeded random N train rows (0: all)")
    parser.add_argument("--test-rows", type=int, default=0,
                        help="keep the first N test rows (0: all); both codes predict test, nothing scores it")
    parser.add_argument("--seeds", default="20242025,1,2", help="training seeds, comma-separated")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--emb-dim", type=int, default=16, help="E on both sides (released QIN 128, DIN 64)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="training batch size on both sides (0: the released one, 8192 for both models)")
    parser.add_argument("--models", default="qin,din")
    parser.add_argument("--sides", default="released,project")
    parser.add_argument("--num-workers", type=int, default=1, help="FuxiCTR DataLoader workers (speed only)")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--table-only", action="store_true", help="no training: the table of what is there")
    parser.add_argument("--check-forward", action="store_true",
                        help="also load each model's released checkpoint (first seed) into the project's model "
                             "and compare predictions, loss and gradients (runs in the venv)")
    parser.add_argument("--child-forward-check", nargs=5, metavar=("MODEL", "CODE", "RUN", "RAW", "E"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_forward_check:  # the venv side of --check-forward
        if args.batch_size:
            for model in SETTINGS:
                SETTINGS[model] = [(k, r, args.batch_size if k == "train.batch_size" else v) for k, r, v in SETTINGS[model]]
        model, code, run_dir, raw, emb = args.child_forward_check
        forward_check_child(model, Path(code), Path(run_dir), Path(raw), int(emb), args.batch_size or 2048)
        return
    args.work = args.work.resolve()
    if args.batch_size:
        for model in SETTINGS:
            SETTINGS[model] = [(k, r, args.batch_size if k == "train.batch_size" else v) for k, r, v in SETTINGS[model]]
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m for m in args.models.split(",") if m]
    sides = [s for s in args.sides.split(",") if s]
    for side in sides:
        if side not in SIDE_NAMES:
            raise SystemExit(f"--sides: unknown side {side!r} ({', '.join(SIDE_NAMES)})")
    python = sys.executable
    venv = Path(args.venv_python)
    if Path(sys.prefix).resolve() == venv.parent.parent.resolve() or "fuxictr" in sys.modules:
        raise SystemExit("run this script with the project's python (the main environment), not the venv's")
    for model in models:
        if model not in SETTINGS:
            raise SystemExit(f"--models: {model!r} is not one of {', '.join(SETTINGS)}")
    if "released" in sides and not args.table_only:
        for model in models:
            if getattr(args, RELEASED[model]["repo_arg"]) is None:
                raise SystemExit(f"--{RELEASED[model]['repo_arg'].replace('_', '-')} is required for {model}")
    args.work.mkdir(parents=True, exist_ok=True)
    if REPO in args.work.parents or args.work == REPO:
        raise SystemExit("--work must be outside the repository (the released code is exported there)")

    results: dict = {}
    results_file = args.work / "results.json"
    if results_file.is_file():
        for key, runs_ in json.loads(results_file.read_text()).items():
            side, model = key.split(":")
            results[(side, model)] = {int(s): r for s, r in runs_.items()}

    checks_file = args.work / "forward_check.json"

    def save():
        results_file.write_text(json.dumps({f"{side}:{model}": {str(s): r for s, r in v.items()}
                                            for (side, model), v in results.items()}, indent=1))

    if not args.table_only:
        raw, vocab = make_data(args, python)
        log(f"data: {raw}  vocabularies {vocab}")
        code_root = Path(tempfile.mkdtemp(prefix="released_code_", dir=args.work))
        try:
            for model in models:
                code_dir = None
                if "released" in sides:
                    code_dir = code_root / model
                    export_released(getattr(args, RELEASED[model]["repo_arg"]).resolve(),
                                    getattr(args, RELEASED[model]["ref_arg"]), code_dir)
                for seed in seeds:
                    for side in sides:
                        if side == "released":
                            rec = run_released(model, seed, args, raw, vocab, code_dir)
                        else:
                            rec = run_project(model, seed, args, raw, python, side)
                        results.setdefault((side, model), {})[seed] = rec
                        save()
                if args.check_forward and "released" in sides:
                    checks = json.loads(checks_file.read_text()) if checks_file.is_file() else {}
                    checks[model] = forward_check(model, seeds[0], args, raw, code_dir)
                    checks_file.write_text(json.dumps(checks, indent=1))
        finally:
            shutil.rmtree(code_root, ignore_errors=True)  # released code never outlives the run
    text = table(results, seeds, models, sides)
    if checks_file.is_file():
        text += "\n" + check_table(json.loads(checks_file.read_text()))
    (args.work / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
