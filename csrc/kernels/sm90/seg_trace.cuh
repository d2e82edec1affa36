// Diagnostic only (built with -DFMLA_TRACE, never in a release build): a per-CTA timeline of each request
// segment of the main loops, to see where a call's time goes between the page loop and the fixed costs
// (prologue, first Q K^T, epilogue) and how the CTAs finish (imbalance). lab/trace/segment_trace.py reads
// it.
//
// Record of CTA c (linear block index): [0] globaltimer at entry, [1] globaltimer at exit, [2] SM id,
// [3] segments seen, then per segment s < kTraceSegs: clock64 at each stamp kStamp* and the segment's block
// count. Stamps are taken by thread 0 only (warpgroup 0); a stamp right after a barrier may read early
// (ptxas can hoist the clock read), so phases are read as differences of consecutive stamps.
#pragma once

#ifdef FMLA_TRACE
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace flashmla::sm90 {

enum TraceStamp : int {
  kStampSegStart = 0,  // top of the request loop
  kStampReady = 1,     // Q loaded, first pages issued (after the prologue barrier)
  kStampFirstS = 2,    // warpgroup 0's first Q K^T done
  kStampLoopEnd = 3,   // warpgroup 0 left the page loop
  kStampJoined = 4,    // both warpgroups left it (after the CTA barrier)
  kStampSegEnd = 5,    // epilogue written (this thread's stores issued)
  kTraceStamps = 7,    // + [6] = block count of the segment
};
constexpr int kTraceSegs = 8;
constexpr int kTraceHeader = 4;
constexpr int kTraceWords = kTraceHeader + kTraceSegs * kTraceStamps;
constexpr int kTraceCtas = 1024;
__device__ unsigned long long g_seg_trace[kTraceCtas][kTraceWords];

__device__ __forceinline__ int trace_cta() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
__device__ __forceinline__ unsigned long long trace_gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}
__device__ __forceinline__ unsigned long long trace_clock() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(t)::"memory");
  return t;
}
__device__ __forceinline__ void trace_entry() {
  if (threadIdx.x == 0 && trace_cta() < kTraceCtas) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    g_seg_trace[trace_cta()][0] = trace_gtime();
    g_seg_trace[trace_cta()][2] = smid;
    g_seg_trace[trace_cta()][3] = 0;
  }
}
__device__ __forceinline__ void trace_exit() {
  if (threadIdx.x == 0 && trace_cta() < kTraceCtas) g_seg_trace[trace_cta()][1] = trace_gtime();
}
__device__ __forceinline__ void trace_stamp(int seg, int stamp, int nblk = -1) {
  if (threadIdx.x == 0 && trace_cta() < kTraceCtas && seg < kTraceSegs) {
    unsigned long long* r = g_seg_trace[trace_cta()] + kTraceHeader + seg * kTraceStamps;
    r[stamp] = trace_clock();
    if (nblk >= 0) r[kTraceStamps - 1] = nblk;
    if (stamp == kStampSegEnd) g_seg_trace[trace_cta()][3] = seg + 1;
  }
}

// Finer: per page pair of the seesaw loop, clock64 at kPairStamps points of each warpgroup (thread 0 of the
// warpgroup; mainloop_seesaw.cuh says which point is which), for the first kPairTraceMax pairs of each CTA.
// The store is predicated inside one asm block, not a C++ branch: a branch while wgmmas are in flight would
// make ptxas serialise them (C7515) and change what is measured. The clock read has no register inputs, so
// ptxas may move it above a preceding wgmma wait or bar.sync (a stamp there reads early); a stamp after an
// mbarrier spin loop cannot move above the loop.
constexpr int kPairStamps = 10;
constexpr int kPairTraceMax = 24;
__device__ unsigned long long g_pair_trace[kTraceCtas][2][kPairTraceMax][kPairStamps];
__device__ __forceinline__ void pair_stamp(int wg, int wtid, int pair, int k) {
  const int cta = trace_cta();
  const bool on = wtid == 0 && cta < kTraceCtas && pair < kPairTraceMax;
  unsigned long long* a = &g_pair_trace[on ? cta : 0][wg][on ? pair : 0][k];
  asm volatile(
      "{\n .reg .pred p;\n .reg .u64 t;\n mov.u64 t, %%clock64;\n setp.ne.u32 p, %1, 0;\n"
      " @p st.global.u64 [%0], t;\n}\n" ::"l"(a),
      "r"(on ? 1u : 0u)
      : "memory");
}

// After a launch, with FMLA_TRACE_OUT set: wait for the kernel (a host sync: diagnostic builds only) and
// append "grid x y z, then the records" to that file as text.
inline void trace_dump(dim3 grid, cudaStream_t stream, const char* kernel) {
  const char* path = std::getenv("FMLA_TRACE_OUT");
  if (path == nullptr) return;
  cudaStreamSynchronize(stream);
  const int n = static_cast<int>(grid.x * grid.y * grid.z);
  std::vector<unsigned long long> buf(static_cast<size_t>(kTraceCtas) * kTraceWords);
  cudaMemcpyFromSymbol(buf.data(), g_seg_trace, buf.size() * sizeof(buf[0]));
  FILE* f = std::fopen(path, "a");
  if (f == nullptr) return;
  std::fprintf(f, "launch %s %u %u %u\n", kernel, grid.x, grid.y, grid.z);
  for (int c = 0; c < n && c < kTraceCtas; ++c) {
    for (int i = 0; i < kTraceWords; ++i)
      std::fprintf(f, "%llu ", buf[static_cast<size_t>(c) * kTraceWords + i]);
    std::fprintf(f, "\n");
  }
  // Then the pair stamps: one line per (CTA, warpgroup, pair).
  std::vector<unsigned long long> pb(static_cast<size_t>(kTraceCtas) * 2 * kPairTraceMax * kPairStamps);
  cudaMemcpyFromSymbol(pb.data(), g_pair_trace, pb.size() * sizeof(pb[0]));
  std::fprintf(f, "pairs %s\n", kernel);
  for (int c = 0; c < n && c < kTraceCtas; ++c) {
    for (int g = 0; g < 2; ++g) {
      for (int q = 0; q < kPairTraceMax; ++q) {
        const unsigned long long* r =
            pb.data() + ((static_cast<size_t>(c) * 2 + g) * kPairTraceMax + q) * kPairStamps;
        if (r[0] == 0) continue;
        std::fprintf(f, "%d %d %d", c, g, q);
        for (int i = 0; i < kPairStamps; ++i) std::fprintf(f, " %llu", r[i]);
        std::fprintf(f, "\n");
      }
    }
  }
  std::fclose(f);
}

}  // namespace flashmla::sm90
#define FMLA_TRACE_ENTRY() ::flashmla::sm90::trace_entry()
#define FMLA_TRACE_EXIT() ::flashmla::sm90::trace_exit()
#define FMLA_TRACE_STAMP(...) ::flashmla::sm90::trace_stamp(__VA_ARGS__)
#define FMLA_PAIR_DECL() int fmla_pair_idx = 0
#define FMLA_PAIR_STAMP(k) ::flashmla::sm90::pair_stamp(wg, wtid, fmla_pair_idx, k)
#define FMLA_PAIR_NEXT() (++fmla_pair_idx)
#else
#define FMLA_TRACE_ENTRY() ((void)0)
#define FMLA_TRACE_EXIT() ((void)0)
#define FMLA_TRACE_STAMP(...) ((void)0)
#define FMLA_PAIR_DECL() ((void)0)
#define FMLA_PAIR_STAMP(k) ((void)0)
#define FMLA_PAIR_NEXT() ((void)0)
#endif
