#!/usr/bin/env bash
# Runs on a Hopper machine after `lab/gpu_run.sh build` (with .carry/peers.tar.xz unpacked to
# /tmp/peers): Nsight Compute warp-state sampling per SASS instruction (SourceCounters) of one decode call, ours
# and FlashMLA's, written as CSV (one row per instruction: stall samples by reason), plus the warp-state summary
# and L2 traffic counters by shape. Read the CSVs with lab/profiling/ncu_source_summary.py.
# Shape: ARGS (default b = 128, s_q = 1, h_q = 128, s_k = 4096: the seesaw loop).
set -uo pipefail
OUT=${OUT:-/tmp/flashmla_out}
ARGS=${ARGS:---b 128 --s-q 1 --h-q 128 --s-k 4096}
KERNELS='regex:decode_(serial|seesaw)_kernel|splitkv_mla_kernel'
for impl in ours flashmla; do
  echo "##### $impl $ARGS"
  PYTHONPATH=/tmp/site:/tmp/peers timeout 200 ncu --profile-from-start off --kernel-name "$KERNELS" \
    --section SourceCounters --section WarpStateStats --warp-sampling-interval 1 --import-source no \
    -f -o "$OUT/src_$impl" python3 lab/profiling/profile_decode.py $ARGS --impl $impl 2>&1 | grep -vE "^==PROF==|^\s*$" | tail -3
  ncu -i "$OUT/src_$impl.ncu-rep" --page source --csv --print-source sass > "$OUT/src_$impl.csv" 2> "$OUT/src_$impl.err"
  ncu -i "$OUT/src_$impl.ncu-rep" --page details --section WarpStateStats > "$OUT/warpstate_$impl.txt" 2>&1
  gzip -f "$OUT/src_$impl.csv"; rm -f "$OUT/src_$impl.ncu-rep"
done
M="gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum,lts__t_requests_srcunit_tex_op_read.sum,lts__t_sectors_op_read.sum,l1tex__m_xbar2l1tex_read_bytes.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed"
for shape in "--b 128 --s-q 1 --h-q 16 --s-k 8192" "--b 128 --s-q 1 --h-q 128 --s-k 8192"; do
  for impl in ours flashmla; do
    echo "##### L2 $impl $shape"
    PYTHONPATH=/tmp/site:/tmp/peers timeout 120 ncu --profile-from-start off --kernel-name "$KERNELS" --metrics "$M" \
      python3 lab/profiling/profile_decode.py $shape --impl $impl 2>&1 | grep -vE "^==PROF==|^\s*$"
  done
done
