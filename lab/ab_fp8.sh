#!/usr/bin/env bash
# FP8 A/B on a Hopper machine (as lab/gpu_run.sh; run from the repository root): this tree built as the base
# (lab/gpu_run.sh build), each AB_TREES tree (name=path.tar, a `git archive` of a branch placed in .carry/)
# built into /tmp/ab_NAME, then AB_ROUNDS alternating rounds of benchmarks/bench_fp8.py (ours only, on ROWS),
# base first, then the FP8 GPU tests on every variant (its own tests/test_fp8_cuda.py when the tarball has
# one; TEST_BASE=1: the base's too, first). With NCU=1, Nsight Compute metrics of the base's FP8 kernel
# (NCU_TREE=name: that variant's) at the first row. Logs and JSON to $OUT.
#   git archive -o .carry/ab_look.tar fp8-lookahead csrc flashmla_ops meta integration tests CMakeLists.txt \
#     pyproject.toml README.md
#   AB_TREES="look=.carry/ab_look.tar" bash lab/ab_fp8.sh
set -uo pipefail
OUT=${OUT:-/tmp/flashmla_out}
REPO=$(pwd)
ROWS=${ROWS:-"128,1,16,8192;128,2,16,4096;128,1,16,4096"}
TREES=${AB_TREES:?set AB_TREES}
# (the build stage's status is its last grep's: check the install itself)
bash lab/gpu_run.sh build
(cd /tmp && PYTHONPATH=/tmp/site python3 -c "import flashmla_ops._C") || exit 1
if [ "${TEST_BASE:-0}" = 1 ]; then
  echo "=== FP8 GPU tests on base"
  (cd /tmp && PYTHONPATH=/tmp/site timeout 240 python3 -m pytest --rootdir="$REPO" "$REPO/tests/test_fp8_cuda.py" \
    -q -x -p no:cacheprovider) 2>&1 | tee "$OUT/pytest_fp8_base.log" | tail -25
fi
for spec in $TREES; do
  name=${spec%%=*}
  src=/tmp/ab_src_$name
  rm -rf "$src" && mkdir -p "$src" && tar -C "$src" -xf "${spec#*=}"
  (FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=4 python3 -m pip install -q --no-build-isolation --no-deps \
    --target "/tmp/ab_$name" -C "build-dir=$REPO/build/ab_$name" "$src" > "$OUT/build_ab_$name.log" 2>&1 \
    || { tail -30 "$OUT/build_ab_$name.log"; touch "$OUT/ab_build_failed"; }) &
done
wait
[ -f "$OUT/ab_build_failed" ] && exit 1
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for name in base $(for spec in $TREES; do echo "${spec%%=*}"; done); do
    site=/tmp/site
    [ "$name" != base ] && site=/tmp/ab_$name:/tmp/site
    echo "--- $name (round $round)"
    (cd /tmp && FLASHMLA_COMMIT="ab:$name" PYTHONPATH="$site" python3 "$REPO/benchmarks/bench_fp8.py" \
      --peers= --rows "$ROWS" --json "$OUT/fp8_ab_${name}_$round.json") 2>&1 | grep -E "^b=|  ours "
  done
done
for spec in $TREES; do
  name=${spec%%=*}
  echo "=== FP8 GPU tests on $name"
  root=$REPO
  [ -f "/tmp/ab_src_$name/tests/test_fp8_cuda.py" ] && root=/tmp/ab_src_$name
  (cd /tmp && PYTHONPATH=/tmp/ab_$name:/tmp/site timeout 240 python3 -m pytest --rootdir="$root" \
    "$root/tests/test_fp8_cuda.py" -q -p no:cacheprovider) 2>&1 | tail -3
done
if [ "${NCU:-0}" = 1 ]; then
  M="gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
  first=${ROWS%%;*}
  site=/tmp/site  # NCU_TREE=name: profile that variant instead of the base
  [ -n "${NCU_TREE:-}" ] && site=/tmp/ab_$NCU_TREE:/tmp/site
  (cd /tmp && PYTHONPATH=$site timeout 150 ncu --profile-from-start off \
    --kernel-name regex:"decode_(transposed|serial|pingpong_fp8)_kernel" --metrics "$M" \
    python3 "$REPO/lab/profiling/profile_decode.py" --shape "$first" --kv fp8) 2>&1 | grep -vE "^==PROF==|^\s*$" \
    | tee "$OUT/ncu_fp8.log" | tail -40
fi
