#!/usr/bin/env bash
# The whole GPU benchmark in one command, for a session on one H100/H200 with nothing installable:
#
#   OUT=/path/to/out bash benchmarks/gpu_run.sh
#
# Runs the `gpu` preset of `python -m transpeft_kernels bench` from the source tree (PYTHONPATH=.),
# writes everything under $OUT and prints the summary table last. Time: the suite starts no new case
# after $TPK_BENCH_BUDGET_S seconds (default 360) and is killed at $TPK_BENCH_HARD_S (default 480);
# with start-up and the chart that is at most ~8.5 minutes, typically ~7 (the cases and their order are
# in transpeft_kernels/bench/cases.py, gpu()). Everything measured before a stop is kept.
#
# Outputs under $OUT:
#   results.jsonl          one record per (case, pass, implementation), environment on each
#   bench_<gpu>.jsonl      the same, named after the GPU (the file to commit under benchmarks/results/)
#   speedup.png            the chart (speedup.svg when matplotlib is missing: redraw the PNG elsewhere with
#                          `python -m transpeft_kernels bench --chart-from bench_<gpu>.jsonl --out DIR`)
#   table.txt, bench.log, environment.txt
#
# The commit measured: $TPK_COMMIT, else a COMMIT file at the repository root, else git, else "unknown".
# A copied working tree often has no .git: commit first, then pass it, e.g.
#   TPK_COMMIT=<git rev-parse --short=12 HEAD, run beforehand> OUT=$OUT bash benchmarks/gpu_run.sh
# The cases, in run order: PYTHONPATH=. python -m transpeft_kernels bench --list
# Dry run on a CPU machine (tiny shapes, not a performance figure): TPK_GPU_RUN_SMOKE=1 bash benchmarks/gpu_run.sh
#
# The CUDA C++ backend's check (benchmarks/gpu_cuda_check.py: JIT build for this GPU, masks, numerics,
# masked-activation bandwidth vs a device copy, gated MLP vs the frozen-GEMM floor) runs first when
# TPK_CUDA_CHECK_S=<seconds> is set (e.g. 300), and that many seconds are taken from the bench's budget and
# hard limit, so the whole script keeps its time cap. Its outputs: cuda_check.json, cuda_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-out/gpu_run}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${TPK_BENCH_BUDGET_S:-360}"
HARD="${TPK_BENCH_HARD_S:-480}"
CUDA_CHECK_S="${TPK_CUDA_CHECK_S:-0}"
if [ "$CUDA_CHECK_S" -gt 0 ]; then
  BUDGET=$(( BUDGET > CUDA_CHECK_S + 60 ? BUDGET - CUDA_CHECK_S : 60 ))
  HARD=$(( HARD > CUDA_CHECK_S + 120 ? HARD - CUDA_CHECK_S : 120 ))
fi

if [ "${TPK_GPU_RUN_SMOKE:-0}" != "0" ]; then
  PRESET_ARGS=(--smoke)
else
  # torch (the reference path: ~0.14 s per MLP step on an H200) and vanilla_compiled (a compile per
  # shape) ate the whole budget of the first H200 run on one case; name them in TPK_BENCH_IMPLS to add them
  read -r -a IMPLS <<< "${TPK_BENCH_IMPLS:-vanilla floor triton cuda}"
  PRESET_ARGS=(--preset gpu --budget-s "$BUDGET" --impls "${IMPLS[@]}")
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'PY' 2>&1
import torch
from transpeft_kernels.bench.records import environment
dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
for k, v in environment(dev).items():
    print(f"{k}: {v}")
if dev.type == "cuda":
    p = torch.cuda.get_device_properties(dev)
    print(f"sm: {p.major}.{p.minor}, SMs: {p.multi_processor_count}, L2: {getattr(p, 'L2_cache_size', 'n/a')}")
try:
    import matplotlib
    print(f"matplotlib: {matplotlib.__version__}")
except ImportError:
    print("matplotlib: not installed (the chart is written as SVG)")
PY
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

if [ "$CUDA_CHECK_S" -gt 0 ] && [ "${TPK_GPU_RUN_SMOKE:-0}" = "0" ]; then
  echo "gpu_run: benchmarks/gpu_cuda_check.py (hard limit ${CUDA_CHECK_S}s; bench budget now ${BUDGET}s, hard ${HARD}s)"
  OUT="$OUT" timeout --signal=TERM --kill-after=10 "$CUDA_CHECK_S" "$PY" -u benchmarks/gpu_cuda_check.py \
    --budget-s $(( CUDA_CHECK_S > 60 ? CUDA_CHECK_S - 45 : CUDA_CHECK_S / 2 )) > "$OUT/cuda_check.log" 2>&1
  echo "gpu_run: cuda check exited with status $? (see $OUT/cuda_check.log, $OUT/cuda_check.json)"
  grep -E "^(PASS|FAIL|INFO)" "$OUT/cuda_check.log"
fi

echo "gpu_run: python -m transpeft_kernels bench ${PRESET_ARGS[*]} --out $OUT (hard limit ${HARD}s)"
timeout --signal=TERM --kill-after=20 "$HARD" "$PY" -u -m transpeft_kernels bench "${PRESET_ARGS[@]}" --out "$OUT" \
  > "$OUT/bench.log" 2>&1
rc=$?
grep "^bench: \[" "$OUT/bench.log" | tail -n 1
case $rc in
  0) echo "gpu_run: bench finished" ;;
  1) echo "gpu_run: bench finished with failed records (errors or numerics mismatches): see $OUT/bench.log" ;;
  124|137) echo "gpu_run: bench stopped at the hard limit of ${HARD}s; the records written so far are kept" ;;
  *) echo "gpu_run: bench exited with status $rc: see $OUT/bench.log"; tail -n 30 "$OUT/bench.log" ;;
esac

if [ -s "$OUT/results.jsonl" ]; then
  slug=$("$PY" -c "
import json, re, sys
r = json.loads(open(sys.argv[1]).readline())
print(re.sub(r'[^A-Za-z0-9]+', '_', r.get('gpu') or 'cpu').strip('_'))" "$OUT/results.jsonl")
  cp "$OUT/results.jsonl" "$OUT/bench_${slug}.jsonl"
  # The table last: redrawn from the records, so it is complete even after a hard stop.
  "$PY" -m transpeft_kernels bench --chart-from "$OUT/results.jsonl" --out "$OUT" 2>&1 | tee "$OUT/table.txt"
else
  echo "gpu_run: no records were written; see $OUT/bench.log"
  tail -n 40 "$OUT/bench.log"
  exit 1
fi
exit $(( rc == 0 ? 0 : 1 ))
