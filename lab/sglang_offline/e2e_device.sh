#!/usr/bin/env bash
# On the offline Hopper machine, from the repository root: make sure flashmla_ops is built and installed
# (lab/gpu_run.sh build), reassemble the SGLang bundle from the folders its parts were copied to
# (SGLANG_PARTS, default "/tmp/sglang_parts .carry/sglang"; a bundle already unpacked in /tmp/sglang_bundle
# is reused), then run tools/sglang_e2e.sh with the arguments given. Results in $OUT/sglang_e2e.json and
# $OUT/e2e/<configuration>.json.
#   mkdir -p /tmp/sglang_parts && cp .carry/sglang/part-00 /tmp/sglang_parts/    # one call per transfer
#   bash lab/sglang_offline/e2e_device.sh --modes mtp,torch_compile
set -uo pipefail
OUT=${OUT:-/tmp/flashmla_out}
mkdir -p "$OUT"
if ! (cd /tmp && python3 -c "import flashmla_ops._C" 2>/dev/null); then
  bash lab/gpu_run.sh build || exit 1
fi
if [ ! -f /tmp/sglang_bundle/env.sh ]; then
  # shellcheck disable=SC2086
  bash lab/sglang_offline/sglang_gpu_unpack.sh ${SGLANG_PARTS:-/tmp/sglang_parts .carry/sglang} || exit 1
fi
# Bundles made before sgl-deep-gemm joined the package list: its wheel carried beside the parts.
dg=$(ls .carry/sgl_deep_gemm-*.whl 2>/dev/null | head -1)
if [ -n "$dg" ] && [ ! -d /tmp/sglang_bundle/site/deep_gemm ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sglang_bundle/site "$dg" || exit 1
fi
# shellcheck disable=SC1091
source /tmp/sglang_bundle/env.sh
res=$OUT
OUT="$res/sglang_e2e.json" OUT_DIR="$res/e2e" bash tools/sglang_e2e.sh "$@"
