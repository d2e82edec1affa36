// Does compute-sanitizer racecheck order accesses across a named barrier (bar.sync id, count) that only part
// of the CTA joins? The FP8 ping-pong kernel's two consumer warpgroups (256 of 384 threads) hand data over
// through shared memory around `bar.sync 3, 256` while the producer warpgroup runs on (or has exited).
// Thread 0 writes, the barrier, thread 160 reads, in four set-ups:
//   0: 384 threads, warps 8..11 exit after the first __syncthreads (the kernel's case)
//   1: 256 threads, the same barrier (then it is CTA-wide)
//   2: 384 threads, warps 8..11 stay and sync among themselves on barrier 4
//   3: 384 threads, warps 8..11 exit, the handover through an mbarrier (arrive / try_wait) instead
//   nvcc -O3 -arch=sm_90a -o /tmp/rc lab/probes/racecheck_named_barrier.cu
//   for m in 0 1 2 3; do compute-sanitizer --tool racecheck /tmp/rc $m; done
#include <cstdio>
#include <cstdlib>
#include <cstdint>

__global__ void probe(int mode, int* out) {
  __shared__ int x[256];
  __shared__ uint64_t bar;
  const uint32_t bar_addr = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  if (threadIdx.x == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar_addr), "r"(128));
  __syncthreads();
  if (threadIdx.x >= 256) {
    if (mode == 2) asm volatile("bar.sync 4, 128;\n" ::: "memory");
    return;
  }
  for (int round = 0; round < 4; ++round) {
    if (threadIdx.x < 128) x[threadIdx.x] = round * 1000 + threadIdx.x;
    if (mode == 3) {
      if (threadIdx.x < 128)
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar_addr) : "memory");
      else
        asm volatile(
            "{\n.reg .pred d;\nw_%=:\nmbarrier.try_wait.parity.shared::cta.b64 d, [%0], %1;\n@!d bra "
            "w_%=;\n}\n" ::"r"(bar_addr),
            "r"(round & 1)
            : "memory");
    } else {
      asm volatile("bar.sync 3, 256;\n" ::: "memory");
    }
    int v = 0;
    if (threadIdx.x >= 128) v = x[threadIdx.x - 128];
    asm volatile("bar.sync 3, 256;\n" ::: "memory");  // reads done before the next round's writes
    if (threadIdx.x >= 128) out[threadIdx.x - 128] += v;
  }
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 0;
  int* out;
  cudaMalloc(&out, 128 * sizeof(int));
  cudaMemset(out, 0, 128 * sizeof(int));
  probe<<<1, mode == 1 ? 256 : 384>>>(mode, out);
  int h[128];
  cudaMemcpy(h, out, sizeof(h), cudaMemcpyDeviceToHost);
  printf("mode %d: out[32] = %d (expected %d), %s\n", mode, h[32], 6000 + 4 * 32,
         cudaGetErrorString(cudaGetLastError()));
  return 0;
}
