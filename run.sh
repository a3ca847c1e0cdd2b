#!/usr/bin/env bash
# The whole job, end to end: install what is missing, generate the synthetic data if no data is
# present, preprocess, train every model with k folds, refit the best single network on every
# train row, and write + validate + score two submissions:
#   submissions/NAME-blend.zip         the blend of every model's folds (or refits, --refit): a leaderboard probe
#   submissions/NAME-single-RUN.zip    one network's refit alone: what Task 2's prizes accept
#                                      (no ensemble for training or testing)
# then print a summary table. Every stage reuses what an earlier, interrupted run finished, so
# rerunning this script after a crash or Ctrl-C picks up where it stopped.
#
#   bash run.sh                                  # synthetic demo data, small models, CPU friendly
#   bash run.sh --preset full                    # real sizes, published models (GPU)
#   bash run.sh --data data/MicroLens_1M_x1      # the real data, published models (GPU)
#
# Options:
#   --preset NAME      synthetic preset to use/generate: tiny, demo (default) or full
#   --data DIR         a folder with train/valid/test/item_info.parquet (overrides --preset)
#   --models A,B,...   model configs from configs/ (default: qin_small,dcnv2_tf_small,din_tf_small,
#                      simqin_small on tiny/demo; qin,qin_plus,dcnv2_tf,din_tf,transformer_dcn_gpu,simqin
#                      on full or --data)
#   --folds K          number of folds, 2..127 (default: 3 on the tiny/demo presets, 5 on full or --data)
#   --device DEV       cpu or cuda (default: cuda when present)
#   --gpus 0,1,...     train the folds of each model in parallel, one worker process per listed GPU
#                      (train.py --devices cuda:0,cuda:1,...); docs/GPUS.md
#   --name NAME        submission names: submissions/NAME-blend.zip, NAME-single-RUN.zip (default:
#                      submission)
#   --single RUN       the single network of the prize-eligible submission (default: the model with
#                      the best OOF AUC)
#   --data-root DIR    where presets are generated and derived data goes (default: data)
#   --submissions DIR  folder for the submission files (default: submissions)
#   --train-set K=V    extra override for every training run (repeatable), e.g. train.max_epochs=2
#   --data-set K=V     a data setting for every stage (repeatable), e.g. "data.item_emb={file:
#                      ../item_emb.parquet, column: item_emb_d128_v3}"; with --data, a folder without
#                      its own item_feature.parquet reads the download's one folder up unless
#                      data.item_feature is given
#   --refit            also train each model once on every train row, and blend the refits' test
#                      predictions (weights still fitted on the folds' OOF predictions)
set -euo pipefail
CALLER_DIR=$PWD  # paths given on the command line are relative to where run.sh was called from
cd "$(dirname "$0")"

PRESET=demo
DATA=""
MODELS=""
FOLDS=""
DEVICE=""
GPUS=""
NAME=submission
DATA_ROOT=data
SUBMISSIONS=submissions
TRAIN_SETS=()
DATA_EXTRA=()
REFIT=""
TEST_FROM=folds
SINGLE=auto
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    --preset|--data|--models|--folds|--device|--gpus|--name|--data-root|--submissions|--train-set|--data-set|--single)
      if [ $# -lt 2 ] || [[ "$2" == --* ]]; then
        echo "run.sh: option $1 needs a value (see bash run.sh --help)" >&2; exit 2
      fi ;;
  esac
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --data) DATA=$(from_caller "$2"); shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --folds) FOLDS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --data-root) DATA_ROOT=$(from_caller "$2"); shift 2 ;;
    --submissions) SUBMISSIONS=$(from_caller "$2"); shift 2 ;;
    --train-set)
      if [[ "$2" == data.* ]]; then
        echo "run.sh: --train-set $2: a data setting goes to every stage: give it with --data-set" >&2; exit 2
      fi
      TRAIN_SETS+=(--set "$2"); shift 2 ;;
    --data-set)
      if ! [[ "$2" =~ ^data\.[A-Za-z_][A-Za-z0-9_.]*= ]]; then
        echo "run.sh: --data-set takes data.KEY=VALUE, got '$2'" >&2; exit 2
      fi
      case "${2%%=*}" in  # what run.sh's own options set, with their path and fold handling
        data.raw_dir|data.work_dir|data.n_folds)
          echo "run.sh: --data-set ${2%%=*}: give it with --data, --data-root or --folds" >&2; exit 2 ;;
      esac
      DATA_EXTRA+=(--set "$2"); shift 2 ;;
    --single) SINGLE="$2"; shift 2 ;;
    --refit) REFIT=1; TEST_FROM=refit; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option '$1' (see bash run.sh --help)" >&2; exit 2 ;;
  esac
done

case "$PRESET" in
  tiny|demo|full) ;;
  *) echo "run.sh: --preset must be tiny, demo or full, got '$PRESET'" >&2; exit 2 ;;
esac
# no leading zero: bash and YAML would read 010 as octal 8
if [ -n "$FOLDS" ] && ! [[ "$FOLDS" =~ ^[1-9][0-9]{0,2}$ && "$FOLDS" -ge 2 && "$FOLDS" -le 127 ]]; then
  echo "run.sh: --folds must be an integer from 2 to 127, got '$FOLDS'" >&2; exit 2
fi
case "$DEVICE" in
  ''|cpu|cuda) ;;
  *) echo "run.sh: --device must be cpu or cuda (--gpus picks GPUs), got '$DEVICE'" >&2; exit 2 ;;
esac
DEVICE_ARGS=(${DEVICE:+--device "$DEVICE"})
if [ -n "$GPUS" ]; then
  if ! [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "run.sh: --gpus must be GPU numbers such as 0,1, got '$GPUS'" >&2; exit 2
  fi
  if [ -n "$DEVICE" ]; then
    echo "run.sh: give --device or --gpus, not both" >&2; exit 2
  fi
  DEVICE_ARGS=(--devices "cuda:${GPUS//,/,cuda:}")
fi

if [ -z "$MODELS" ]; then
  case "$DATA:$PRESET" in
    :tiny|:demo) MODELS="qin_small,dcnv2_tf_small,din_tf_small,simqin_small" ;;
    *) MODELS="qin,qin_plus,dcnv2_tf,din_tf,transformer_dcn_gpu,simqin" ;;
  esac
fi
# everything the stages would refuse late, refused before the first one starts
IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
SEEN=","
for model in "${MODEL_LIST[@]}"; do
  if ! [[ "$model" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || [ ! -f "configs/$model.yaml" ]; then
    echo "run.sh: --models: no model config configs/$model.yaml" >&2; exit 2
  fi
  if [[ "$SEEN" == *",$model,"* ]]; then
    echo "run.sh: --models: $model is named twice" >&2; exit 2
  fi
  SEEN+="$model,"
done
if ! [[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
  echo "run.sh: --name must be a plain file stem (letters, digits, _ . -), got '$NAME'" >&2; exit 2
fi
if [ "$SINGLE" != auto ] && { [[ "$SINGLE" == *,* ]] || [[ ",$MODELS," != *",$SINGLE,"* ]]; }; then
  echo "run.sh: --single must be auto or one of the models ($MODELS), got '$SINGLE'" >&2; exit 2
fi
if [ -n "$DATA" ] && [ ! -d "$DATA" ]; then
  echo "run.sh: --data $DATA: no such folder" >&2; exit 2
fi
writable() {  # $1 folder, $2 the option that names it: created if needed, and a file must fit in it
  local probe
  if [ -e "$1" ] && [ ! -d "$1" ]; then
    echo "run.sh: $2 $1: a file, not a folder" >&2; exit 2
  fi
  if ! mkdir -p "$1" 2>/dev/null || ! probe=$(mktemp "$1/.run-sh-probe.XXXXXX" 2>/dev/null); then
    echo "run.sh: $2 $1: cannot write there (read-only, no permission or full)" >&2; exit 2
  fi
  rm -f "$probe"
}
writable "$DATA_ROOT" --data-root
writable "$SUBMISSIONS" --submissions

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
echo; echo "=== setup (0 s)"
# installs only what is missing or outside its range in requirements.txt (an installed torch inside
# it is never replaced), at the versions of requirements-lock.txt, and says what in one line
"$PY" tools/check_requirements.py --install

RAW=${DATA:-$DATA_ROOT/$PRESET}
WORK=$DATA_ROOT/work/$(basename "$RAW")
if [ -z "$FOLDS" ]; then
  case "$DATA:$PRESET" in :tiny|:demo) FOLDS=3 ;; *) FOLDS=5 ;; esac
fi
# text values go to --set quoted for YAML, so that a name like 2025 or yes stays a string
yaml_text() { printf "'%s'" "${1//\'/\'\'}"; }
DATA_SETS=(--set "data.raw_dir=$(yaml_text "$RAW")" --set "data.work_dir=$(yaml_text "$WORK")"
           --set "data.n_folds=$FOLDS")
# the real download keeps item_feature.parquet (the items' own levels, for qin_plus) one folder above
# the four files
if [ -n "$DATA" ] && [ ! -f "$RAW/item_feature.parquet" ] && [ -f "$RAW/../item_feature.parquet" ] \
   && [[ " ${DATA_EXTRA[*]-} " != *" data.item_feature="* ]]; then
  echo "run.sh: the items' levels from $RAW/../item_feature.parquet, where the download keeps it (--data-set data.item_feature=... chooses another)"
  DATA_SETS+=(--set "data.item_feature=../item_feature.parquet")
fi
DATA_SETS+=("${DATA_EXTRA[@]}")

# The stages run as `python src/stages.py :: STAGE ARGS :: STAGE ARGS ...`: each exactly as
# `python src/STAGE.py ARGS`, all in one Python process (a dozen starts of Python and torch cost
# a minute on two cores), which prints a "=== STAGE" line before each
# on the CPU, one one-thread worker per core trains the folds of every model first (stages.py says
# why); training on a GPU is left as it is
# the cores this process may use (GNU nproc would follow OMP_NUM_THREADS, a per-process setting)
WORKERS=$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)')
STAGES=("$PY" src/stages.py --started "$start" --fold-workers "$WORKERS")
BEFORE_CHOICE=()
if [ -z "$DATA" ] && [ ! -f "$RAW/item_info.parquet" ]; then
  BEFORE_CHOICE+=(:: make_synthetic --preset "$PRESET" --out "$RAW" --seed 20242025)
fi
BEFORE_CHOICE+=(:: preprocess --config configs/data.yaml "${DATA_SETS[@]}")
RUNS=()
for model in "${MODEL_LIST[@]}"; do
  BEFORE_CHOICE+=(:: train --config "configs/$model.yaml" "${DATA_SETS[@]}" "${TRAIN_SETS[@]}" "${DEVICE_ARGS[@]}")
  if [ -n "$REFIT" ]; then
    BEFORE_CHOICE+=(:: train --config "configs/$model.yaml" "${DATA_SETS[@]}" "${TRAIN_SETS[@]}" "${DEVICE_ARGS[@]}" --refit)
  fi
  RUNS+=("$model")   # by convention run.name equals the config's file name (tests/test_configs.py)
done
RUN_LIST=$(IFS=','; echo "${RUNS[*]}")
"${STAGES[@]}" "${BEFORE_CHOICE[@]}"

BLEND_SETS=("${DATA_SETS[@]}" --set "blend.runs=[${RUN_LIST}]" --set "blend.submission.name=$(yaml_text "$NAME")"
            --set "blend.submission.dir=$(yaml_text "$SUBMISSIONS")" --set "blend.test_from=$TEST_FROM"
            --set "single.run=$(yaml_text "$SINGLE")")

# the prize-eligible submission is one network: the refit of the chosen run (with --refit every
# model's refit is trained already); the blend is the leaderboard probe. Both write, validate and
# score (on the synthetic test labels) their submission.
BEST=$("$PY" src/single.py --config configs/blend.yaml "${BLEND_SETS[@]}" --choose)
AFTER_CHOICE=()
if [ -z "$REFIT" ]; then
  AFTER_CHOICE+=(:: train --config "configs/$BEST.yaml" "${DATA_SETS[@]}" "${TRAIN_SETS[@]}" "${DEVICE_ARGS[@]}" --refit)
fi
AFTER_CHOICE+=(:: blend --config configs/blend.yaml "${BLEND_SETS[@]}"
               :: single --config configs/blend.yaml "${BLEND_SETS[@]}"
               :: summary --config configs/blend.yaml "${BLEND_SETS[@]}")
"${STAGES[@]}" "${AFTER_CHOICE[@]}"
echo "done in $(( $(date +%s) - start )) s: $SUBMISSIONS/$NAME-blend.zip (leaderboard probe), $SUBMISSIONS/$NAME-single-$BEST.zip (prize-eligible)"
