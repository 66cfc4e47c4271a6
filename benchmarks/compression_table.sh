#!/usr/bin/env bash
# The CPU evidence table of compression with labels (docs/fashion_labeled/): on the source half of Fashion-MNIST
# (all 10 classes, labeled, 28 px), a resnet14 teacher (configs/fashion_labeled/teacher.yaml) and resnet8
# students trained with CE plus each method: the student alone, KD, CRD and CKTF over seeds 0, 1, 2, and each of
# the eleven companion methods alone and as CKTF+X with seed 0. Every student is tested on the source test half
# after each epoch; `cktf compare` writes the table and curves, benchmarks/paired_table.py the X vs CKTF+X table.
# Runs go through two workers of one torch thread each; an interrupted script resumes where it stopped.
# SEEDS (default "0 1 2") and COMPANIONS (default all eleven) narrow it down.
#
#   bash benchmarks/compression_table.sh [RUNS_DIR [OUT_DIR [--section.key VALUE ...]]]
# Further --section.key VALUE pairs go to every transfer, and those of the data/train/log sections to the teacher
# too (e.g. --data.root DIR for Fashion-MNIST elsewhere).
set -euo pipefail
RUNS=${1:-runs/fashion_labeled}
OUT=${2:-docs/fashion_labeled}
shift $(( $# < 2 ? $# : 2 ))
source "$(dirname "$0")/study_args.sh"
eval "teacher_args=($COMMON_EXTRA)"
CKTF=${CKTF:-cktf}
PYTHON=${PYTHON:-python}
CONFIGS=configs/fashion_labeled
COMPANIONS=${COMPANIONS-fitnet at sp cc vid rkd pkt ab ft nst fsp}
SEEDS=${SEEDS-0 1 2}

run_one() {
  local method=$1 seed=$2 start=$SECONDS
  eval "local extra=($EXTRA)"
  "$CKTF" transfer --config "$CONFIGS/$method.yaml" --log.name "fashion_labeled_${method}_s$seed" --train.seed "$seed" \
    --teacher.checkpoint "$RUNS/fashion_labeled_teacher/best.safetensors" --log.root "$RUNS" --train.threads 1 \
    --resume -q "${extra[@]}" || { echo "FAILED: $method seed $seed" >&2; return 255; }
  echo "$method seed $seed: $(( SECONDS - start )) s"
}
export -f run_one
export CKTF CONFIGS RUNS EXTRA

"$CKTF" train-teacher --config "$CONFIGS/teacher.yaml" --log.root "$RUNS" --train.threads 2 --resume -q \
  ${teacher_args[@]+"${teacher_args[@]}"}

jobs=()
for seed in $SEEDS; do
  for method in student kd crd cktf; do jobs+=("$method $seed"); done
done
for x in $COMPANIONS; do jobs+=("$x 0" "cktf_$x 0"); done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c 'run_one "$@"' _

runs=()
for job in "${jobs[@]}"; do
  set -- $job
  runs+=("$RUNS/fashion_labeled_$1_s$2")
done
mkdir -p "$OUT"
"$CKTF" compare "${runs[@]}" --out "$OUT" \
  --title "Compression with labels on Fashion-MNIST (source half, 10 classes): resnet14 -> resnet8, 3 epochs"
"$PYTHON" benchmarks/paired_table.py "$OUT/comparison.csv" "$RUNS/fashion_labeled_teacher/metrics.json" \
  > "$OUT/paired.md"
cat "$OUT/paired.md"
