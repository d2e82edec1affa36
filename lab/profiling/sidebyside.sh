#!/usr/bin/env bash
# Side-by-side profile of our main decode kernel and FlashMLA's (`flash_fwd_splitkv_mla_kernel`, sgl-flash-mla)
# at the same shapes, one call each, after `lab/gpu_run.sh build` with the peers in /tmp/peers. Nsight Compute,
# clocks free, caches flushed before each pass: time, SM clock, tensor-pipe activity, shared-memory bank
# conflicts, registers, issued instructions, the warp-stall breakdown, and executed instructions per SASS opcode.
#   SHAPES="128,2,128,8192 128,1,128,4096" bash lab/profiling/sidebyside.sh      # writes $OUT/sbs_*.txt
set -u
OUT=${OUT:-/tmp/flashmla_out}
M="gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,sm__cycles_elapsed.max"
M="$M,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread"
M="$M,launch__grid_size,smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"
M="$M,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct"
M="$M,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
K='regex:decode_(serial|seesaw)_kernel|splitkv_mla_kernel'
for sh in ${SHAPES:-128,2,128,8192 128,1,128,4096}; do
  IFS=, read -r b sq hq sk <<< "$sh"
  for impl in ours flashmla; do
    f="$OUT/sbs_${impl}_${b}_${sq}_${hq}_${sk}.txt"
    echo "##### $impl b=$b s_q=$sq h_q=$hq s_k=$sk"
    (cd /tmp && PYTHONPATH=/tmp/site:/tmp/peers timeout 150 ncu --profile-from-start off --kernel-name "$K" \
      --metrics "$M,sass__inst_executed_per_opcode" --print-metric-instances details \
      python3 "$OLDPWD/lab/profiling/profile_decode.py" --b "$b" --s-q "$sq" --h-q "$hq" --s-k "$sk" \
      --impl "$impl") > "$f" 2>&1
    grep -vE "^==PROF==|^\s*$|^==WARNING==" "$f" | cut -c1-2500 | tail -40
  done
done
