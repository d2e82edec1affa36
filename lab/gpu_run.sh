#!/usr/bin/env bash
# Runs on a Hopper machine without network access, from the repository root, with the wheels and peer bundle
# in .carry/: .carry/nvidia_cutlass-4.2.0.0-*.whl (CUTLASS/CuTe headers), .carry/expecttest-*.whl and
# .carry/peers.tar.xz (FlashMLA + FlashInfer, from ../shared/tools/peer-bundle.sh), and .carry/commit (the
# commit the copy was taken at). Stages (any subset, in order): build sass test-quick test-k (TEST_K)
# test sanitize sched-bench bench-quick variant-quick ab-quick breakdown ncu-small probe-small probes
# bench-fp8 (FP8_BENCH: its arguments) bench.
# Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/flashmla_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-build sass test-quick}
REPO=$(pwd)
# Run Python from outside the checkout: with the repo root first on sys.path, `import flashmla_ops` would
# pick the source folder (no _C, no meta) instead of the installed package.
if [ ! -d /tmp/site/expecttest ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/nvidia_cutlass-*.whl .carry/expecttest-*.whl
fi
if [ ! -d /tmp/peers/flash_mla ] && [ -f .carry/peers.tar.xz ]; then
  mkdir -p /tmp/peers && tar -C /tmp/peers -xJf .carry/peers.tar.xz
fi
export PYTHONPATH=/tmp/site
# A copy of the tree without .git: the benchmark labels its JSON with the commit written to .carry/commit.
export FLASHMLA_COMMIT=${FLASHMLA_COMMIT:-$(cat .carry/commit 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$OUT/gpu.txt"
for st in $stages; do
  echo "=== stage $st ($(date +%T))"
  case $st in
    build)
      FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=8 python3 -m pip install --no-build-isolation --no-deps \
        -C build-dir=build/device -C cmake.define.FLASHMLA_PTXAS_VERBOSE=ON . > "$OUT/build.log" 2>&1 \
        || { tail -60 "$OUT/build.log"; exit 1; }
      grep -E "registers|spill|bytes stack" "$OUT/build.log" | sed 's/^ *//' | sort | uniq | tail -20 || true
      ;;
    sass)
      so=$(cd /tmp && python3 -c "import flashmla_ops._C as m; print(m.__file__)")
      cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>&1
      awk '/Function :/{f=$3} /HGMMA/{n[f]++} /LDGSTS/{l[f]++} /LDL|STL/{s[f]++} END{for (k in n) print "HGMMA", n[k], "LDGSTS", l[k], "local", s[k]+0, k}' "$OUT/sass.txt"
      grep -c "Function :" "$OUT/sass.txt"
      ;;
    test-quick)
      # QUICK_SITE: test another build (e.g. an ab-quick variant in /tmp/ab_NAME) ahead of /tmp/site.
      (cd /tmp && PYTHONPATH=${QUICK_SITE:+$QUICK_SITE:}$PYTHONPATH timeout 300 python3 -m pytest --rootdir="$REPO" "$REPO/tests/test_sched_cuda.py" "$REPO/tests/test_decode_cuda.py" -q -x -k "not grid or (b1 and 4096)" -p no:cacheprovider) 2>&1 | tee "$OUT/pytest_quick.log" | tail -25
      ;;
    test-k)
      (cd /tmp && timeout 300 python3 -m pytest --rootdir="$REPO" "$REPO/tests" -q -p no:cacheprovider \
        -k "${TEST_K:?set TEST_K}") 2>&1 | tee "$OUT/pytest_k.log" | tail -15
      ;;
    test)
      (cd /tmp && timeout 480 python3 -m pytest --rootdir="$REPO" "$REPO/tests" -q -p no:cacheprovider --junitxml="$OUT/junit.xml") 2>&1 | tee "$OUT/pytest.log" | tail -30
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitizer_cases.py > "$OUT/sanitizer_$tool.log" 2>&1
        echo "compute-sanitizer $tool exit $?"; tail -4 "$OUT/sanitizer_$tool.log"
      done
      ;;
    sched-bench)
      (cd /tmp && python3 "$REPO/benchmarks/bench_scheduler.py" --json "$OUT/sched_bench.json") 2>&1 | tee "$OUT/sched_bench.log"
      ;;
    bench-quick)
      PYTHONPATH=/tmp/site:/tmp/peers python3 benchmarks/bench_mla_decode.py --quick --no-torch \
        --json "$OUT/bench_quick.json" 2>&1 | tee "$OUT/bench_quick.log" | tail -16
      ;;
    breakdown)
      PYTHONPATH=/tmp/site:/tmp/peers python3 lab/profiling/kernel_breakdown.py ${BREAKDOWN_ARGS:-} \
        --json "$OUT/breakdown.json" 2>&1 | tee "$OUT/breakdown.log" | tail -80
      ;;
    variant-quick)
      # A/B: the same tree built with VARIANT_CXX_FLAGS / VARIANT_CUDA_FLAGS into /tmp/var_site, bench-quick on it.
      FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=8 python3 -m pip install -q --no-build-isolation --no-deps \
        --target /tmp/var_site -C build-dir=build/variant -C "cmake.define.CMAKE_CXX_FLAGS=${VARIANT_CXX_FLAGS:-}" \
        -C "cmake.define.CMAKE_CUDA_FLAGS=${VARIANT_CUDA_FLAGS:-}" . > "$OUT/build_variant.log" 2>&1 \
        || { tail -30 "$OUT/build_variant.log"; exit 1; }
      (cd /tmp && PYTHONPATH=/tmp/var_site:/tmp/site:/tmp/peers python3 "$REPO/benchmarks/bench_mla_decode.py" \
        --quick --no-torch --json "$OUT/bench_variant.json") 2>&1 | tee "$OUT/bench_variant.log" | tail -12
      ;;
    ab-quick)
      # A/B: AB_TREES="name=X ...", X either a tree (path.tar: git archive of csrc flashmla_ops meta integration
      # CMakeLists.txt pyproject.toml README.md, placed in .carry/) or -D/-U flags for this tree, given to both
      # nvcc and the host compiler (commas for spaces: -DA=1,-DB; nvcc-only flags would break the host build).
      # Each is built into /tmp/ab_NAME; bench-quick on each in turn, then on this tree (AB_BENCH="--small" or
      # "" for other benchmark rows, AB_ROUNDS for repeated alternating rounds).
      rm -f "$OUT/ab_build_failed"
      for spec in ${AB_TREES:-}; do
        name=${spec%%=*}; x=${spec#*=}; src=$REPO; flags=""
        if [ -f "$x" ]; then
          src=/tmp/ab_src_$name
          rm -rf "$src" && mkdir -p "$src" && tar -C "$src" -xf "$x"
        else
          flags=${x//,/ }
        fi
        # The trees build in parallel (16 cores), four nvcc jobs each.
        (FLASHMLA_ENABLE_CUDA=ON FLASHMLA_NVCC_THREADS=4 python3 -m pip install -q --no-build-isolation --no-deps \
          --target "/tmp/ab_$name" -C "build-dir=$REPO/build/ab_$name" -C "cmake.define.CMAKE_CUDA_FLAGS=$flags" \
          -C "cmake.define.CMAKE_CXX_FLAGS=$flags" "$src" > "$OUT/build_ab_$name.log" 2>&1 || { tail -30 "$OUT/build_ab_$name.log"; touch "$OUT/ab_build_failed"; }) &
      done
      wait
      [ -f "$OUT/ab_build_failed" ] && exit 1
      for round in $(seq 1 "${AB_ROUNDS:-1}"); do
        for spec in ${AB_TREES:-}; do
          name=${spec%%=*}
          echo "--- $name (round $round)"
          (cd /tmp && FLASHMLA_COMMIT="ab:$name" PYTHONPATH="/tmp/ab_$name:/tmp/site:/tmp/peers" \
            python3 "$REPO/benchmarks/bench_mla_decode.py" \
            ${AB_BENCH---quick} --no-torch --json "$OUT/bench_ab_${name}_$round.json") 2>&1 | tail -11
        done
        echo "--- this tree (round $round)"
        (cd /tmp && PYTHONPATH=/tmp/site:/tmp/peers python3 "$REPO/benchmarks/bench_mla_decode.py" \
          ${AB_BENCH---quick} --no-torch --json "$OUT/bench_ab_this_$round.json") 2>&1 | tail -11
      done
      ;;
    ncu-small)
      # Nsight Compute, each kernel of one call in isolation (serialised, so no PDL overlap), L2 kept (the
      # combine reads partials the main kernel just wrote), clocks not locked: ours and FlashMLA's kernels at
      # the small-batch shapes (NCU_SHAPES, "b,s_q,h_q,s_k" separated by spaces).
      M="gpu__time_duration.sum,launch__registers_per_thread,launch__grid_size,launch__block_size"
      M="$M,launch__occupancy_limit_registers,launch__waves_per_multiprocessor"
      M="$M,sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,lts__t_sector_hit_rate.pct"
      shapes=""
      for sh in ${NCU_SHAPES:-4,1,128,8192 2,1,128,8192 2,1,128,32768 1,1,128,1024 4,1,128,1024 4,1,16,1024 1,1,16,8192}; do
        shapes="$shapes --shape $sh"
      done
      for impl in ours flashmla; do
        (cd /tmp && PYTHONPATH=/tmp/site:/tmp/peers timeout 240 ncu --profile-from-start off --cache-control none \
          --clock-control none --kernel-name regex:"combine|decode_(serial|seesaw)_kernel|splitkv_mla_kernel" \
          --metrics "$M" python3 "$REPO/lab/profiling/profile_decode.py" $shapes --impl $impl) \
          > "$OUT/ncu_small_$impl.log" 2>&1
        grep -E "us, |^  [a-z_]|Function|duration|registers|grid_size|waves|warps_active|bytes_read|hit_rate|void |flashmla::" \
          "$OUT/ncu_small_$impl.log" | grep -v "==PROF==" | head -150
      done
      ;;
    probe-small)
      (cd /tmp && PYTHONPATH=/tmp/site python3 "$REPO/lab/probes/probe_parts.py" --small-b \
        --fractions ${PROBE_FRACTIONS:-1,0.75,0.5,0.25,0.125,0.0625} --json "$OUT/probe_small.json") 2>&1 \
        | tee "$OUT/probe_small.log" | tail -22
      ;;
    probes)
      # No attention math: TMA / wgmma shared-memory contention (pages from HBM and from L2) and the page-copy
      # ceilings from L2-resident pages (tma_stream_probe without `l2` gives the HBM ones).
      nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/tma_stream_probe lab/probes/tma_stream_probe.cu \
        && nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/smem_contention_probe \
          lab/probes/smem_contention_probe.cu || exit 1
      timeout 120 /tmp/smem_contention_probe 2>&1 | tee "$OUT/smem_contention_probe.log"
      timeout 120 /tmp/tma_stream_probe l2 2>&1 | tee "$OUT/tma_stream_probe_l2.log"
      ;;
    bench-fp8)
      (cd /tmp && PYTHONPATH=/tmp/site:/tmp/peers python3 "$REPO/benchmarks/bench_fp8.py" ${FP8_BENCH:-} \
        --json "$OUT/bench_fp8.json") 2>&1 | tee "$OUT/bench_fp8.log" | tail -70
      ;;
    bench)
      PYTHONPATH=/tmp/site:/tmp/peers python3 benchmarks/bench_mla_decode.py --json "$OUT/bench.json" \
        --png "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log" | tail -40
      ;;
  esac
done
