#!/usr/bin/env bash
# Diagnostic, for a Hopper machine set up as lab/gpu_run.sh describes (wheels in .carry/): builds flashmla_ops
# with -DFMLA_TRACE into build/trace and prints the per-pair clock trace of the seesaw loop for b = 128,
# s_q = 1, h_q = 128, s_k = 8192 (HBM and L2-resident pages). Needs the trace instrumentation applied first
# (lab/trace/pair_trace_README.md); without it the build is the normal one and nothing is traced.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/nvidia_cutlass-*.whl .carry/expecttest-*.whl
export PYTHONPATH=/tmp/site
FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=8 python3 -m pip install --no-build-isolation --no-deps -C build-dir=build/trace -C cmake.define.CMAKE_CUDA_FLAGS=-DFMLA_TRACE . > $OUT/build_trace.log 2>&1 || { tail -30 $OUT/build_trace.log; exit 1; }
cd /tmp
for a in "" "--l2-pages 64"; do
  echo "#### $a"
  PYTHONPATH=/tmp/site python3 $OLDPWD/lab/profiling/profile_decode.py --b 128 --s-q 1 --h-q 128 --s-k 8192 $a 2>&1 | tail -9
done
