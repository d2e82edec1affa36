#!/usr/bin/env bash
# Runs on the lent GPU machine from the repository root (OUT set): builds the seesaw ablation trees base /
# FMLA_ABL_NO_TMA / FMLA_ABL_SHADOW_TMA (tools/device_gpu_run.sh ab-quick) and profiles one call of each and of
# FlashMLA with Nsight Compute: clocks free, caches flushed before each pass (ncu's default), main kernels only
# (the combine kernel is not selected, so these times are not the whole call the sweep times). Duration, SM
# clock, tensor-pipe and smem bank utilisation, instructions, warp stall ratios (NOTES, session 11).
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:?set OUT}
export AB_TREES="base=-DFMLA_ABL_DUMMY notma=-DFMLA_ABL_NO_TMA shadow=-DFMLA_ABL_SHADOW_TMA" AB_ROUNDS=0
bash tools/device_gpu_run.sh ab-quick > "$OUT/build_run.log" 2>&1 || { tail -20 "$OUT/build_run.log"; exit 1; }
M="gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_(barrier|gmma|long_scoreboard|mio_throttle|wait|dispatch_stall|no_instruction|selected|short_scoreboard|lg_throttle|math_pipe_throttle)_per_issue_active\.ratio"
for shape in 128,2,128,8192 128,1,128,8192; do
  for t in base notma shadow flashmla; do
    echo "##### $t $shape"
    if [ "$t" = flashmla ]; then pp=/tmp/ab_base; impl=flashmla; else pp=/tmp/ab_$t; impl=ours; fi
    (cd /tmp && PYTHONPATH=$pp:/tmp/site:/tmp/peers timeout 120 ncu --clock-control none --profile-from-start off \
      --kernel-name regex:"decode_seesaw_kernel|splitkv_mla_kernel" --metrics "$M" \
      python3 "$REPO/benchmarks/profile_decode.py" --shape "$shape" --impl "$impl" 2>&1) > "$OUT/ncu_${t}_$shape.log"
    rc=$?
    grep -vE "^==PROF==|^\s*$|----|Metric Name|Section:" "$OUT/ncu_${t}_$shape.log"
    [ $rc -ne 0 ] && echo "(ncu exit $rc: see ncu_${t}_$shape.log)"
  done
done
