#!/usr/bin/env bash
# Diagnostic, for a Hopper machine (after `lab/gpu_run.sh build` set up /tmp/site): builds
# flashmla_ops with the segment stamps (-DFMLA_TRACE, csrc/kernels/sm90/seg_trace.cuh) into /tmp/trace_site,
# apart from the normal install, and prints lab/trace/segment_trace.py's reading for each shape given as
# "b,s_q,h_q,s_k[,varlen]" arguments (varlen 1: variable lengths with mean s_k; default: the h_q = 128 rows
# at 4096 and 8192 and b = 1 at 32768).
set -u
OUT=${OUT:-/tmp/flashmla_out}
REPO=$(pwd)
export PYTHONPATH=/tmp/site
FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=8 python3 -m pip install -q --no-build-isolation --no-deps \
  --target /tmp/trace_site -C build-dir=build/trace -C cmake.define.CMAKE_CUDA_FLAGS=-DFMLA_TRACE . \
  > "$OUT/build_trace.log" 2>&1 || { tail -30 "$OUT/build_trace.log"; exit 1; }
shapes=${*:-128,1,128,4096 128,1,128,8192 1,1,128,32768 128,1,16,4096}
for sh in $shapes; do
  IFS=, read -r b sq hq sk var <<< "$sh"
  vflag=""; [ "${var:-0}" = 1 ] && vflag="--varlen"
  echo "#### b=$b s_q=$sq h_q=$hq s_k=$sk ${vflag}"
  (cd /tmp && FMLA_TRACE_OUT=/tmp/seg_trace.txt PYTHONPATH=/tmp/trace_site:/tmp/site \
    python3 "$REPO/lab/trace/segment_trace.py" --b "$b" --s-q "$sq" --h-q "$hq" --s-k "$sk" $vflag)
  cp /tmp/seg_trace.txt "$OUT/seg_trace_${b}_${sq}_${hq}_${sk}${var:+_$var}.txt"
done
