#!/usr/bin/env bash
# The 3-seed method study on the fashion_lowres proxy (docs/fashion_lowres_study/): KD, CRD and CKTF with
# cktf's defaults, and CRD and CKTF with the published code's objective (configs/fashion_lowres/*_reference.yaml),
# plus every control of the demo. Two processes of one torch thread each share the 2 cores: the first runs the
# shared steps (teachers, ceiling) and seed 0, the second seeds 1 and 2 once the shared steps are done.
# Then the probes are repeated with 20 % of the 100 probe labels held out for validation (best-validation
# epoch), and the report is written.
#
#   bash benchmarks/proxy_study.sh [RUNS_DIR] [OUT_DIR]
set -euo pipefail
RUNS=${1:-runs/study}
OUT=${2:-docs/fashion_lowres_study}
METHODS=kd,crd,cktf,crd_reference,cktf_reference
CKTF=${CKTF:-cktf}
common=(--runs "$RUNS" --methods "$METHODS" --train.threads 1)

"$CKTF" demo "${common[@]}" --seeds 1 --out "$OUT/seed0" &
first=$!
until [ -f "$RUNS/fashion_lowres_ceiling/probe/metrics.json" ]; do
  kill -0 $first 2>/dev/null || { wait $first; exit 1; }
  sleep 10
done
"$CKTF" demo "${common[@]}" --only-seeds 1,2
wait $first

# Probes with a validation split: 20 % of each run's 100 probe labels held out, best epoch chosen on them.
for seed in 0 1 2; do
  for run in "$RUNS"/fashion_lowres_*_s$seed; do
    [ -f "$run/last.safetensors" ] || continue
    "$CKTF" -q probe --config configs/fashion_lowres/probe.yaml --student "$run/last.safetensors" \
      --probe.out "$run/probe_val" --data.val_fraction 0.2 --train.seed $seed --train.threads 1 --resume
  done
  for control in pixels random_init; do
    extra=(--probe.backbone pixels)
    [ $control = random_init ] && extra=(--probe.backbone random --probe.model resnet8)
    "$CKTF" -q probe --config configs/fashion_lowres/probe.yaml "${extra[@]}" \
      --probe.out "$RUNS/fashion_lowres_${control}_s$seed/probe_val" --data.val_fraction 0.2 --train.seed $seed \
      --train.threads 1 --resume
  done
done
for shared in teacher ceiling; do
  label=$([ $shared = ceiling ] && echo supervised_ceiling || echo teacher)
  "$CKTF" -q probe --config configs/fashion_lowres/probe.yaml --student "$RUNS/fashion_lowres_$shared/best.safetensors" \
    --probe.out "$RUNS/fashion_lowres_$shared/probe_val" --probe.label $label --data.val_fraction 0.2 \
    --train.threads 1 --resume
done

"$CKTF" demo "${common[@]}" --seeds 3 --out "$OUT"
"$CKTF" compare "$RUNS"/fashion_lowres_*/probe_val --out "$OUT/with_validation" \
  --title "fashion_lowres: probe with 20 % of the labels held out for validation (3 seeds)"
