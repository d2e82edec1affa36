#!/usr/bin/env bash
# Runs on a Hopper machine after `lab/gpu_run.sh build` (and with .carry/peers.tar.xz unpacked to
# /tmp/peers): Nsight Compute metrics of one decode call, ours and FlashMLA's, with distinct (HBM) and
# L2-resident pages: duration, clock, tensor-pipe and smem-bank utilisation, instruction count and the warp
# stall breakdown. Used for benchmarks/NOTES.md (v3.1) and results/ncu_8871a2c/.
# Shape: b = 128, s_q = 1, h_q = 128, s_k = 8192 (the seesaw loop; pass other shapes by editing ARGS).
set -u
M="gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for args in "--impl ours" "--impl ours --l2-pages 64" "--impl flashmla" "--impl flashmla --l2-pages 64"; do
  echo "##### $args"
  PYTHONPATH=/tmp/site:/tmp/peers timeout 150 ncu --profile-from-start off --kernel-name regex:"decode_(serial|seesaw)_kernel|splitkv_mla_kernel" --metrics "$M" python3 lab/profiling/profile_decode.py ${ARGS:---b 128 --s-q 1 --h-q 128 --s-k 8192} $args 2>&1 | grep -vE "^==PROF==|^\s*$"
done
