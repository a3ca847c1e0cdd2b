#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one H100, on the packages the GPU image has
# (never installs anything, never imports lightgbm). It proves every model on CUDA (finite loss,
# AUC above chance; bf16 and torch.compile agree with the default run), generates and preprocesses
# the full preset, benchmarks the published configs with and without compile, times one QIN epoch
# of the 3.6M train rows and the 379,142-row test prediction, and projects run.sh --preset full.
#
#   bash tools/gpu_check.sh                 # GPU: full preset, published configs, device cuda
#   bash tools/gpu_check.sh --cpu           # CPU mode (the test): tiny preset, *_small configs
#
# Options: --out DIR (default $OUT when set, else gpu_check_out), --data-root DIR (default
# ${TMPDIR:-/tmp}/gpu_check_data), --budget SECONDS (default 460; 420 with --cpu), --jobs N,
# --compile | --no-compile, --blend-seconds S. Details: tools/gpu_check.py --help.
#
# Writes OUT/gpu_check.json, OUT/gpu_check.md (a section for docs/BENCHMARKS.md),
# OUT/bench_lines.jsonl (tools/bench.py's lines as printed) and OUT/logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
