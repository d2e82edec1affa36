#!/usr/bin/env bash
# End-to-end check of `--attention-backend flashmla_ops` against SGLang's builtin `flashmla` backend on a Hopper
# GPU (tools/sglang_e2e.py: CUDA graphs on and off, MTP speculative verify, --enable-torch-compile, an FP8 KV
# cache, --enable-deterministic-inference; logprob comparison, decode throughput). Offline: nothing is downloaded. Needs SGLang with its CUDA dependencies
# (0.5.17 for torch 2.11) and flashmla_ops installed with its CUDA extension (bash tools/setup_env.sh on the
# GPU machine). Results: $OUT (all configurations) and $OUT_DIR/<configuration>.json (one per configuration).
#   bash tools/sglang_e2e.sh                 # TP 1: cuda_graph, eager
#   bash tools/sglang_e2e.sh --tp 1 2        # TP 1 and TP 2 (two GPUs)
#   bash tools/sglang_e2e.sh --modes mtp,torch_compile
#   bash tools/sglang_e2e.sh --modes deterministic   # one prompt alone and in batches: bitwise equal logprobs
#   OUT=results.json bash tools/sglang_e2e.sh --modes cuda_graph,eager,mtp,torch_compile --dry-run
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
out=${OUT:-$PWD/sglang_e2e.json}
out_dir=${OUT_DIR:-${out%.json}.d}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Run outside the checkout: its flashmla_ops/ source folder (no compiled extension) would shadow the installed
# package.
cd "${TMPDIR:-/tmp}"
if ! "$py" -c "import sglang, flashmla_ops.integration.sglang_plugin" 2>/dev/null; then
  echo "sglang_e2e: needs sglang and flashmla_ops importable by $py" >&2
  exit 2
fi
exec "$py" "$repo/tools/sglang_e2e.py" --out "$out" --out-dir "$out_dir" "$@"
