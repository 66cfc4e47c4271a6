#!/usr/bin/env bash
# The 3-seed method study on the fashion_lowres proxy (docs/fashion_lowres_study/): KD, CRD and CKTF with
# cktf's defaults, CRD and CKTF with the published code's objective (configs/fashion_lowres/*_reference.yaml),
# and every control of the demo (pixels, random init, teacher features, CKTF from an untrained teacher,
# supervised ceiling). Three processes of one torch thread each share the CPU; no two ever touch the same run:
#   1. the shared runs (teachers, ceiling) and all of seed 0;
#   2. once the shared runs exist: KD, CRD, CKTF and the controls of seeds 1 and 2;
#   3. likewise: the two reference-objective transfers of seeds 1 and 2, with their probes.
# Then every probe is repeated with 20 % of the 100 probe labels held out for validation (the best-validation
# epoch's test accuracy), and both reports are written.
#
#   bash benchmarks/proxy_study.sh [RUNS_DIR] [OUT_DIR]
set -euo pipefail
RUNS=${1:-runs/study}
OUT=${2:-docs/fashion_lowres_study}
CKTF=${CKTF:-cktf}
ALL=kd,crd,cktf,crd_reference,cktf_reference
one=(--train.threads 1)

"$CKTF" demo --runs "$RUNS" --methods "$ALL" --seeds 1 --out "$OUT/seed0" "${one[@]}" &
first=$!
until [ -f "$RUNS/fashion_lowres_ceiling/probe/metrics.json" ]; do
  kill -0 $first 2>/dev/null || { wait $first; exit 1; }
  sleep 10
done
"$CKTF" demo --runs "$RUNS" --methods kd,crd,cktf --only-seeds 1,2 "${one[@]}" &
second=$!
for method in crd_reference cktf_reference; do
  for seed in 1 2; do
    name=fashion_lowres_${method}_s$seed
    "$CKTF" transfer --config configs/fashion_lowres/$method.yaml --log.root "$RUNS" --log.name $name \
      --teacher.checkpoint "$RUNS/fashion_lowres_teacher/best.safetensors" --train.seed $seed "${one[@]}" --resume
    "$CKTF" probe --config configs/fashion_lowres/probe.yaml --student "$RUNS/$name/last.safetensors" \
      --train.seed $seed "${one[@]}" --resume
  done
done
wait $first $second

# The same probes with a validation split: 20 % of the 100 probe labels held out, best epoch chosen on them.
val=(--config configs/fashion_lowres/probe.yaml --data.val_fraction 0.2 "${one[@]}" --resume -q)
for seed in 0 1 2; do
  for run in "$RUNS"/fashion_lowres_*_s$seed; do
    [ -f "$run/last.safetensors" ] && "$CKTF" probe "${val[@]}" --student "$run/last.safetensors" \
      --probe.out "$run/probe_val" --train.seed $seed
  done
  "$CKTF" probe "${val[@]}" --probe.backbone pixels --probe.out "$RUNS/fashion_lowres_pixels_s$seed/probe_val" \
    --train.seed $seed
  "$CKTF" probe "${val[@]}" --probe.backbone random --probe.model resnet8 \
    --probe.out "$RUNS/fashion_lowres_random_init_s$seed/probe_val" --train.seed $seed
done
"$CKTF" probe "${val[@]}" --student "$RUNS/fashion_lowres_teacher/best.safetensors" \
  --probe.out "$RUNS/fashion_lowres_teacher/probe_val"
"$CKTF" probe "${val[@]}" --student "$RUNS/fashion_lowres_ceiling/best.safetensors" --probe.label supervised_ceiling \
  --probe.out "$RUNS/fashion_lowres_ceiling/probe_val"

"$CKTF" demo --runs "$RUNS" --methods "$ALL" --seeds 3 --out "$OUT"
"$CKTF" compare "$RUNS"/fashion_lowres_*/probe_val --out "$OUT/with_validation" \
  --title "fashion_lowres: probe with 20 % of the labels held out for validation (3 seeds)"
