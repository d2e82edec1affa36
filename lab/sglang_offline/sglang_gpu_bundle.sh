#!/usr/bin/env bash
# Build the offline SGLang 0.5.17 bundle for a GPU machine without network access (Python 3.12, torch 2.11.0+cu130).
# Run here (PyPI reachable). Downloads cp312 x86_64 wheels with --no-deps, installs them into one directory tree
# (pip --target, no bytecode), trims sglang-kernel to what an MLA model with the `flashmla` backend needs
# (drops flash_ops.abi3.so (FA3), sm100/, infllm_ops), tars + xz-compresses it and splits it into parts under
# 40 MiB (PART_SIZE):  $OUT/part-00, part-01, ... plus SHA256SUMS and MANIFEST.txt.   OUT defaults to .carry/sglang (ignored).
# On the GPU machine: bash lab/sglang_offline/sglang_gpu_unpack.sh <dir with the parts>  (see that script).
#   bash lab/sglang_offline/sglang_gpu_bundle.sh            # SGLANG_BUNDLE_FA3=1 keeps flash_ops.abi3.so (about +7 parts)
# The package list is the minimal set found by importing sglang.launch_server, its --help, the HTTP server,
# scheduler, model runner, deepseek_v2 and the flashmla / flashinfer_mla backends (CUDA faked) in a CPU venv
# that has only what the target has (no pydantic; transformers 5.17.0, tokenizers 0.23.2), plus sgl-deep-gemm:
# speculative decoding's worker (eagle_worker_v2) imports dsa_backend, which imports deep_gemm on CUDA. transformers 5.12.1 + tokenizers 0.22.2 deliberately shadow the
# machine's 5.17.0 / 0.23.2: sglang 0.5.17 pins transformers==5.12.1 and fails to import with 5.17
# ("'qwen3_asr' is already used by a Transformers config"); 5.12.1 requires tokenizers<=0.23.0.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$repo/.carry/sglang}
work=${WORK:-$repo/.carry/sglang-build}
part_size=${PART_SIZE:-40m}
pip=(${PIP:-python3 -m pip})
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any)
packages=(
  sglang==0.5.17 sglang-kernel==0.4.5 flashinfer-python==0.6.15.post1
  sgl-deep-gemm==0.1.5.post1
  transformers==5.12.1 tokenizers==0.22.2
  apache-tvm-ffi==0.1.11 xgrammar==0.2.1 openai==2.6.1 soundfile==0.13.1
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 attrs==26.1.0 cffi==2.1.1 charset-normalizer==3.5.2
  compressed-tensors==0.20.0 dill==0.4.1 distro==1.9.0 einops==0.8.2 fastapi==0.165.0 frozenlist==1.8.0
  gguf==0.19.0 ipython==9.18.1 jiter==0.19.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  loguru==0.7.3 msgspec==0.22.0 multidict==7.2.1 nvidia-ml-py==13.615.71 opentelemetry-api==1.45.2
  orjson==3.13.0 partial-json-parser==0.2.1.1.post7 propcache==0.5.4 pybase64==1.5.1 pycparser==3.12
  python-multipart==0.0.34 pyzmq==27.3.0 referencing==0.37.0 requests==2.34.2 rpds-py==2026.9.1
  sentencepiece==0.2.3 setproctitle==1.3.8 sniffio==1.3.1 starlette==1.10.0 traitlets==5.16.1
  urllib3==2.8.0 uvicorn==0.54.0 yarl==1.25.1
)
mkdir -p "$work/wheels" "$out"
"${pip[@]}" download --no-deps "${plat[@]}" -d "$work/wheels" "${packages[@]}"
site=$work/stage/site
rm -rf "$work/stage" && mkdir -p "$site"
"${pip[@]}" install --no-deps --no-compile --target "$site" "${plat[@]}" "$work"/wheels/*.whl
rm -rf "$site/bin"
if [[ "${SGLANG_BUNDLE_FA3:-0}" != 1 ]]; then rm -f "$site/sgl_kernel/flash_ops.abi3.so"; fi
rm -rf "$site/sgl_kernel/sm100" "$site"/sgl_kernel/infllm_ops*.so
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
test -f "$site/sgl_kernel/sm90/common_ops.abi3.so" && test -f "$site/sgl_kernel/flashmla_ops.abi3.so"
rm -f "$out"/part-* "$out"/SHA256SUMS "$out"/MANIFEST.txt
{ echo "# sglang 0.5.17 offline bundle for Python 3.12 / torch 2.11.0+cu130; packages:"; printf '%s\n' "${packages[@]}"
  echo "# sgl_kernel trimmed: flash_ops.abi3.so $([[ "${SGLANG_BUNDLE_FA3:-0}" == 1 ]] && echo kept || echo dropped), sm100/ and infllm_ops dropped"
  echo "# unpacked size: $(du -sm "$site" | cut -f1) MiB"; } > "$work/stage/MANIFEST.txt"
cp "$work/stage/MANIFEST.txt" "$out/MANIFEST.txt"
tar -C "$work/stage" -cf - site MANIFEST.txt | xz -T0 -6 | split -b "$part_size" -d -a 2 - "$out/part-"
(cd "$out" && sha256sum part-* > SHA256SUMS)
echo "sglang_gpu_bundle: $(ls "$out"/part-* | wc -l) parts, $(du -cm "$out"/part-* | tail -1 | cut -f1) MiB in $out"
ls -l "$out"
