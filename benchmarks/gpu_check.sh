#!/usr/bin/env bash
# The GPU check in one command, on a bare CUDA machine (at most 585 s of step limits; docs/benchmarks.md):
#   0. wheels: every wheel in WHEELS (default .whl/, git-ignored: carry it along) is installed with
#      `pip install --no-index --no-deps --target OUT/site` and put on PYTHONPATH. faiss-cpu is the one the
#      check needs beyond torch, torchvision, einops, tensorboard, click, safetensors, pyyaml and pytest (add a
#      pytest wheel the same way if the machine lacks it). Fetch it where a package index is reachable:
#        pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --platform manylinux_2_28_x86_64 -d .whl faiss-cpu
#   1. the test files with CUDA-only branches, tests/test_fake_cuda.py when it exists, and the suite's
#      stay-on-the-CPU check, on the real GPU,
#   2. the command-line chain on a Fashion-MNIST fixture (benchmarks/gpu_chain.py): fp16 teacher with loader
#      workers and pinned memory; bf16 CKTF with per-anchor hard negatives, per-batch `smallest` mapping,
#      train.compile, checkpoints every 5 steps, SIGTERM + --resume; probe,
#   3. one transfer step per method (KD, CRD, CKTF) at the paper setting -- VGG-19 -> VGG-8, B = 64,
#      K = 16384, N_d = 100 000 (benchmarks/transfer_step.py, stl10_vgg) -- in fp32 and in bf16, with shared
#      and per-anchor negatives,
#   4. faiss-gpu's neighbour table for 100 000 x 512 (benchmarks/sampler.py, tables), if faiss sees a GPU.
# Runs from the repository root without installing cktf (PYTHONPATH=.). Every step has a timeout; each
# step's output goes to OUT/<step>.log, its result to OUT/status.tsv, and benchmarks/gpu_check_summary.py
# writes OUT/gpu_check.json and OUT/gpu_check.md. Exit status 1 if any step failed.
#
# Usage: benchmarks/gpu_check.sh [--out DIR] [--dry-run]   (PYTHON=... picks the interpreter, WHEELS=DIR the wheels)
set -uo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
OUT="benchmarks/results/gpu_check"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
WHEELS="${WHEELS:-.whl}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
export PYTHONPATH="$PWD:$OUT/site${PYTHONPATH:+:$PYTHONPATH}"

TEST_FILES="tests/test_negative_sampler.py tests/test_performance_flags.py tests/test_batch_augment.py"
TEST_FILES+=" tests/test_nce.py tests/test_memory_bank.py tests/test_cpu_suite.py"
[ -f tests/test_fake_cuda.py ] && TEST_FILES+=" tests/test_fake_cuda.py"

# name|timeout in seconds|command (run by bash -c, so paths are quoted)
O=$(printf %q "$OUT"); P=$(printf %q "$PY"); W=$(printf %q "$WHEELS")
STEPS=()
STEPS+=("wheels|20|shopt -s nullglob; w=($W/*.whl); [ \${#w[@]} -eq 0 ] || $P -m pip install -q --no-index --no-deps --target $O/site \"\${w[@]}\"; $P -c 'import faiss'")
STEPS+=("tests|100|$P -m pytest -q -p no:cacheprovider -rs $TEST_FILES")
STEPS+=("chain|200|$P benchmarks/gpu_chain.py --out $O/chain --device cuda --timeout 110 --json $O/chain.json")
for precision in fp32 bf16; do
  STEPS+=("transfer_step_$precision|125|$P benchmarks/transfer_step.py --device cuda --settings stl10_vgg --methods kd,crd,cktf --negative-modes shared,per-anchor --items 100000 --batch 64 --negatives 16384 --breakdown-steps 0 --set train.precision=$precision --json $O/transfer_step_$precision.json")
done
STEPS+=("faiss_gpu_table|15|$P benchmarks/sampler.py --device cuda --parts tables --items 100000 --dim 512 --json $O/sampler.json")

if [ "$DRY" = 1 ]; then
  for step in "${STEPS[@]}"; do
    name="${step%%|*}"; rest="${step#*|}"
    echo "$name (${rest%%|*} s): ${rest#*|}"
  done
  exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: torch ($PY) sees no CUDA device; run this on a GPU machine (--dry-run lists the steps)" >&2
  exit 1
fi
mkdir -p "$OUT"
STATUS="$OUT/status.tsv"
: > "$STATUS"
for step in "${STEPS[@]}"; do
  name="${step%%|*}"; rest="${step#*|}"; limit="${rest%%|*}"; cmd="${rest#*|}"
  if [ "$name" = faiss_gpu_table ] && ! "$PY" -c "import sys, faiss; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
    printf '%s\tskipped (faiss without GPU support)\t0\n' "$name" >> "$STATUS"; continue
  fi
  echo "== $name (at most $limit s): $cmd"
  start=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  code=$?
  case $code in
    0) result=ok ;;
    124|137) result="failed (timed out after $limit s, see $OUT/$name.log)" ;;
    *) result="failed (exit $code, see $OUT/$name.log)" ;;
  esac
  echo "   $result"
  printf '%s\t%s\t%s\n' "$name" "$result" "$(( $(date +%s) - start ))" >> "$STATUS"
done
"$PY" benchmarks/gpu_check_summary.py "$OUT"
