#!/usr/bin/env bash
# The GPU check in one command (needs a CUDA machine; about 5-8 minutes on one H100/H200):
#   1. the test files with CUDA-only branches (they are skipped on CPU),
#   2. one transfer step per method (KD, CRD, CKTF) at the paper setting -- VGG-19 -> VGG-8, B = 64,
#      K = 16384, N_d = 100 000 (benchmarks/transfer_step.py, stl10_vgg) -- in fp32 and bf16, with shared and
#      per-anchor negatives,
#   3. faiss-gpu's neighbour table for 100 000 x 512 (benchmarks/sampler.py, tables), if faiss sees a GPU,
# and writes every number to OUT/gpu_check.json and OUT/gpu_check.md.
#
# Usage: benchmarks/gpu_check.sh [--out DIR] [--dry-run]     (PYTHON=... picks the interpreter)
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
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
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

STEPS=()
STEPS+=("tests|$PY -m pytest -q -p no:cacheprovider -rs tests/test_negative_sampler.py tests/test_performance_flags.py tests/test_nce.py tests/test_memory_bank.py")
for precision in fp32 bf16; do
  STEPS+=("transfer_step_$precision|$PY benchmarks/transfer_step.py --device cuda --settings stl10_vgg --methods kd,crd,cktf --negative-modes shared,per-anchor --items 100000 --batch 64 --negatives 16384 --breakdown-steps 0 --set train.precision=$precision --json $OUT/transfer_step_$precision.json")
done
STEPS+=("faiss_gpu_table|$PY benchmarks/sampler.py --device cuda --parts tables --items 100000 --dim 512 --json $OUT/sampler.json")

if [ "$DRY" = 1 ]; then
  for step in "${STEPS[@]}"; do echo "${step#*|}"; done
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
  name="${step%%|*}"; cmd="${step#*|}"
  if [ "$name" = faiss_gpu_table ] && ! "$PY" -c "import sys, faiss; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
    printf '%s\tskipped (faiss without GPU support)\t0\n' "$name" >> "$STATUS"; continue
  fi
  echo "== $name: $cmd"
  start=$(date +%s)
  if $cmd > "$OUT/$name.log" 2>&1; then result=ok; else result="failed (see $OUT/$name.log)"; fi
  printf '%s\t%s\t%s\n' "$name" "$result" "$(( $(date +%s) - start ))" >> "$STATUS"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"steps": [dict(zip(("step", "result", "seconds"), line.split("\t"))) for line in
                    (out / "status.tsv").read_text().splitlines()]}
for name in ("transfer_step_fp32", "transfer_step_bf16", "sampler"):
    path = out / f"{name}.json"
    if path.is_file():
        report[name] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
lines = ["| step | result | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['result']} | {s['seconds']} |" for s in report["steps"]]
for name in ("transfer_step_fp32", "transfer_step_bf16", "sampler"):
    rows = report.get(name, {}).get("results") or report.get(name, {}).get("rows") or []
    if rows:
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
        lines += ["", f"### {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
PY
