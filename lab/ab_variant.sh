#!/usr/bin/env bash
# A/B of compiler flags on a Hopper machine, after `lab/gpu_run.sh build` (base in /tmp/site, peers in
# /tmp/peers): this tree is built again with VARIANT_CUDA_FLAGS (nvcc only) into /tmp/var_site (skipped when
# it exists), then AB_ROUNDS alternating rounds of the benchmark on AB_ROWS, base then variant, each with
# FlashMLA timed in the same process; prints, per row, variant / base time and both ratios to FlashMLA.
#   VARIANT_CUDA_FLAGS="--use_fast_math" AB_ROWS="128,1,128,4096,0;128,2,128,8192,0" bash lab/ab_variant.sh
set -u
OUT=${OUT:-/tmp/flashmla_out}
REPO=$(pwd)
if [ ! -d /tmp/var_site/flashmla_ops ]; then
  FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=8 python3 -m pip install -q --no-build-isolation --no-deps \
    --target /tmp/var_site -C build-dir=build/variant -C "cmake.define.CMAKE_CUDA_FLAGS=${VARIANT_CUDA_FLAGS:?}" \
    -C cmake.define.FLASHMLA_PTXAS_VERBOSE=ON . > "$OUT/build_variant.log" 2>&1 \
    || { tail -30 "$OUT/build_variant.log"; exit 1; }
  grep -E "registers|spill" "$OUT/build_variant.log" | sed 's/^ *//' | sort | uniq | tail -8
fi
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for which in base var; do
    site=/tmp/site
    [ $which = var ] && site=/tmp/var_site:/tmp/site
    (cd /tmp && FLASHMLA_COMMIT="ab:$which" PYTHONPATH="$site:/tmp/peers" python3 \
      "$REPO/benchmarks/bench_mla_decode.py" --rows "${AB_ROWS:?}" --peers FlashMLA --no-torch \
      --json "$OUT/ab_${which}_$round.json") > "$OUT/ab_${which}_$round.log" 2>&1 || tail -5 "$OUT/ab_${which}_$round.log"
  done
done
python3 - "$OUT" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
runs = {w: [json.load(open(f))["rows"] for f in sorted(glob.glob(f"{out}/ab_{w}_*.json"))] for w in ("base", "var")}
print(f"{'row':<22} {'base us':>9} {'var us':>9} {'var/base':>8} {'FM/base':>8} {'FM/var':>8}  (medians over rounds)")
for i, row in enumerate(runs["base"][0]):
    key = f"{row['b']},{row['s_q']},{row['h_q']},{row['s_k']}{'v' if row['varlen'] else ''}"
    med = lambda w, name: statistics.median(r[i][name]["us"] for r in runs[w] if "us" in r[i].get(name, {}))
    b, v = med("base", "flashmla_ops"), med("var", "flashmla_ops")
    fb, fv = med("base", "FlashMLA"), med("var", "FlashMLA")
    print(f"{key:<22} {b:9.1f} {v:9.1f} {v / b:8.3f} {fb / b:8.3f} {fv / v:8.3f}")
PY
