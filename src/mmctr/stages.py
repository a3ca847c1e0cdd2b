"""Run several stage scripts one after another in one Python process (what run.sh does).

    python src/stages.py [--started UNIX_TIME] [--fold-workers N] \\
        :: preprocess --config configs/data.yaml \\
        :: train --config configs/qin_small.yaml --set train.max_epochs=2 \\
        :: train --config configs/dcnv2_tf_small.yaml

Each ``:: STAGE ARGS...`` is exactly ``python src/STAGE.py ARGS...``: the same main(), the same
arguments, the same files. Only the process is shared: a stage costs its own work and not another
start of Python, torch and pandas (2-4 s each on a 2-core machine, more while other jobs run; run.sh
has a dozen stages). Before each stage a header line ``=== STAGE [model config] (N s)`` gives the time
since --started (run.sh passes its own start). The first stage that fails ends the process as its
script would have: a user error is one line on stderr and exit code 2, and no later stage runs.

--fold-workers N (N > 1) trains on the CPU with N processes of one thread each: when the chain
comes to a run of consecutive train stages, N workers train the folds of those stages (train.py's
fold claims share them out, so each fold is trained once, by whichever worker is free), and then
the train stages run as usual, finding their folds done: they write each run's aggregates, summary
and experiment row, and train what a worker left (a refit; a fold whose worker failed, on one
thread as a worker would have, so the run has the bits of one whose workers did not fail). A
CPU trains these models' small batches barely faster with two threads than with one (their
operations are too small to split well, and threads that wait spin), so two one-thread workers
train about twice as many rows per second on two cores, and a busy core slows one worker instead
of stalling both threads. A fold's numbers depend on its thread count (done.json records it), not
on which worker trained it. Train stages on CUDA, with --devices, --refit or --folds are left out.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import time
from pathlib import Path

from mmctr import common

STAGES = ("make_synthetic", "preprocess", "train", "blend", "single", "score", "summary", "validate_submission",
          "experiments")
SEPARATOR = "::"


def parse(argv: list[str]) -> tuple[float, int, list[tuple[str, list[str]]]]:
    """(start time, fold workers, [(stage, its arguments)]) from
    ``[--started T] [--fold-workers N] :: STAGE ARGS ... :: STAGE ARGS ...``."""
    options = {"--started": time.time(), "--fold-workers": 1}
    kinds = {"--started": (float, "a Unix time"), "--fold-workers": (int, "a whole number of processes")}
    while argv[:1] and argv[0] in options:
        kind, what = kinds[argv[0]]
        if len(argv) < 2:
            raise common.UserError(f"stages.py: {argv[0]} needs {what}")
        try:
            options[argv[0]] = kind(argv[1])
        except ValueError:
            raise common.UserError(f"stages.py: {argv[0]} needs {what}, got {argv[1]!r}") from None
        argv = argv[2:]
    if options["--fold-workers"] < 1:
        raise common.UserError(f"stages.py: --fold-workers needs at least 1 process, got {options['--fold-workers']}")
    if argv[:1] != [SEPARATOR]:
        raise common.UserError(f"stages.py: expected '{SEPARATOR} STAGE ARGS...', got {' '.join(argv[:3]) or 'nothing'}")
    stages: list[tuple[str, list[str]]] = []
    for token in argv:
        if token == SEPARATOR:
            stages.append(("", []))
        elif not stages[-1][0]:
            if token not in STAGES:
                raise common.UserError(f"stages.py: unknown stage {token!r} (known: {', '.join(STAGES)})")
            stages[-1] = (token, [])
        else:
            stages[-1][1].append(token)
    if any(not name for name, _ in stages):
        raise common.UserError(f"stages.py: '{SEPARATOR}' must be followed by a stage name")
    return options["--started"], options["--fold-workers"], stages


@contextlib.contextmanager
def threads(count: int | None):
    """torch's thread count set to ``count`` inside (None: left as it is)."""
    if count is None:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def header(name: str, args: list[str], started: float) -> str:
    """'=== train qin_small (refit) (12 s)': a training stage names its model config, every stage its time."""
    parts = [name]
    if name == "train":
        parts += [Path(args[i + 1]).stem for i, arg in enumerate(args[:-1]) if arg == "--config"]
        parts += ["(refit)"] if "--refit" in args else []
    return f"\n=== {' '.join(parts)} ({time.time() - started:.0f} s)"


def shared_folds(train_args: list[list[str]]) -> list[list[str]]:
    """The train stages whose folds fold workers may train: on the CPU, all folds, one device."""
    from mmctr import train
    shared = []
    for args in train_args:
        options, cfg = train.parse_cli(args)
        device = train.parse_config(cfg, options.device)[1].device
        if not (options.refit or options.devices or options.folds) and train.resolve_device(device).type == "cpu":
            shared.append(args)
    return shared


def fold_worker(train_args: list[list[str]]) -> None:
    """One worker: one thread, every fold of these train stages that no other worker has claimed."""
    import torch
    from mmctr import train
    torch.set_num_threads(1)
    train.QUIET_WORKER = True
    for args in train_args:
        options, cfg = train.parse_cli(args)
        common.run_main(lambda: train.run_training(cfg, device=options.device))


def train_in_fold_workers(train_args: list[list[str]], workers: int) -> bool:
    """Every fold of these train stages, trained by ``workers`` one-thread processes; returns when
    all have ended, True when one failed (its folds are left to the train stages)."""
    from mmctr import train
    common.log(f"{workers} fold workers, one thread each, train the folds of "
               f"{', '.join(Path(a[a.index('--config') + 1]).stem for a in train_args)}")
    failed = train.run_worker_processes(fold_worker, {f"fold worker {i}": (train_args,) for i in range(workers)})
    if failed:
        common.log(f"{'; '.join(failed)}: the train stages train what is left, on one thread as the workers did")
    return bool(failed)


def train_blocks(stages: list[tuple[str, list[str]]]) -> dict[int, list[list[str]]]:
    """The first stage of each run of consecutive train stages -> those stages' arguments: the fold
    workers of a run start when its first stage comes, after the stages that build its data."""
    blocks: dict[int, list[list[str]]] = {}
    start = None
    for i, (name, args) in enumerate(stages):
        start = (i if start is None else start) if name == "train" else None
        if start is not None:
            blocks.setdefault(start, []).append(args)
    return blocks


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return
    started, workers, stages = parse(argv)  # every stage name is checked before the first stage runs
    blocks = train_blocks(stages) if workers > 1 else {}
    one_thread: list[list[str]] = []  # the stages whose folds a failed worker left: trained as the workers would
    for i, (name, args) in enumerate(stages):
        module = importlib.import_module(f"mmctr.{name}")
        shared = shared_folds(blocks[i]) if i in blocks else []
        if shared:  # the first train stage of a run of them: the workers go first
            print(header(f"{workers} fold workers", [], started), flush=True)
            if train_in_fold_workers(shared, workers):
                one_thread += shared
        print(header(name, args, started), flush=True)
        program = sys.argv[0]
        sys.argv[0] = f"{name}.py"  # argparse names the script in its usage and error lines
        try:
            with threads(1 if any(args is a for a in one_thread) else None):
                module.main(args)
        finally:
            sys.argv[0] = program
