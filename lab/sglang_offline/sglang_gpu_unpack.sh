#!/usr/bin/env bash
# Reassemble the offline SGLang 0.5.17 bundle (made by lab/sglang_offline/sglang_gpu_bundle.sh) on the GPU machine.
#   bash lab/sglang_offline/sglang_gpu_unpack.sh [PARTS_DIR ...]     # default PARTS_DIR: /tmp/sglang_parts
#   source lab/sglang_offline/sglang_gpu_unpack.sh [PARTS_DIR ...]   # same, and exports PYTHONPATH in this shell
# The part-XX files (and SHA256SUMS, if copied along) may be spread over several folders (one per transfer).
# Unpacks into $DEST (default /tmp/sglang_bundle), writes $DEST/env.sh (export PYTHONPATH=$DEST/site:...)
# and checks `import sglang.launch_server, sgl_kernel.flash_mla, flashinfer` with $PYTHON (default python3).
# Then: source $DEST/env.sh && bash tools/sglang_e2e.sh
_sgu_main() {
  set -euo pipefail
  local dest=${DEST:-/tmp/sglang_bundle} py=${PYTHON:-python3}
  local dirs=("$@"); [[ ${#dirs[@]} -gt 0 ]] || dirs=(/tmp/sglang_parts)
  local parts=() sums="" d f
  for d in "${dirs[@]}"; do
    for f in "$d"/part-[0-9][0-9]; do [[ -f $f ]] && parts+=("$f"); done
    [[ -f $d/SHA256SUMS ]] && sums=$d/SHA256SUMS
  done
  [[ ${#parts[@]} -gt 0 ]] || { echo "sglang_gpu_unpack: no part-XX files in ${dirs[*]}" >&2; return 2; }
  mapfile -t parts < <(for f in "${parts[@]}"; do echo "$(basename "$f") $f"; done | sort -u -k1,1 | cut -d' ' -f2-)
  if [[ -n $sums ]]; then
    local want; want=$(wc -l < "$sums")
    [[ ${#parts[@]} -eq $want ]] || { echo "sglang_gpu_unpack: ${#parts[@]} parts found, SHA256SUMS lists $want" >&2; return 2; }
    for f in "${parts[@]}"; do
      grep -q "^$(sha256sum "$f" | cut -d' ' -f1)  $(basename "$f")\$" "$sums" \
        || { echo "sglang_gpu_unpack: checksum mismatch: $f" >&2; return 2; }
    done
  else
    echo "sglang_gpu_unpack: no SHA256SUMS carried; skipping checksums (${#parts[@]} parts)" >&2
  fi
  rm -rf "$dest" && mkdir -p "$dest"
  if command -v xz >/dev/null; then
    cat "${parts[@]}" | xz -d | tar -C "$dest" -xf -
  else
    cat "${parts[@]}" | "$py" -c 'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1])' "$dest"
  fi
  echo "export PYTHONPATH=$dest/site\${PYTHONPATH:+:\$PYTHONPATH}" > "$dest/env.sh"
  echo "sglang_gpu_unpack: $(du -sm "$dest" | cut -f1) MiB in $dest; now: source $dest/env.sh"
  (cd /tmp && PYTHONPATH=$dest/site${PYTHONPATH:+:$PYTHONPATH} "$py" -c '
import importlib.metadata as m, sglang.launch_server, sgl_kernel, sgl_kernel.flash_mla as fm, flashinfer, transformers
print("sglang", m.version("sglang"), "| sglang-kernel", m.version("sglang-kernel"), "| flashinfer", m.version("flashinfer-python"),
      "| transformers", transformers.__version__, "| flashmla_ops loaded:", fm._flashmla_import_error is None)
') || { echo "sglang_gpu_unpack: import check failed" >&2; return 1; }
}
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  (_sgu_main "$@") && source "${DEST:-/tmp/sglang_bundle}/env.sh"
else
  _sgu_main "$@"
fi
