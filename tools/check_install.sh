#!/usr/bin/env bash
# Installs flashmla_ops the ways a user does, each into a fresh venv, and uses the result from outside the
# checkout (so only the installed package can be imported):
#   1. `pip install .`, build isolation on, nvcc on PATH  -> the package with the sm_90a extension;
#   2. `pip install git+file://<checkout>`, build isolation on, no nvcc on PATH -> the CPU-only package.
# Each installed package then runs examples/decode_demo.py on the CPU (a small problem, checked against an
# independent float64 computation) and reports whether its CUDA extension is there, as expected.
#   bash tools/check_install.sh            # both; mode 1 is skipped with a note when nvcc is absent
# Set PIP_CONSTRAINT to pin what pip may pick (CI pins torch to the CPU wheel it has, to keep the venvs small).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/flashmla_ops_install.XXXXXX")
trap 'rm -rf "$work"' EXIT

check() {  # check NAME EXPECT_CUDA_EXTENSION PIP_TARGET [PATH]
  local name=$1 expect=$2 target=$3 path=${4:-$PATH}
  echo "--- install check: $name"
  "$py" -m venv "$work/$name"
  local vpy="$work/$name/bin/python"
  PATH=$path FLASHMLA_NVCC_THREADS=${FLASHMLA_NVCC_THREADS:-2} "$vpy" -m pip install -q \
    --disable-pip-version-check "$target" 2>&1 | grep -v -E "^(WARNING: (Location|Running pip)|\[notice\])" || true
  (cd "$work" && "$vpy" - "$expect" <<'EOF'
import sys

import flashmla_ops

have = flashmla_ops.cuda_extension_available()
want = sys.argv[1] == "1"
print(f"installed flashmla_ops {flashmla_ops.__version__} from {flashmla_ops.__file__}; CUDA extension: {have}")
if have != want:
    raise SystemExit(f"expected the CUDA extension to be {'present' if want else 'absent'}")
EOF
  )
  (cd "$work" && "$vpy" "$repo/examples/decode_demo.py" --batch 3 --seqlen 96 --heads 16 --mtp 2)
}

if command -v nvcc >/dev/null; then
  check isolated_nvcc 1 "$repo"
else
  echo "--- install check: isolated_nvcc skipped (no nvcc on PATH)"
fi
# PATH without any directory that holds nvcc (and without the usual toolkit location, which CMake also tries).
no_nvcc_path=$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || echo "$d"; done | paste -sd:)
if [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "(a CUDA toolkit is installed at /usr/local/cuda; the no-nvcc check sets CUDACXX to a missing compiler)"
fi
CUDACXX=/nonexistent/nvcc check git_no_nvcc 0 "git+file://$repo" "$no_nvcc_path"
echo "--- install checks passed"
