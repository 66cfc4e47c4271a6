#!/usr/bin/env bash
# The label-overlap study (docs/overlap_study/, issue 21): one fixed target (configs/overlap/_target.yaml) and a
# five-class teacher sharing 5, 3 or 0 of its classes with it (configs/overlap/overlap_{100,60,0}/). At each level
# `cktf demo` runs the teacher, KD, CRD, CKTF, CKTF+KD and CKTF from an untrained teacher, probes each, and the
# controls (pixels, random init, the teacher's own features, the supervised ceiling); then the budget check
# trains KD and CKTF for 16 epochs (seed 0) at 0 % and 100 %. Every step resumes: rerun the same command after an
# interruption. Seed 0 of every level runs first, so a partial run already gives a one-seed table.
#
#   bash benchmarks/overlap_study.sh [RUNS_DIR] [OUT_DIR] [SEEDS] [--section.key VALUE ...]
# (further pairs go to every cktf command, e.g. --train.threads 1)
set -euo pipefail
RUNS=${1:-runs/overlap}
OUT=${2:-docs/overlap_study}
SEEDS=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
CKTF=${CKTF:-cktf}
PYTHON=${PYTHON:-python}
METHODS=kd,crd,cktf,cktf_kd
LEVELS=(100 60 0)
start=$SECONDS

for level in "${LEVELS[@]}"; do
  "$CKTF" demo --configs configs/overlap/overlap_$level --runs "$RUNS" --methods $METHODS --seeds 1 \
    --out "$OUT/seed0/overlap_$level" "$@"
done
if [ "$SEEDS" -gt 1 ]; then
  for level in "${LEVELS[@]}"; do
    "$CKTF" demo --configs configs/overlap/overlap_$level --runs "$RUNS" --methods $METHODS --seeds "$SEEDS" \
      --out "$OUT/overlap_$level" "$@"
  done
fi

# Budget check: 16 transfer epochs instead of 4, seed 0, at both ends of the overlap range.
for level in 0 100; do
  runs=()
  for method in kd cktf; do
    name=overlap_${level}_${method}_16ep_s0
    "$CKTF" transfer --config configs/overlap/overlap_$level/$method.yaml --log.root "$RUNS" --log.name $name \
      --teacher.checkpoint "$RUNS/overlap_${level}_teacher/best.safetensors" --train.epochs 16 --train.seed 0 \
      --resume "$@"
    "$CKTF" probe --config configs/overlap/overlap_$level/probe.yaml --student "$RUNS/$name/last.safetensors" \
      --train.seed 0 --resume "$@"
    runs+=("$RUNS/$name" "$RUNS/overlap_${level}_${method}_s0")
  done
  "$CKTF" compare "${runs[@]}" --out "$OUT/budget_overlap_$level" \
    --label "$RUNS/overlap_${level}_kd_16ep_s0=kd_16ep" --label "$RUNS/overlap_${level}_cktf_16ep_s0=cktf_16ep" \
    --title "overlap $level %: 4 vs 16 transfer epochs (seed 0)"
done

reports=()
for level in "${LEVELS[@]}"; do
  if [ "$SEEDS" -gt 1 ]; then reports+=("$level=$OUT/overlap_$level"); else reports+=("$level=$OUT/seed0/overlap_$level"); fi
done
"$PYTHON" benchmarks/overlap_table.py "${reports[@]}" --out "$OUT"
echo "overlap study: $(( (SECONDS - start) / 60 )) min wall time"
