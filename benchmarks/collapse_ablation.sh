#!/usr/bin/env bash
# Which setting of the published objective makes CRD's linear heads collapse on the fashion_lowres proxy?
# (docs/fashion_lowres_study/collapse_ablation/). crd_reference.yaml (the published code: plain linear heads,
# τ 0.07, per-anchor negatives, plain momentum) probes at the random-init floor, crd.yaml (cktf's defaults: bn_linear
# heads, τ 0.1, shared negatives, Nesterov) does not. Each run here changes ONE setting of one of the two:
#   crd_reference with bn_linear heads | with τ 0.1 | with shared negatives | with Nesterov;  crd with linear heads.
# Transfer + linear probe each, as the study does (configs/fashion_lowres/probe.yaml), two workers of one thread.
# The teacher and both end points (crd, crd_reference, same seeds) come from benchmarks/proxy_study.sh's RUNS_DIR.
#
#   bash benchmarks/collapse_ablation.sh [RUNS_DIR [OUT_DIR [--section.key VALUE ...]]]   (SEEDS="0 1" by default)
# Further --section.key VALUE pairs go to every transfer, those of the data/train/log sections to the probes too.
set -euo pipefail
RUNS=${1:-runs/study}
OUT=${2:-docs/fashion_lowres_study/collapse_ablation}
shift $(( $# < 2 ? $# : 2 ))
source "$(dirname "$0")/study_args.sh"
CKTF=${CKTF:-cktf}
SEEDS=${SEEDS-0 1}
teacher=$RUNS/fashion_lowres_teacher/best.safetensors
for need in "$teacher" $(for s in $SEEDS; do echo "$RUNS/fashion_lowres_crd_s$s/probe/metrics.json" \
    "$RUNS/fashion_lowres_crd_reference_s$s/probe/metrics.json"; done); do
  [ -f "$need" ] || { echo "Error: $need is missing; run benchmarks/proxy_study.sh $RUNS first" >&2; exit 2; }
done

run_one() {  # NAME BASE_CONFIG SEED OVERRIDE...
  local name=$1 config=$2 seed=$3 start=$SECONDS
  shift 3
  eval "local extra=($EXTRA) probe_extra=($COMMON_EXTRA)"
  "$CKTF" transfer --config "configs/fashion_lowres/$config.yaml" --teacher "$teacher" --log.root "$RUNS" \
    --log.name "fashion_lowres_${name}_s$seed" --loss.method "$name" --train.seed "$seed" --train.threads 1 \
    --resume -q "$@" "${extra[@]}" || { echo "FAILED: $name seed $seed" >&2; return 255; }
  "$CKTF" probe --config configs/fashion_lowres/probe.yaml \
    --student "$RUNS/fashion_lowres_${name}_s$seed/last.safetensors" --train.seed "$seed" --train.threads 1 \
    --resume -q "${probe_extra[@]}" || { echo "FAILED: probe of $name seed $seed" >&2; return 255; }
  echo "$name seed $seed: $(( SECONDS - start )) s"
}
export -f run_one
export CKTF RUNS teacher EXTRA COMMON_EXTRA

jobs=()
for seed in $SEEDS; do
  jobs+=("crd_reference_bn_linear crd_reference $seed --loss.nce.projection bn_linear"
         "crd_reference_tau0.1 crd_reference $seed --loss.nce.temperature 0.1"
         "crd_reference_shared crd_reference $seed --sampler.shared true"
         "crd_reference_nesterov crd_reference $seed --train.nesterov true"
         "crd_linear crd $seed --loss.nce.projection linear")
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c 'run_one "$@"' _

runs=()
for seed in $SEEDS; do
  runs+=("$RUNS/fashion_lowres_crd_s$seed" "$RUNS/fashion_lowres_crd_linear_s$seed"
         "$RUNS/fashion_lowres_crd_reference_s$seed" "$RUNS/fashion_lowres_crd_reference_bn_linear_s$seed"
         "$RUNS/fashion_lowres_crd_reference_tau0.1_s$seed" "$RUNS/fashion_lowres_crd_reference_shared_s$seed"
         "$RUNS/fashion_lowres_crd_reference_nesterov_s$seed")
done
"$CKTF" compare "${runs[@]}" --out "$OUT" \
  --title "fashion_lowres: CRD's published objective with one setting changed at a time (linear probe)"
