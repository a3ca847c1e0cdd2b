"""The single-network study behind docs/OWN_MODEL.md: refits of model variants, several seeds, on one
or more synthetic datasets, scored on the hidden test labels.

    PYTHONPATH=src python tools/ablation.py --data-root /tmp/ablation --datasets demo:default,demo:broad \
        --variant qin_small=qin_small --variant "simqin_small -counts=simqin_small,model.similarity=false" \
        --seeds 1,2,3 [--workers 2] [--device cpu] [--set KEY=VALUE ...]

Each dataset PRESET:PROCESS (a make_synthetic.py preset and click process: default, broad, or heavy, whose users
have ~100 train rows each and a taste a user table can learn) is generated once (make_synthetic.py --seed 20242025)
into {data-root}/{preset}_{process} and preprocessed with configs/data.yaml. Each variant LABEL=CONFIG[,KEY=VALUE...]
is trained by `src/train.py --config configs/CONFIG.yaml --refit --set train.refit_epochs=valid` (one
model on every train row, early stopping on the valid split, as the prize-eligible submission is made)
once per seed (train.seed), as run LABEL-slug_sSEED. --workers N trains N runs at a time, each on one
thread (on a small CPU, one-thread processes side by side finish more runs per hour than one process on
every core: src/stages.py). One JSON line per run goes to {data-root}/ablation.jsonl as it finishes; a
rerun skips the runs already there, so an interrupted study resumes. A label already run in this
data root with another config, other KEY=VALUEs or other --set is refused (its run folders hold the
old variant): give the changed variant a new label or another data root. At the end a markdown table
per dataset over the seeds asked for: test AUC mean, min..max over the seeds, valid AUC mean, epochs,
the median train seconds per epoch (train rows / the refit's train rows/s), parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import mmctr  # noqa: F401  (src/mmctr: pip install -e . once, or PYTHONPATH=src)
except ModuleNotFoundError:
    sys.exit(f"{Path(__file__).name}: the repo's package mmctr is not importable: run `pip install -e .` in the "
             f"repo once, or prefix the command with PYTHONPATH=src")
from mmctr import common  # noqa: E402
from mmctr import make_synthetic  # noqa: E402
from mmctr import runs  # noqa: E402

SEED = 20242025  # the presets' seed, as run.sh


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    label, sep, spec = text.partition("=")
    # a comma starts the next KEY=VALUE only where one follows: a list value keeps its commas
    config, *sets = re.split(r",\s*(?=[A-Za-z_][\w.]*=)", spec)
    if not sep or not label or not config or not (REPO / "configs" / f"{config}.yaml").is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=CONFIG[,KEY=VALUE...] with configs/CONFIG.yaml, got {text!r}")
    return label, config, sets


def parse_datasets(text: str) -> list[str]:
    datasets = text.split(",")
    for dataset in datasets:
        preset, sep, process = dataset.partition(":")
        if not sep or preset not in make_synthetic.PRESETS or process not in make_synthetic.PROCESSES:
            raise argparse.ArgumentTypeError(
                f"expected PRESET:PROCESS,... with PRESET in {', '.join(make_synthetic.PRESETS)} and PROCESS in "
                f"{', '.join(make_synthetic.PROCESSES)}, got {dataset!r}")
    return datasets


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def check_labels(variants: list[tuple[str, str, list[str]]], extra: list[str], results: list[dict]) -> None:
    """Refuse labels whose run folders would collide, or that this data root ran as another variant."""
    by_slug: dict[str, str] = {}
    for label, config, sets in variants:
        other = by_slug.setdefault(slug(label), label)
        if other != label:
            sys.exit(f"--variant {label!r} and {other!r} would share run folders ({slug(label)}_sSEED): rename one")
        spec = {"config": config, "overrides": [o.strip() for o in (*sets, *extra)]}
        for r in results:  # an older study kept the space after a comma (" train.lr=1e-3"): the same override
            if r["variant"] == label and {"config": r["config"], "overrides": [o.strip() for o in r["overrides"]]} != spec:
                sys.exit(f"--variant {label!r}: already run in this data root as {r['config']} with "
                         f"{r['overrides']}, now {config} with {spec['overrides']} (--set included): give the "
                         f"changed variant a new label or use another --data-root")


def dataset_paths(root: Path, dataset: str) -> tuple[Path, Path]:
    name = dataset.replace(":", "_")
    return root / name, root / "work" / name


def prepare(root: Path, dataset: str, py: str) -> list[str]:
    """Generate and preprocess the dataset if needed; its --set arguments for train.py."""
    preset, process = dataset.split(":")
    raw, work = dataset_paths(root, dataset)
    if not (raw / "item_info.parquet").is_file():
        subprocess.run([py, "src/make_synthetic.py", "--preset", preset, "--process", process, "--out", str(raw),
                        "--seed", str(SEED)], cwd=REPO, check=True)
    sets = ["--set", f"data.raw_dir={raw}", "--set", f"data.work_dir={work}"]
    subprocess.run([py, "src/preprocess.py", "--config", "configs/data.yaml", *sets], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return sets


def run_one(root: Path, dataset: str, label: str, config: str, sets: list[str], seed: int, data_sets: list[str],
            extra: list[str], device: str, py: str, one_thread: bool = False) -> dict:
    raw, work = dataset_paths(root, dataset)
    name = f"{slug(label)}_s{seed}"
    # early stopping on the valid split: a `_small` config's refit_epochs=folds needs fold runs first
    overrides = ["train.refit_epochs=valid", *sets, *extra, f"train.seed={seed}", f"run.name={name}"]
    argv = [py, "src/train.py", "--config", f"configs/{config}.yaml", *data_sets,
            *[a for s in overrides for a in ("--set", s)], "--refit", "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if one_thread else None
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
    refit = work / "runs" / name / runs.REFIT
    done = common.read_json(refit / "done.json")
    labels = common.read_test_labels(raw)
    return {"dataset": dataset, "variant": label, "config": config, "overrides": [*sets, *extra], "seed": seed,
            "test_auc": runs.hidden_test_auc(refit / "test.parquet", labels), "valid_auc": done["valid_auc"],
            "epochs": done["epochs"], "best_epoch": done["best_epoch"], "train_rows": done["train_rows"],
            "rows_per_s": done["rows_per_s"], "seconds_per_epoch": done["train_rows"] / done["rows_per_s"],
            "params": parameters(refit), "seconds": done["seconds"]}


def parameters(refit: Path) -> int | None:
    import torch
    state = torch.load(refit / "best.pt", map_location="cpu", weights_only=True) if (refit / "best.pt").is_file() else None
    return None if state is None else sum(v.numel() for k, v in state.items() if v.is_floating_point()
                                           and "running_" not in k)


def parameter_cell(runs: list[dict]) -> str:
    """A variant's parameter count: one number (every seed builds the same model), n/a if unread."""
    counts = {r.get("params") for r in runs} - {None}
    return ", ".join(f"{c:,}" for c in sorted(counts)) or "n/a"


def table(results: list[dict], dataset: str, labels: list[str], seeds: list[int]) -> list[str]:
    rows = [r for r in results if r["dataset"] == dataset and r["seed"] in seeds]
    lines = [f"#### {dataset}", "",
             "| variant | test AUC, mean | min..max | valid AUC | epochs | s / epoch | parameters | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        mine = [r for r in rows if r["variant"] == label]
        if not mine:
            continue
        test = [r["test_auc"] for r in mine]
        lines.append(f"| {label} | {statistics.mean(test):.4f} | {min(test):.4f}..{max(test):.4f} | "
                     f"{statistics.mean(r['valid_auc'] for r in mine):.4f} | "
                     f"{statistics.mean(r['epochs'] for r in mine):.1f} | "
                     f"{statistics.median(r['seconds_per_epoch'] for r in mine):.1f} | "
                     f"{parameter_cell(mine)} | {len(mine)} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--datasets", default=["demo:default"], type=parse_datasets,
                        help=f"PRESET:PROCESS,... (make_synthetic.py; processes: {', '.join(make_synthetic.PROCESSES)})")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        metavar="LABEL=CONFIG[,KEY=VALUE...]")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at a time; above 1 each run gets one thread")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    py = sys.executable
    root = args.data_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "ablation.jsonl"
    results = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = args.datasets
    check_labels(args.variant, args.extra, results)
    data_sets = {dataset: prepare(root, dataset, py) for dataset in datasets}
    done = {(r["dataset"], r["variant"], r["seed"]) for r in results}
    # seed by seed: a partial study already compares every variant on every dataset
    todo = [(dataset, seed, variant) for seed in seeds for dataset in datasets for variant in args.variant
            if (dataset, variant[0], seed) not in done]
    failed = []
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_one, root, dataset, label, config, sets, seed, data_sets[dataset], args.extra,
                               args.device, py, args.workers > 1)
                   for dataset, seed, (label, config, sets) in todo]
        for future in as_completed(futures):
            try:
                result = future.result()
            except subprocess.CalledProcessError as e:  # the other runs go on; their results are kept
                failed.append(" ".join(e.cmd[1:]))
                print(f"FAILED (exit {e.returncode}): {failed[-1]}", file=sys.stderr, flush=True)
                continue
            results.append(result)
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{result['dataset']} {result['variant']} seed {result['seed']}: test AUC "
                  f"{result['test_auc']:.4f}, valid {result['valid_auc']:.4f}, {result['epochs']} epochs, "
                  f"{result['seconds_per_epoch']:.1f} s/epoch", flush=True)
    labels = [label for label, _, _ in args.variant]
    print("\n".join(line for dataset in datasets for line in table(results, dataset, labels, seeds)))
    if failed:
        sys.exit(f"{len(failed)} runs failed (above); rerun the same command to retry them")


if __name__ == "__main__":
    main()
