#!/usr/bin/env bash
# The speed check of issue 31: one command, at most 8 minutes on one H100/H200, on the packages the
# GPU image has (installs nothing, never imports lightgbm). It generates the full preset, checks on
# the demo preset that every speed option of fit.py (train.cuda_graphs, train.foreach_l2) takes the
# default step (same loss, gradients and update from the same weights, beside a rerun of the
# default step: the device's noise), then measures QIN, DIN-TF, DCNv2-TF, SimQIN and Transformer +
# DCNv2 (GPU config) train rows/s with the default step and with each option (bench.py --compare,
# --repeats 3, medians), QIN's prediction of the 379,142 test rows (also in one eval batch), a
# profile of each config's default step and its CUDA-graph variant, and, while time remains, DIN-TF
# and DCNv2-TF compiled.
#
#   bash tools/gpu_speed.sh          # GPU: writes $OUT (or gpu_speed_out/); data and logs in ${TMPDIR:-/tmp}/gpu_speed_data
#   bash tools/gpu_speed.sh --cpu    # the CPU rehearsal of every path (tiny preset; tests/test_gpu_check.py)
#
# Options: --out DIR, --data-root DIR, --budget SECONDS (default 470), --repeats N (default 3),
# --step-limit NAME=SECONDS. Details: tools/verify/gpu_speed.py --help.
#
# Writes 5 files to OUT, rewritten after every step: gpu_speed.json, gpu_speed.md (tables for
# docs/BENCHMARKS.md), profile.json, bench_lines.jsonl and logs.tgz; the last line on stdout is
# GPU_SPEED_SUMMARY {...}, every figure on one line.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # tools/verify/*.py and tools/bench.py import mmctr
exec "${PYTHON:-python3}" tools/verify/gpu_speed.py "$@"
