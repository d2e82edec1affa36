#!/usr/bin/env bash
# The README's main command: set up, build, install, then run the decode demo (Hopper kernels when an sm_90
# GPU and the CUDA extension are there, the CPU reference otherwise; it prints which one ran).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
cd "${TMPDIR:-/tmp}"
exec "${PYTHON:-python3}" "$repo/examples/decode_demo.py" "$@"
