#!/usr/bin/env bash
# Everything a GPU session runs, sized for the lent-device budget (15 min of device time in all, at most
# 10 min per command, start-up included). Commit first, then:
#
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh checks   # ~5 min: correctness on the GPU
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh bench    # ~7 min: the benchmark suite
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh all      # both, with tighter caps (< 9.5 min)
#
# checks: benchmarks/gpu_triton_check.py (tl.rand bits, the kernel/op/custom-op tests compiled on the GPU,
#         op numerics vs torch and float64, a LoRA-linear timing), then benchmarks/gpu_cuda_check.py
#         (JIT build of the CUDA library for this GPU, masks, numerics, bandwidth, gated MLP vs floor).
# bench:  the CUDA library built for this GPU when none is found (JIT route, <= 150 s), then
#         benchmarks/gpu_run.sh (the `gpu` preset of the benchmark suite; see that script).
# Every stage has its own time cap; a stage that fails or hits its cap does not stop the next one.
# Outputs under $OUT: triton_check.txt, cuda_check.txt + cuda_check.json, the gpu_run.sh files, and
# session.txt (commit, versions, each stage's exit status and seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-out/gpu_session}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
PART="${1:-checks}"
case "$PART" in
  checks) TRITON_S=300; CUDA_S=240; BENCH_BUDGET=0 ;;
  bench)  TRITON_S=0;   CUDA_S=0;   BENCH_BUDGET=300 ;;
  all)    TRITON_S=200; CUDA_S=150; BENCH_BUDGET=150 ;;
  *) echo "usage: bash benchmarks/gpu_session.sh checks|bench|all (got '$PART')" >&2; exit 2 ;;
esac

COMMIT="${TPK_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
export TPK_COMMIT="$COMMIT"
{
  echo "part: $PART"
  echo "commit: $COMMIT"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; else echo "nvidia-smi: not found"; fi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} > "$OUT/session.txt"
cat "$OUT/session.txt"

stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "== $name (cap ${secs}s)"
  timeout --signal=TERM --kill-after=15 "$secs" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/session.txt"
}

if [ "$TRITON_S" -gt 0 ]; then
  stage triton_check "$TRITON_S" "$PY" -u benchmarks/gpu_triton_check.py
fi
if [ "$CUDA_S" -gt 0 ]; then
  stage cuda_check "$CUDA_S" env OUT="$OUT" "$PY" -u benchmarks/gpu_cuda_check.py --budget-s $((CUDA_S - 40))
fi
if [ "$BENCH_BUDGET" -gt 0 ]; then
  # The suite's "cuda" rows need the library; a fresh machine has none (the checks part builds it too).
  if ! "$PY" -c "from transpeft_kernels.kernels.cuda.library import find_library as f; import sys; sys.exit(f() is None)"; then
    arch=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}' + ('a' if p.major == 9 else ''))" 2>/dev/null || echo 90a)
    stage build_cuda 150 "$PY" -m transpeft_kernels build-cuda --arch "$arch"
  fi
  TPK_BENCH_BUDGET_S="$BENCH_BUDGET" TPK_BENCH_HARD_S=$((BENCH_BUDGET + 120)) OUT="$OUT" bash benchmarks/gpu_run.sh
  echo "gpu_run: exit $?" | tee -a "$OUT/session.txt"
fi
