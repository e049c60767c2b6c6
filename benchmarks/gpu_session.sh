#!/usr/bin/env bash
# Everything a GPU session runs, sized for the lent-device budget (15 min of device time in all, at most
# 10 min per command, start-up included). Commit first, then:
#
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh checks   # ~5 min: correctness on the GPU
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh bench    # ~7 min: the benchmark suite
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh all      # both, with tighter caps (<= 540 s)
#   TPK_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_session.sh diagnose # ~4 min: where the time goes (below)
#
# checks: benchmarks/gpu_triton_check.py (pytest python_tests/test_gpu_triton.py -m gpu: tl.rand bits, masks
#         and op numerics vs torch and float64 compiled on the GPU; a LoRA-linear timing; then the
#         kernel/op/custom-op tests on the GPU while its budget lasts), then benchmarks/gpu_cuda_check.py
#         (pytest python_tests/test_gpu_cuda.py -m gpu: JIT build of the CUDA library for this GPU, load,
#         numerics; test_cuda_ops.py's masks; bandwidth and gated MLP vs floor reported against their
#         targets, never failing the stage; then the rest of test_cuda_ops.py while its budget lasts).
#         A stage's exit status is 1 when a test failed (see the *.junit.xml files), not for a missed target.
# diagnose: pytest python_tests/test_gpu_triton.py -m gpu (90 s cap: the kernels' numerics through the direct
#         launches), benchmarks/gpu_profile_ops.py (host time vs device time vs kernels per op, on the bench's setups)
#         and benchmarks/gpu_act_bandwidth.py (masked activation GB/s per backend against a copy). The first
#         H200 run left a shape-independent ~2 ms in lora_linear and the MLP unexplained: run this first.
# bench:  the CUDA library built for this GPU when none is found (JIT route, <= 150 s), then
#         benchmarks/gpu_run.sh (the `gpu` preset of the benchmark suite; see that script).
# Every part starts with a preflight (versions of python, torch + CUDA, triton, transformers, peft,
# ninja, nvcc) that stops the session at once when something is missing, and writes the roofline
# model's predictions for this GPU (model.json) so that every measured time has its prediction beside it.
# Every stage has its own time cap; a stage that fails or hits its cap does not stop the next one.
# Caps of `all`: preflight 30 + model 30 + triton 140 + CUDA build 60 (about 60 s on 2 cores, so well under
# on the GPU machine's 16) + cuda 130 + bench 90 (killed at 130) + model_vs_measured 20 = 540 s.
# The CUDA library is built in its own stage before the cuda checks (their first test would otherwise
# build it inside their budget, and a build cut short skips every other CUDA part).
# Outputs under $OUT: preflight.txt, model.json, model_vs_measured.json (bench), profile_ops.json + act_bandwidth.json
# (diagnose), triton_check.txt + triton_check.json
# + triton_check.junit.xml (+ triton_suite.junit.xml), cuda_check.txt + cuda_check.json + cuda_check.junit.xml
# (+ cuda_masks.junit.xml, cuda_ops.junit.xml), the gpu_run.sh files, and session.txt (commit, versions, each
# stage's exit status and seconds). With PACK_TO=<file.tgz> also one archive of all of them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-out/gpu_session}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
PART="${1:-checks}"
case "$PART" in
  checks)   TRITON_S=300; BUILD_S=150; CUDA_S=240; BENCH_BUDGET=0;   BENCH_HARD=0;   DIAG_S=0 ;;
  bench)    TRITON_S=0;   BUILD_S=150; CUDA_S=0;   BENCH_BUDGET=300; BENCH_HARD=420; DIAG_S=0 ;;
  all)      TRITON_S=140; BUILD_S=60;  CUDA_S=130; BENCH_BUDGET=90;  BENCH_HARD=130; DIAG_S=0 ;;
  diagnose) TRITON_S=0;   BUILD_S=60;  CUDA_S=0;   BENCH_BUDGET=0;   BENCH_HARD=0;   DIAG_S=160 ;;
  *) echo "usage: bash benchmarks/gpu_session.sh checks|bench|all|diagnose (got '$PART')" >&2; exit 2 ;;
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

# Preflight: fail fast, before any stage spends device time on a missing piece.
if ! timeout 30 "$PY" - > "$OUT/preflight.txt" 2>&1 <<'PYEOF'
import importlib, shutil, subprocess, sys
problems = []
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA GPU")
    else:
        print("gpu", torch.cuda.get_device_name(0))
except ImportError:
    problems.append("torch does not import")
for mod in ("triton", "transformers", "peft", "safetensors"):
    try:
        print(mod, importlib.import_module(mod).__version__)
    except Exception as e:
        problems.append(f"{mod}: {e}")
transformers = sys.modules.get("transformers")
if transformers is not None and int(transformers.__version__.split(".")[0]) < 5:
    problems.append(f"transformers >= 5 needed, found {transformers.__version__}")
for tool in ("ninja", "nvcc"):
    path = shutil.which(tool)
    if path is None and tool == "ninja":
        try:
            import ninja  # the PyPI package carries the binary
            path = ninja.BIN_DIR + "/ninja"
        except ImportError:
            pass
    print(tool, path or "NOT FOUND")
    if path is None:
        problems.append(f"{tool} not found")
    elif tool == "nvcc":
        print(subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
for p in problems:
    print("PREFLIGHT FAIL:", p)
sys.exit(1 if problems else 0)
PYEOF
then
  cat "$OUT/preflight.txt"
  echo "preflight failed: see $OUT/preflight.txt" | tee -a "$OUT/session.txt"
  exit 1
fi
cat "$OUT/preflight.txt"

stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "== $name (cap ${secs}s)"
  timeout --signal=TERM --kill-after=15 "$secs" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/session.txt"
}

# The model's prediction for this GPU (CPU work, no device time beyond the wall clock).
gpu_key=$("$PY" -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'a100' if 'A100' in n else 'h100')" 2>/dev/null || echo h200)
stage model 30 "$PY" -m transpeft_kernels model --device "$gpu_key" --impls vanilla,floor,triton,cuda --json "$OUT/model.json"

if [ "$TRITON_S" -gt 0 ]; then
  stage triton_check "$TRITON_S" env OUT="$OUT" "$PY" -u benchmarks/gpu_triton_check.py --budget-s $((TRITON_S - 20))
fi
# The CUDA library for this GPU's arch only, into the JIT cache, where test_gpu_cuda.py's build (the same
# route and ninja file) then finds it up to date and the suite's "cuda" rows find it. Always run: ninja
# rebuilds only what changed, e.g. a library left by an earlier commit.
if [ "$CUDA_S" -gt 0 ] || [ "$BENCH_BUDGET" -gt 0 ] || [ "$DIAG_S" -gt 0 ]; then
  arch=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}' + ('a' if p.major == 9 else ''))" 2>/dev/null || echo 90a)
  stage build_cuda "$BUILD_S" "$PY" -m transpeft_kernels build-cuda --arch "$arch"
fi
if [ "$CUDA_S" -gt 0 ]; then
  stage cuda_check "$CUDA_S" env OUT="$OUT" "$PY" -u benchmarks/gpu_cuda_check.py --budget-s $((CUDA_S - 40))
fi
if [ "$DIAG_S" -gt 0 ]; then
  # the Triton kernels on this GPU first: their launches go through direct_launch.py, which only a GPU runs
  stage triton_tests 90 "$PY" -m pytest -q -x -m gpu python_tests/test_gpu_triton.py --junitxml="$OUT/triton_tests.junit.xml"
  stage profile_ops "$DIAG_S" env OUT="$OUT" "$PY" -u benchmarks/gpu_profile_ops.py
  stage act_bandwidth 70 env OUT="$OUT" "$PY" -u benchmarks/gpu_act_bandwidth.py
fi
if [ "$BENCH_BUDGET" -gt 0 ]; then
  TPK_BENCH_BUDGET_S="$BENCH_BUDGET" TPK_BENCH_HARD_S="$BENCH_HARD" OUT="$OUT" PYTHON="$PY" bash benchmarks/gpu_run.sh
  echo "gpu_run: exit $?" | tee -a "$OUT/session.txt"
  stage model_vs_measured 20 "$PY" -m transpeft_kernels model --compare "$OUT/results.jsonl" --json "$OUT/model_vs_measured.json"
fi
# PACK_TO=<file.tgz>: everything under $OUT in one archive too (for a machine that hands back few files)
if [ -n "${PACK_TO:-}" ]; then
  tar czf "$PACK_TO" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed $OUT into $PACK_TO"
fi
