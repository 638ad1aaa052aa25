#!/usr/bin/env bash
# Set up a virtual environment with everything fastflow needs, then run the demo or the tests.
#   scripts/dev.sh demo   # builds the extension's CPU kernel, runs `fastflow demo`
#   scripts/dev.sh test   # same setup, then lint, the CUDA compile check, and the test suite
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, a CPU build where one is on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
command=${1:-test}
shift || true
case "$command" in
  demo | test) ;;
  *)
    echo "usage: scripts/dev.sh demo|test [args...]" >&2
    exit 2
    ;;
esac

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=77" wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --no-build-isolation -e ".[test]"

case "$command" in
  demo)
    fastflow info
    fastflow demo "$@"
    ;;
  test)
    ruff check .
    bash scripts/check_cuda_compile.sh
    python -m pytest -q "$@" tests
    ;;
esac
