// Contention probe: do TMA page copies landing in shared memory and wgmma operand reads from shared memory
// slow each other down on one SM? One CTA per SM, two warpgroups, no attention math:
//   * warpgroup 0, one thread: streams 64-token MLA pages (nine 64x64 bf16 boxes, 128B swizzle, 72 KB) into
//     two smem slots, refilling each slot as soon as it lands (the decode kernels' copy pattern without the
//     consumer's hold);
//   * warpgroup 1: issues the tensor work of a page's Q K^T over and over (36 wgmma m64n64k16, both operands
//     from a 72 KB smem tile ("SS", as the decode kernels' Q K^T) or A from registers ("RS"), committed as
//     one group and waited for, as the kernels do).
// Each alone, then both at once: bytes per cycle per SM the copies get, and cycles per page of Q K^T.
// Timing values only; the data are never checked (the wgmmas multiply whatever the smem holds).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
//     -o /tmp/smem_contention_probe lab/probes/smem_contention_probe.cu
//   /tmp/smem_contention_probe
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "probe_common.cuh"

namespace {

using namespace probe;
constexpr int kBoxBytes = 8192, kBoxes = 9;

struct Args {
  CUtensorMap map;
  const int* pages;
  int num_pages;
  int copy;   // warpgroup 0 streams pages
  int mma;    // 0: none, 1: SS wgmmas, 2: RS wgmmas
  int iters;  // pages of Q K^T warpgroup 1 runs (or pages warpgroup 0 copies when mma == 0)
};

// Shared-memory descriptor of a K-major 64-row tile with 128B swizzle (rows 128 bytes apart, 8-row groups
// 1024 bytes apart), starting `byte_off` bytes into the tile (the k-step within the 128-byte swizzle row).
__device__ __forceinline__ uint64_t desc(const void* tile, int byte_off) {
  const uint64_t addr = (smem_u32(tile) + byte_off) & 0x3FFFF;
  return (addr >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

#define ACC32(a)                                                                                            \
  "+f"(a[0]), "+f"(a[1]), "+f"(a[2]), "+f"(a[3]), "+f"(a[4]), "+f"(a[5]), "+f"(a[6]), "+f"(a[7]),           \
      "+f"(a[8]), "+f"(a[9]), "+f"(a[10]), "+f"(a[11]), "+f"(a[12]), "+f"(a[13]), "+f"(a[14]), "+f"(a[15]), \
      "+f"(a[16]), "+f"(a[17]), "+f"(a[18]), "+f"(a[19]), "+f"(a[20]), "+f"(a[21]), "+f"(a[22]),            \
      "+f"(a[23]), "+f"(a[24]), "+f"(a[25]), "+f"(a[26]), "+f"(a[27]), "+f"(a[28]), "+f"(a[29]),            \
      "+f"(a[30]), "+f"(a[31])
#define D32                                                                                               \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, "                                                                                                 \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"

__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " D32 ", %32, %33, 1, 1, 1, 0, 0;\n"
               : ACC32(d)
               : "l"(da), "l"(db));
}
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " D32
               ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
               : ACC32(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

struct Result {
  uint64_t copy_cycles, copy_bytes, mma_cycles, mma_iters, issue_cycles;
};

// Warpgroup 1: a.iters pages of Q K^T (36 wgmmas each, one commit group, waited for).
template <bool kSS>
__device__ __forceinline__ void mma_loop(const Args& a, const char* q, Result& r) {
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  const uint32_t ra[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
  const long long t0 = clock64();
  for (int it = 0; it < a.iters; ++it) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < kBoxes; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t db = desc(q + ((j + 1) % kBoxes) * kBoxBytes, 32 * k);
        if constexpr (kSS)
          wgmma_ss(d, desc(q + j * kBoxBytes, 32 * k), db);
        else
          wgmma_rs(d, ra, db);
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  }
  r.mma_cycles = static_cast<uint64_t>(clock64() - t0);
  r.mma_iters = a.iters;
  float s = 0.f;
  for (int i = 0; i < 32; ++i) s += d[i];
  if (s == 1234.5f) r.mma_iters = 0;  // keeps the wgmmas
}

__global__ void __launch_bounds__(256, 1) probe_kernel(const __grid_constant__ Args a, Result* res) {
  extern __shared__ __align__(1024) char smem[];
  char* q = smem + 2 * kPageBytes;  // the Q K^T operands (both from this tile: its values do not matter)
  __shared__ uint64_t bars[2];
  __shared__ volatile int mma_done;
  if (threadIdx.x == 0) {
    mbar_init(&bars[0]);
    mbar_init(&bars[1]);
    mma_done = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  Result r{};
  if (threadIdx.x == 0 && a.copy) {
    // Pages in this CTA's own stretch of the (random) page list, wrapping around.
    const int start = static_cast<int>((static_cast<int64_t>(blockIdx.x) * a.num_pages) / gridDim.x);
    auto page_of = [&](int i) { return a.pages[(start + i) % a.num_pages]; };
    auto issue = [&](int s, int page) {  // slot s = smem + s * kPageBytes
      mbar_expect(&bars[s], kPageBytes);
      for (int j = 0; j < kBoxes; ++j)
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, "
            "%4}], [%5];\n" ::"r"(smem_u32(smem + s * kPageBytes + j * kBoxBytes)),
            "l"(&a.map), "r"(j * 64), "r"(0), "r"(page), "r"(smem_u32(&bars[s]))
            : "memory");
    };
    const long long t0 = clock64();
    issue(0, page_of(0));
    issue(1, page_of(1));
    int landed = 0;
    uint64_t issue_cycles =
        0;  // time thread 0 spends issuing the nine copies of a page (after the first two)
    // Alone: a.iters pages. With the wgmmas: until warpgroup 1 is done, then drain what is in flight.
    for (;;) {
      mbar_wait(&bars[landed & 1], (landed >> 1) & 1);
      ++landed;
      const bool stop = a.mma ? mma_done != 0 : landed + 1 >= a.iters;
      if (stop) break;
      int next_page = page_of(landed + 1);
      asm volatile("mov.b32 %0, %0;\n" : "+r"(next_page));  // the lookup completes before the timed issue
      const long long ti = clock64();
      issue((landed + 1) & 1, next_page);
      issue_cycles += static_cast<uint64_t>(clock64() - ti);
    }
    r.copy_cycles = static_cast<uint64_t>(clock64() - t0);
    r.copy_bytes = static_cast<uint64_t>(landed) * kPageBytes;
    r.issue_cycles = landed > 1 ? issue_cycles / (landed - 1) : 0;
    mbar_wait(&bars[landed & 1], (landed >> 1) & 1);  // the last copy issued (never left in flight)
  }
  if (threadIdx.x >= 128 && a.mma) {
    // One branch around the whole loop: a branch between wgmmas makes ptxas serialise them.
    if (a.mma == 1)
      mma_loop<true>(a, q, r);
    else
      mma_loop<false>(a, q, r);
    if (threadIdx.x == 128) mma_done = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    res[blockIdx.x].copy_cycles = r.copy_cycles;
    res[blockIdx.x].copy_bytes = r.copy_bytes;
    res[blockIdx.x].issue_cycles = r.issue_cycles;
  }
  if (threadIdx.x == 128) {
    res[blockIdx.x].mma_cycles = r.mma_cycles;
    res[blockIdx.x].mma_iters = r.mma_iters;
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int num_pages = 128 * 128;  // 1.2 GB, as b = 128 requests of 8192 tokens
  char* base = nullptr;
  CK(cudaMalloc(&base, static_cast<size_t>(num_pages) * kPageBytes));
  CK(cudaMemset(base, 1, static_cast<size_t>(num_pages) * kPageBytes));
  Args a{};
  make_page_map(&a.map, base, num_pages, 64);
  std::vector<int> hbm(num_pages), l2(num_pages);
  std::iota(hbm.begin(), hbm.end(), 0);
  std::shuffle(hbm.begin(), hbm.end(), std::mt19937(1));
  for (int i = 0; i < num_pages; ++i) l2[i] = hbm[i] % 256;  // 256 distinct pages, 18 MB: L2-resident
  int *d_hbm = nullptr, *d_l2 = nullptr;
  CK(cudaMalloc(&d_hbm, num_pages * 4));
  CK(cudaMalloc(&d_l2, num_pages * 4));
  CK(cudaMemcpy(d_hbm, hbm.data(), num_pages * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_l2, l2.data(), num_pages * 4, cudaMemcpyHostToDevice));
  Result* d_res = nullptr;
  CK(cudaMalloc(&d_res, sms * sizeof(Result)));
  std::vector<Result> res(sms);
  const int smem = 3 * kPageBytes;
  CK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int clk_khz = 0;
  CK(cudaDeviceGetAttribute(&clk_khz, cudaDevAttrClockRate, 0));
  std::printf("%-4s %-5s %-4s %5s %12s %14s %16s   (36 wgmma = 1,152 cycles at peak)\n", "src", "copy", "mma",
              "ctas", "copy B/cyc/SM", "Q K^T cyc/page", "issue cyc/page");
  const char* mma_names[3] = {"-", "SS", "RS"};
  for (int src = 0; src < 2; ++src) {
    for (int ctas : {sms, 8}) {
      for (int cfg = 0; cfg < 5; ++cfg) {
        a.pages = src == 0 ? d_hbm : d_l2;
        a.num_pages = num_pages;
        a.copy = cfg == 0 || cfg >= 3;
        a.mma = cfg == 0 ? 0 : (cfg == 1 || cfg == 3 ? 1 : 2);
        a.iters = 400;
        std::vector<double> rate, cyc, iss;
        for (int rep = 0; rep < 5; ++rep) {
          CK(cudaMemset(d_res, 0, sms * sizeof(Result)));
          probe_kernel<<<ctas, 256, smem>>>(a, d_res);
          CK(cudaGetLastError());
          CK(cudaDeviceSynchronize());
          CK(cudaMemcpy(res.data(), d_res, ctas * sizeof(Result), cudaMemcpyDeviceToHost));
          if (rep == 0) continue;  // warm-up
          for (int i = 0; i < ctas; ++i) {
            if (res[i].copy_cycles) rate.push_back(double(res[i].copy_bytes) / double(res[i].copy_cycles));
            if (res[i].copy_cycles) iss.push_back(double(res[i].issue_cycles));
            if (res[i].mma_iters) cyc.push_back(double(res[i].mma_cycles) / double(res[i].mma_iters));
          }
        }
        std::printf("%-4s %-5s %-4s %5d %12.1f %14.0f %16.0f\n", src == 0 ? "HBM" : "L2",
                    a.copy ? "yes" : "-", mma_names[a.mma], ctas, median(rate), median(cyc), median(iss));
      }
    }
  }
  std::printf("(SM clock attribute %.2f GHz; rates are per SM cycle, medians over CTAs and 4 calls)\n",
              clk_khz * 1e-6);
  return 0;
}
