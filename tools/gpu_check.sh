#!/usr/bin/env bash
# The GPU check: one command, about 8 minutes on one H100/H200, on the packages the GPU image has
# (never installs anything, never imports lightgbm). In the order of what the figures are worth:
# the eager bench of the configs of run.sh --preset full on the full preset (one QIN epoch of the
# 3.6M train rows and the 379,142-row test prediction among them) with a profile of each config's
# training step, QIN with CUDA graphs and compiled, and every model trained on CUDA (finite loss,
# AUC above chance; bf16, compiled and rerun agree with the default run), then the projected
# run.sh --preset full. The speed options of issue 31 have their own check: tools/gpu_speed.sh.
#
#   bash tools/gpu_check.sh                 # GPU: full + demo presets, published configs, device cuda
#   bash tools/gpu_check.sh --cpu           # the CPU rehearsal of every GPU-mode path (tests run it)
#
# Options: --out DIR (default $OUT when set, else gpu_check_out), --data-root DIR (default
# ${TMPDIR:-/tmp}/gpu_check_data), --budget SECONDS (default 470; 600 with --cpu), --jobs N,
# --no-compile, --blend-seconds S, --step-limit NAME=SECONDS. Details: tools/verify/gpu_check.py --help.
#
# Writes 5 files to OUT, rewritten after every step: gpu_check.json, gpu_check.md (a section for
# docs/BENCHMARKS.md), bench_lines.jsonl (tools/bench.py's lines as printed), profile.json (the
# profile of one training step per config) and logs.tgz; the last line on stdout is a one-line
# JSON summary of every target figure (GPU_CHECK_SUMMARY {...}).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # tools/verify/gpu_check.py and tools/bench.py import mmctr
exec "${PYTHON:-python3}" tools/verify/gpu_check.py "$@"
