M="gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for args in "--impl ours" "--impl ours --l2-pages 64" "--impl flashmla" "--impl flashmla --l2-pages 64"; do
  echo "##### $args"
  PYTHONPATH=/tmp/site:/tmp/peers timeout 150 ncu --profile-from-start off --kernel-name regex:"decode_kernel|splitkv_mla_kernel|flash_fwd" --metrics "$M" python3 benchmarks/profile_decode.py --b 128 --s-q 1 --h-q 128 --s-k 8192 $args 2>&1 | grep -vE "^==PROF==|^\s*$"
done
