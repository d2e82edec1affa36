#!/usr/bin/env bash
# Runs on the lent GPU machine from the repository root (OUT set): builds the trees of STALL_TREES (ab-quick's
# AB_TREES syntax; default the seesaw base and the no-refill FMLA_ABL_NO_TMA build) with tools/device_gpu_run.sh
# ab-quick (AB_ROUNDS=0) and records ncu's per-instruction warp-stall sampling (SourceCounters) for one call of
# each, and of FlashMLA unless STALL_PEER=0, at STALL_SHAPE (default s_q 2 h128 8192), main kernels only; then
# summarises each with tools/ncu_source_top.py (NOTES, session 12).
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:?set OUT}
shape=${STALL_SHAPE:-128,2,128,8192}
export AB_TREES=${STALL_TREES:-"base=-DFMLA_ABL_DUMMY notma=-DFMLA_ABL_NO_TMA"} AB_ROUNDS=0
bash tools/device_gpu_run.sh ab-quick > "$OUT/build_run.log" 2>&1 || { tail -20 "$OUT/build_run.log"; exit 1; }
names=""
for spec in $AB_TREES; do names="$names ${spec%%=*}"; done
first=${names# }; first=${first%% *}
[ "${STALL_PEER:-1}" = 1 ] && names="$names flashmla"
for t in $names; do
  echo "##### $t $shape"
  if [ "$t" = flashmla ]; then pp=/tmp/ab_$first; impl=flashmla; else pp=/tmp/ab_$t; impl=ours; fi
  rep="/tmp/stall_$t"
  (cd /tmp && PYTHONPATH=$pp:/tmp/site:/tmp/peers timeout 150 ncu --clock-control none --profile-from-start off \
    --kernel-name regex:"decode_seesaw_kernel|splitkv_mla_kernel" --section SourceCounters --section WarpStateStats \
    --import-source no -f -o "$rep" python3 "$REPO/benchmarks/profile_decode.py" --shape "$shape" --impl "$impl") \
    > "$OUT/ncu_stall_${t}.log" 2>&1 || { echo "(ncu failed: ncu_stall_${t}.log)"; tail -5 "$OUT/ncu_stall_${t}.log"; continue; }
  ncu -i "$rep.ncu-rep" --page details --csv > "$OUT/stall_${t}_details.csv" 2>&1
  if ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/stall_${t}_source.csv" 2> "$OUT/stall_${t}_source.err"; then
    python3 "$REPO/tools/ncu_source_top.py" "$OUT/stall_${t}_source.csv" --top 30 | tee "$OUT/stall_${t}_top.txt"
  else
    echo "(source page export failed)"; head -5 "$OUT/stall_${t}_source.err"
    ncu --help | grep -i -A2 "print-source\|--page" | head -20
  fi
done
