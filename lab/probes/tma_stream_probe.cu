// Streaming probe: how fast can one CTA per SM pull 64-token MLA pages (64 x 576 bf16 = 72 KB, contiguous)
// from HBM into shared memory, with the copy shapes and buffer counts the decode kernels could use, and how
// much a per-page "hold" (the time a consumer keeps a buffer before it can be refilled) costs?
// No attention math: this separates the memory system's share of the memory-bound gap from the kernel's.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/tma_stream_probe lab/probes/tma_stream_probe.cu
//   /tmp/tma_stream_probe            # one line per (copy shape, buffers, hold, CTA count); random page order
//   /tmp/tma_stream_probe l2   # the per-SM ceiling from L2: the same page reads folded onto 256 distinct
//                              # pages (18 MB), 1 to 132 CTAs, and groups of 2 or 4 CTAs streaming the
//                              # same pages together (as the m-block CTAs of h_q * s_q = 128 / 256 do)
//
// Copy shapes: "tma64" = nine 64x64 TMA boxes (128B swizzle) per page into one 72 KB slot, as the decode
// kernels copy today; "half" = half-page slots of 36 KB (nine 32-row boxes each); "bulk" = one 1-D
// cp.async.bulk of the whole contiguous page (no swizzle, not usable by wgmma as is; the contiguous-read
// reference). The "hold" is the time (cycles) a consumer keeps a slot after it landed before it may be
// refilled: what a page's Q K^T, softmax and P V take in the decode kernels.
#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "probe_common.cuh"

namespace {

using namespace probe;
constexpr int kMaxBufs = 6;

struct Args {
  CUtensorMap map64, map32;
  const char* base;
  const int* pages;
  int num_pages, mode, nbuf, hold;
  int group;  // CTAs [g * group, (g + 1) * group) stream the same pages (1: every CTA its own share)
};

// Tokens per smem slot: a whole page, or half of one ("half": nine 32-row boxes, 36 KB per slot).
__device__ __forceinline__ int slot_rows(int mode) {
  return mode == 1 ? 32 : kRows;
}

__device__ __forceinline__ void issue(const Args& a, char* dst, uint64_t* bar, int page, int row0) {
  const int rows = slot_rows(a.mode);
  mbar_expect(bar, rows * kCols * 2);
  if (a.mode == 2) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            smem_u32(dst)),
        "l"(a.base + static_cast<int64_t>(page) * kPageBytes), "r"(kPageBytes), "r"(smem_u32(bar))
        : "memory");
    return;
  }
  const CUtensorMap* map = a.mode == 0 ? &a.map64 : &a.map32;
  for (int j = 0; j < kCols / 64; ++j) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, "
        "%4}], [%5];\n" ::"r"(smem_u32(dst + j * rows * 128)),
        "l"(map), "r"(j * 64), "r"(row0), "r"(page), "r"(smem_u32(bar))
        : "memory");
  }
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// times[2 * cta] / [2 * cta + 1]: the CTA's start and end (globaltimer, ns), to see how far the per-SM
// rates spread with identical work; cycles[2 * cta] / [2 * cta + 1]: the SM cycles (clock64) the CTA took and
// the bytes it received, for bytes per cycle per SM.
__global__ void __launch_bounds__(128, 1)
    stream_kernel(const __grid_constant__ Args a, unsigned* sink, uint64_t* times, uint64_t* cycles) {
  extern __shared__ __align__(1024) char smem[];
  __shared__ uint64_t bars[kMaxBufs];
  const long long c_start = clock64();
  if (threadIdx.x == 0) times[2 * blockIdx.x] = global_ns();
  const int upp = kRows / slot_rows(a.mode);  // slots per page
  const int slot_bytes = slot_rows(a.mode) * kCols * 2;
  const int groups = gridDim.x / a.group, g = blockIdx.x / a.group;
  const int per = (a.num_pages + groups - 1) / groups;
  const int begin = g * per * upp, end = min(a.num_pages, (g + 1) * per) * upp;
  if (threadIdx.x == 0) {
    for (int i = 0; i < a.nbuf; ++i) mbar_init(&bars[i]);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int i = 0; i < a.nbuf && begin + i < end; ++i)
      issue(a, smem + i * slot_bytes, &bars[i], a.pages[(begin + i) / upp], ((begin + i) % upp) * 32);
  unsigned acc = 0;
  for (int i = begin, k = 0; i < end; ++i, ++k) {
    const int buf = k % a.nbuf;
    mbar_wait(&bars[buf], (k / a.nbuf) & 1);
    acc += reinterpret_cast<const unsigned*>(smem + buf * slot_bytes)[threadIdx.x];
    if (a.hold > 0) {  // the consumer keeps the slot this long (cycles) before it may be refilled
      const long long t0 = clock64();
      while (clock64() - t0 < a.hold) {
      }
    }
    __syncthreads();
    const int n = i + a.nbuf;
    if (threadIdx.x == 0 && n < end)
      issue(a, smem + buf * slot_bytes, &bars[buf], a.pages[n / upp], (n % upp) * 32);
  }
  if (acc == 0x12345678u) sink[0] = acc;
  if (threadIdx.x == 0) {
    times[2 * blockIdx.x + 1] = global_ns();
    cycles[2 * blockIdx.x] = static_cast<uint64_t>(clock64() - c_start);
    cycles[2 * blockIdx.x + 1] = static_cast<uint64_t>(max(end - begin, 0)) * slot_bytes;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool l2 = argc > 1 && std::string(argv[1]) == "l2";
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int num_pages = 128 * 128;  // b = 128 requests of 8192 tokens, 1.2 GB: far larger than L2
  char* base = nullptr;
  CK(cudaMalloc(&base, static_cast<size_t>(num_pages) * kPageBytes));
  CK(cudaMemset(base, 1, static_cast<size_t>(num_pages) * kPageBytes));
  unsigned* sink = nullptr;
  CK(cudaMalloc(&sink, 4));
  uint64_t *times = nullptr, *cycles = nullptr;
  const int max_ctas = std::max(sms, 128);  // the configs run at most sms or 128 CTAs
  CK(cudaMalloc(&times, 2 * max_ctas * sizeof(uint64_t)));
  CK(cudaMalloc(&cycles, 2 * max_ctas * sizeof(uint64_t)));
  std::vector<uint64_t> h_times(2 * max_ctas), h_cycles(2 * max_ctas);
  std::vector<int> seq(num_pages), rnd(num_pages);
  std::iota(seq.begin(), seq.end(), 0);
  rnd = seq;
  std::shuffle(rnd.begin(), rnd.end(), std::mt19937(1));
  // L2 mode: the same number of page reads, folded onto 256 distinct pages (18 MB of the H100's 50 MB L2).
  if (l2)
    for (int& r : rnd) r %= 256;
  int* d_rnd = nullptr;
  CK(cudaMalloc(&d_rnd, num_pages * 4));
  CK(cudaMemcpy(d_rnd, rnd.data(), num_pages * 4, cudaMemcpyHostToDevice));
  Args a{};
  make_page_map(&a.map64, base, num_pages, 64);
  make_page_map(&a.map32, base, num_pages, 32);
  a.base = base;
  a.num_pages = num_pages;
  CK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * kPageBytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const char* names[3] = {"tma64", "half", "bulk"};
  struct Config {
    int mode, nbuf, hold, ctas, group = 1;
  };
  // Full 72 KB slots (two fit beside Q) against half-page slots (four in the same bytes, five in 180 KB),
  // with the hold per slot halved for half pages (the same work per token). 128 CTAs: what the scheduler
  // runs for b = 128 uniform requests.
  std::vector<Config> configs;
  if (l2) {
    for (int ctas : {1, 8, 32, 66, sms})
      for (int nbuf : {2, 3}) configs.push_back({0, nbuf, 0, ctas});
    for (int group : {2, 4}) configs.push_back({0, 2, 0, sms / group * group, group});  // whole groups only
    configs.push_back({2, 2, 0, sms});
    configs.push_back({2, 3, 0, 8});
  }
  for (int ctas : {sms, 128}) {
    if (l2) break;
    for (int hold : {0, 3000, 4500, 6000, 7500, 9000}) {
      configs.push_back({0, 2, hold, ctas});
      configs.push_back({1, 4, hold / 2, ctas});
      configs.push_back({1, 5, hold / 2, ctas});
    }
    configs.push_back({2, 2, 0, ctas});
  }
  std::printf("%-6s %4s %6s %4s %5s %9s %8s %9s   CTA durations of the last call, us: %s\n", "copy", "bufs",
              "hold", "ctas", "group", "us", "GB/s", "B/cyc/SM", "min p10 p50 max");
  a.pages = d_rnd;  // pages in random order, as the benchmark's block tables
  for (const Config& c : configs) {
    a.mode = c.mode;
    a.nbuf = c.nbuf;
    a.hold = c.hold;
    const int smem = c.nbuf * (c.mode == 1 ? kPageBytes / 2 : kPageBytes);
    a.group = c.group;
    for (int w = 0; w < 3; ++w) stream_kernel<<<c.ctas, 128, smem>>>(a, sink, times, cycles);
    CK(cudaGetLastError());
    std::vector<float> ts;
    for (int rep = 0; rep < 15; ++rep) {
      CK(cudaEventRecord(e0));
      stream_kernel<<<c.ctas, 128, smem>>>(a, sink, times, cycles);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    const double us = ts[ts.size() / 2] * 1e3;
    CK(cudaMemcpy(h_times.data(), times, 2 * c.ctas * 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h_cycles.data(), cycles, 2 * c.ctas * 8, cudaMemcpyDeviceToHost));
    std::vector<double> dur, rate;
    // The last group may have fewer pages: left out (with a single group, nothing is).
    const int n = c.ctas == c.group ? c.ctas : c.ctas - c.group;
    for (int i = 0; i < n; ++i) {
      dur.push_back((h_times[2 * i + 1] - h_times[2 * i]) * 1e-3);
      rate.push_back(static_cast<double>(h_cycles[2 * i + 1]) / static_cast<double>(h_cycles[2 * i]));
    }
    std::sort(dur.begin(), dur.end());
    std::sort(rate.begin(), rate.end());
    // GB/s counts the bytes the SMs received (a page read by a group of CTAs counts once per CTA).
    std::printf("%-6s %4d %6d %4d %5d %9.1f %8.0f %9.1f   %.1f %.1f %.1f %.1f\n", names[c.mode], c.nbuf,
                c.hold, c.ctas, c.group, us, static_cast<double>(num_pages) * c.group * kPageBytes / us / 1e3,
                rate[rate.size() / 2], dur[0], dur[dur.size() / 10], dur[dur.size() / 2], dur.back());
  }
  return 0;
}
