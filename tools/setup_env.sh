#!/usr/bin/env bash
# Installs what flashmla_ops needs into the current Python environment and builds + installs the package.
# Used by tools/run_tests.sh and tools/run_demo.sh (the README's two commands) and by CI.
#   - torch: kept if already installed, else `pip install torch==2.13.0`;
#   - build tools: scikit-build-core, cmake >= 3.26, ninja; test tools: pytest, expecttest, numpy;
#   - when nvcc is on PATH: CUTLASS/CuTe headers (nvidia-cutlass==4.2.0.0, headers only, --no-deps) and the
#     sm_90a CUDA extension, built against the installed torch (the LibTorch stable ABI lets it compile, link
#     and load even on a CPU-only torch). Override with FLASHMLA_ENABLE_CUDA=ON|OFF|AUTO.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$py" -c "import torch" 2>/dev/null; then
  pip_q torch==2.13.0
fi
pip_q "scikit-build-core>=0.10" "cmake>=3.26" ninja pytest expecttest numpy
if [ -z "${FLASHMLA_ENABLE_CUDA:-}" ]; then
  if command -v nvcc >/dev/null; then FLASHMLA_ENABLE_CUDA=ON; else FLASHMLA_ENABLE_CUDA=OFF; fi
fi
export FLASHMLA_ENABLE_CUDA
if [ "$FLASHMLA_ENABLE_CUDA" != OFF ]; then
  pip_q --no-deps nvidia-cutlass==4.2.0.0
fi
echo "flashmla_ops: building with FLASHMLA_ENABLE_CUDA=$FLASHMLA_ENABLE_CUDA"
FLASHMLA_NVCC_THREADS=${FLASHMLA_NVCC_THREADS:-2} pip_q --no-build-isolation --no-deps "$repo"
