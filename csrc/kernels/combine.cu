// Split-KV combine: for every request the scheduler split over n > 1 parts, merge the n normalised fp32
// partial outputs O_s (each with its log2-domain LSE l_s) into the final output and natural-log LSE:
//   l = log2(sum_s 2^(l_s - m)) + m,   m = max_s l_s,   out = sum_s 2^(l_s - l) * O_s,   lse = l * ln 2.
// Requests with n == 0 were written directly by the main kernel and are skipped. A row whose pieces are all
// empty (l_s = -inf for every s) gets out 0 and lse +inf; NaN (a request the main kernel flagged as invalid)
// propagates.
//
// Two grids, chosen on the host from shapes only:
//  * many requests (the usual case): one warp per (output row, 512 / Z columns); 8 rows per CTA; grid
//    (min(b, 2 * num_sm_parts), ceil(rows / 8) capped at 8 CTAs per SM, Z), striding over the requests and
//    the row groups. Each lane owns kVec = 128 / Z consecutive columns (one 16- or 8-byte load per split)
//    and merges the pieces in one online pass, four pieces' loads in flight per round (merge_online). Z = 4
//    normally; Z = 8 (kVec = 2) when the grid would give the GPU fewer than two CTAs per SM: the combine is
//    then latency-bound, and twice the warps keep twice the loads in flight;
//  * few requests, each split into many pieces (that small grid, b * kSplitsGridMinPieces <= num_sm_parts,
//    b * rows <= SMs so that its CTAs fit in one wave at four per SM, and rows <= 65535 for gridDim.y; on
//    132 SMs: b <= 8 at h_q = 16, b = 1 at h_q = 128): combine_splits_kernel, one CTA per (request, row,
//    128 columns) whose eight warps share the pieces (below). At b = 1 a row has 16-130 pieces; one warp
//    walking them took ~25 dependent load round trips (benchmarks/NOTES.md, v7.3).
//
// Launched with programmatic dependent launch (PDL): the grid may start launching while the main kernel is
// still running; every CTA first waits (griddepcontrol.wait) for the main kernel to complete, then reads
// the partials through ld.global.cg (never the read-only .nc path, which the compiler may hoist above the
// wait).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch.h"

namespace flashmla {
namespace {

constexpr int kCombineWarps = 8;
// The eight-warp grid needs at least this many parts per request (b * kSplitsGridMinPieces <= num_sm_parts),
// i.e. requests cut into about that many pieces or more. 8, one piece per warp: with fewer pieces per
// request its CTAs do one round of loads each, and the row grid is faster (with 2, b32 varlen 1024 took the
// eight-warp grid and ran +17 %; benchmarks/NOTES.md, v7.3).
constexpr int kSplitsGridMinPieces = 8;
// The eight-warp grid's CTAs (one per request, row and 128 columns) stay within this many per SM; its build
// for grids past three CTAs per SM is held to 64 registers, so four fit, the other one to 80 (72 used), so
// three do (see launch_combine).
constexpr int kSplitsGridMaxCtasPerSm = 4;
constexpr int kSplitsGridCtasPerSm = 3;

template <typename T>
struct Pack2;
template <>
struct Pack2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Pack2<__half> {
  using type = __half2;
  static __device__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};

// kVec fp32 values loaded at once (float4 or float2) and their elements.
template <int kVec>
struct VecF;
template <>
struct VecF<4> {
  using type = float4;
  static __device__ float get(const float4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
  }
};
template <>
struct VecF<2> {
  using type = float2;
  static __device__ float get(const float2& v, int i) { return i == 0 ? v.x : v.y; }
};

// Stores kVec values (pairs packed to T2) at `out` in one 8- or 4-byte store.
template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* out, const float (&v)[kVec]) {
  using P2 = Pack2<T>;
  typename P2::type packed[kVec / 2];
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) packed[i] = P2::make(v[2 * i], v[2 * i + 1]);
  if constexpr (kVec == 4) {
    *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(packed);
  } else {
    *reinterpret_cast<uint32_t*>(out) = *reinterpret_cast<const uint32_t*>(packed);
  }
}

// One warp's online merge of pieces first, first + step, ... < n into a running max m (log2 domain), sum
// = sum_s 2^(l_s - m) and acc = sum_s 2^(l_s - m) * O_s (kVec columns per lane at o_acc; every lane loads the
// same lse, a broadcast). The lse and O loads of kUnroll pieces are issued before any is used, so a row of up
// to kUnroll pieces per warp costs one load round trip; no separate lse passes. Pieces past n contribute
// exactly nothing (lse -inf, O 0). NaN propagates: fmaxf skips a NaN lse but exp2f does not, so sum and acc
// become NaN; empty pieces (lse -inf) add 0; with nothing but empty pieces m stays -inf and sum 0.
template <int kVec, int kUnroll>
__device__ __forceinline__ void merge_online(const float* lse_acc, int64_t lse_stride, const float* o_acc,
                                             int64_t o_stride, int first, int step, int n, float& m,
                                             float& sum, float (&acc)[kVec]) {
  using V = VecF<kVec>;
  for (int s = first; s < n; s += kUnroll * step) {
    float x[kUnroll][kVec], w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // Initialised, then overwritten under the predicate: the loads stay where they are (a load only used
      // inside a branch can be sunk into it, one round trip per piece).
      w[u] = -INFINITY;
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[u][i] = 0.f;
      const int su = s + u * step;
      if (su < n) {
        const typename V::type v = __ldcg(reinterpret_cast<const typename V::type*>(o_acc + su * o_stride));
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[u][i] = V::get(v, i);
        w[u] = __ldcg(lse_acc + su * lse_stride);
      }
    }
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, w[u]);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing but empty pieces yet
    const float c = exp2f(m - m_use);                      // earlier pieces to the new max
    sum *= c;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] *= c;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float e = exp2f(w[u] - m_use);
      sum += e;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += e * x[u][i];
    }
    m = m_new;
  }
}

// Four pieces per round: enough for the 2-6 pieces of a request in a large batch, and ~64 registers, so
// the one-wave grid keeps four CTAs per SM resident (eight per round would take ~120; with 8-byte lanes
// eight fit in 64, but did not beat four on the narrow grid's b = 2-4, h_q = 128 rows: v8.2).
constexpr int kRowUnroll = 4;

// The end of one row's merge: out = acc / sum (kVec columns at `out`) and, from one lane, the row's
// natural-log LSE; a row with only empty pieces gets 0 and +inf.
template <typename T, int kVec>
__device__ __forceinline__ void finish_row(T* out, float* lse_out, float m, float sum, float (&acc)[kVec],
                                           bool write_lse) {
  const bool empty = sum == 0.f;
  const float inv = empty ? 0.f : 1.f / sum;
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] *= inv;
  const float l = log2f(sum) + (m == -INFINITY ? 0.f : m);
  store_vec<T, kVec>(out, acc);
  if (write_lse) *lse_out = empty ? INFINITY : l * 0.69314718055994530942f;
}

template <typename T, int kVec>
__device__ __forceinline__ void combine_request(const DecodeParams& p, int req, int n, int row_group) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = row_group * kCombineWarps + warp;  // in [0, h_kv * q_seq_per_hk)
  if (row >= p.h_kv * p.q_seq_per_hk) return;        // (warp-uniform; nothing after this synchronises)
  const int col = blockIdx.z * (32 * kVec) + lane * kVec;
  const int h_k = row / p.q_seq_per_hk;
  const int grow = row % p.q_seq_per_hk;
  const int64_t slot0 = p.num_splits[req];
  const int64_t rows_per_slot = static_cast<int64_t>(p.h_kv) * p.q_seq_per_hk;
  const float* lse_acc = p.lse_accum + slot0 * rows_per_slot + row;
  const int s_idx = grow / p.q_heads_per_hk;
  const int head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
  T* out =
      static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride + head * p.o_head_stride + col;
  float* lse_out = p.lse + req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride;
  if (n < 0 || slot0 < 0 || slot0 + n > 2 * static_cast<int64_t>(p.num_sm_parts)) {
    // num_splits does not match the metadata (mixed-up calls): flag the request instead of reading garbage.
    float nan[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) nan[i] = __int_as_float(0x7fc00000);
    store_vec<T, kVec>(out, nan);
    if (lane == 0 && blockIdx.z == 0) *lse_out = nan[0];
    return;
  }

  const float* o_acc = p.o_accum + (slot0 * rows_per_slot + row) * kHeadDimV + col;
  float m = -INFINITY, sum = 0.f, acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
  merge_online<kVec, kRowUnroll>(lse_acc, rows_per_slot, o_acc, rows_per_slot * kHeadDimV, 0, 1, n, m, sum,
                                 acc);
  finish_row<T, kVec>(out, lse_out, m, sum, acc, lane == 0 && blockIdx.z == 0);
}

// num_splits[req] and num_splits[req + 1]: where request req's pieces are, and how many.
struct SplitRange {
  int begin, end;
};
__device__ __forceinline__ SplitRange split_range(const DecodeParams& p, int req) {
  return SplitRange{p.num_splits[req], p.num_splits[req + 1]};
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kCombineWarps * 32, 4) combine_kernel(const DecodeParams p) {
  // Every CTA waits for the main kernel before it may finish: if a CTA with nothing to merge returned
  // first, a grid with no split request could complete while the main kernel still writes `out`, and stream
  // order for the kernels after this one would then rest on the main kernel alone.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  // Grid-stride over requests: the grid has at most 2 * num_sm_parts columns (no more requests can be
  // split), so a large batch costs a short scan of num_splits per CTA, not b CTAs that exit at once.
  // Row groups are strided too (the launcher caps gridDim.y): a batch that the scheduler left unsplit then
  // costs one wave of CTAs that read num_splits and exit, not one CTA per (request, 8 rows, column slice).
  const int row_groups = (p.h_kv * p.q_seq_per_hk + kCombineWarps - 1) / kCombineWarps;
  for (int req = blockIdx.x; req < p.b; req += gridDim.x) {
    const int n = p.num_splits[req + 1] - p.num_splits[req];
    if (n == 0) continue;
    for (int rg = blockIdx.y; rg < row_groups; rg += gridDim.y) combine_request<T, kVec>(p, req, n, rg);
  }
}

// The few-requests grid's CTAs for a batch-invariant schedule: warp 0 merges the row's pieces with the row
// grid's arithmetic (combine_request: the pieces in order, four per round, the same epilogue), so a
// request's result does not depend on which grid its batch's shape picked. The other warps idle.
template <typename T>
__device__ __forceinline__ void combine_splits_in_order(const DecodeParams& p) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  // Through an opaque move: otherwise the compiler shares this index arithmetic with the kernel's other
  // path by computing it before the branch, which keeps it live there and costs that path spills.
  int row;
  asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(row));
  const int h_k = row / p.q_seq_per_hk, grow = row % p.q_seq_per_hk;
  const int s_idx = grow / p.q_heads_per_hk, head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
  const int64_t rows_per_slot = static_cast<int64_t>(p.h_kv) * p.q_seq_per_hk;
  const int col = blockIdx.z * 128 + 4 * lane;
  for (int req = blockIdx.x; req < p.b; req += gridDim.x) {
    const SplitRange sr = split_range(p, req);
    const int n = sr.end - sr.begin;
    if (n == 0) continue;
    const int64_t slot0 = sr.begin;
    T* out = static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride +
             head * p.o_head_stride + col;
    float* lse_out = p.lse + req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride;
    if (n < 0 || slot0 < 0 || slot0 + n > 2 * static_cast<int64_t>(p.num_sm_parts)) {
      float nan[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) nan[i] = __int_as_float(0x7fc00000);
      store_vec<T, 4>(out, nan);
      if (lane == 0 && blockIdx.z == 0) *lse_out = nan[0];
      continue;
    }
    const float* lse_acc = p.lse_accum + slot0 * rows_per_slot + row;
    const float* o_acc = p.o_accum + (slot0 * rows_per_slot + row) * kHeadDimV + col;
    float m = -INFINITY, sum = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    merge_online<4, kRowUnroll>(lse_acc, rows_per_slot, o_acc, rows_per_slot * kHeadDimV, 0, 1, n, m, sum,
                                acc);
    finish_row<T, 4>(out, lse_out, m, sum, acc, lane == 0 && blockIdx.z == 0);
  }
}

// Few-requests grid (one to a few requests, each split over many parts): CTA (request, row, 128-column
// slice). Warp w merges pieces w, w + 8, w + 16, ... in one pass, the lse and the O values of up to eight
// pieces per lane in flight together, keeping its own running max, sum and weighted O (online, as in the main
// kernel's softmax; merge_online); the eight partial merges are then joined through shared memory. A request
// split into ~100 pieces costs about two load round trips, against ~25 when one warp walks all pieces four
// at a time. Same results as combine_request up to fp32 rounding (bitwise the same for a batch-invariant
// schedule, where one warp merges as combine_request does), NaN and empty rows included (a warp with
// only empty pieces has max -inf and sum 0, and weighs 0 in the join).
template <typename T, int kMinCtasPerSm>
__global__ void __launch_bounds__(kCombineWarps * 32, kMinCtasPerSm)
    combine_splits_kernel(const DecodeParams p) {
  constexpr int kUnroll = 8, kCols = 32 * 4;
  __shared__ float4 s_acc[kCombineWarps][32];
  __shared__ float s_max[kCombineWarps], s_sum[kCombineWarps];
  // The first request's num_splits entries may be read before the wait in the regular build: whatever wrote
  // num_splits (get_mla_metadata, or the caller) is stream-ordered before the main kernel, which is launched
  // without PDL and so starts only after it completed; only the partials need the wait, and the tail after
  // the main kernel loses one dependent load (v8.2: b1-b4 h16 -1 to -4 %). The 64-register build waits first:
  // the live values would cost it more spills.
  // The schedule's mode, like num_splits, was written before the main kernel started.
  const bool in_order = (p.meta[kMetaFlags] & kMetaFlagBatchInvariant) != 0;
  SplitRange first{0, 0};
  if constexpr (kMinCtasPerSm == kSplitsGridCtasPerSm) {
    if (static_cast<int>(blockIdx.x) < p.b) first = split_range(p, blockIdx.x);
  }
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // as in combine_kernel
  if (in_order) {
    // Dispatched here, before the shared-piece loop's values are live, so that loop's register allocation
    // (and its 64-register build's spills) stay as they were without this path.
    combine_splits_in_order<T>(p);
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.y;  // in [0, h_kv * q_seq_per_hk)
  const int h_k = row / p.q_seq_per_hk, grow = row % p.q_seq_per_hk;
  const int s_idx = grow / p.q_heads_per_hk, head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
  const int64_t rows_per_slot = static_cast<int64_t>(p.h_kv) * p.q_seq_per_hk;
  const int64_t piece_stride = rows_per_slot * kHeadDimV;
  const int col = blockIdx.z * kCols;
  for (int req = blockIdx.x; req < p.b; req += gridDim.x) {
    const SplitRange sr = kMinCtasPerSm == kSplitsGridCtasPerSm && req == static_cast<int>(blockIdx.x)
                              ? first
                              : split_range(p, req);
    const int n = sr.end - sr.begin;
    if (n == 0) continue;  // (CTA-uniform, as every branch below)
    const int64_t slot0 = sr.begin;
    T* out = static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride +
             head * p.o_head_stride + col;
    float* lse_out = p.lse + req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride;
    // (The row indexing above and this check repeat combine_request's on purpose: a shared helper changed the
    // row grid's generated code and measured +1.5 to +2.6 % on its b = 2-4, h_q = 128 rows; commit 1b4a598,
    // reverted in 7cbf0aa, benchmarks/NOTES.md.)
    if (n < 0 || slot0 < 0 || slot0 + n > 2 * static_cast<int64_t>(p.num_sm_parts)) {
      // num_splits does not match the metadata (mixed-up calls): flag the request instead of reading garbage.
      if (threadIdx.x < kCols / 2) {
        const float nan[2] = {__int_as_float(0x7fc00000), __int_as_float(0x7fc00000)};
        store_vec<T, 2>(out + 2 * threadIdx.x, nan);
      }
      if (threadIdx.x == 0 && blockIdx.z == 0) *lse_out = __int_as_float(0x7fc00000);
      continue;
    }
    const float* lse_acc = p.lse_accum + slot0 * rows_per_slot + row;
    const float* o_acc = p.o_accum + (slot0 * rows_per_slot + row) * kHeadDimV + col + 4 * lane;
    float m = -INFINITY, sum = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    merge_online<4, kUnroll>(lse_acc, rows_per_slot, o_acc, piece_stride, warp, kCombineWarps, n, m, sum,
                             acc);
    s_acc[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    if (lane == 0) {
      s_max[warp] = m;
      s_sum[warp] = sum;
    }
    __syncthreads();
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) m_all = fmaxf(m_all, s_max[w]);
    const float m_use = m_all == -INFINITY ? 0.f : m_all;
    float scale[kCombineWarps], total = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      scale[w] = exp2f(s_max[w] - m_use);
      total += s_sum[w] * scale[w];
    }
    const bool empty = total == 0.f;
    const float inv = empty ? 0.f : 1.f / total;
    if (threadIdx.x < kCols / 2) {  // two adjacent columns per thread: one packed store
      const float* flat = reinterpret_cast<const float*>(s_acc);
      float v[2] = {0.f, 0.f};
#pragma unroll
      for (int w = 0; w < kCombineWarps; ++w) {
        v[0] += flat[w * kCols + 2 * threadIdx.x] * scale[w];
        v[1] += flat[w * kCols + 2 * threadIdx.x + 1] * scale[w];
      }
      v[0] *= inv;
      v[1] *= inv;
      store_vec<T, 2>(out + 2 * threadIdx.x, v);
    }
    if (threadIdx.x == 0 && blockIdx.z == 0) {
      *lse_out = empty ? INFINITY : (log2f(total) + m_use) * 0.69314718055994530942f;
    }
    __syncthreads();  // the shared arrays are rewritten by the next request's round
  }
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& params, DType dtype, cudaStream_t stream) {
  const int rows = params.h_kv * params.q_seq_per_hk;
  cudaLaunchConfig_t config{};
  const int max_split_requests = 2 * params.num_sm_parts;
  const int grid_x = params.b < max_split_requests ? params.b : max_split_requests;
  const int grid_y = (rows + kCombineWarps - 1) / kCombineWarps;
  // The scheduler made num_sm_parts = SMs / (h_kv * m-blocks) parts, so this is the SM count it assumed.
  const int64_t sms = static_cast<int64_t>(params.num_sm_parts) * params.h_kv * params.num_m_blocks;
  const bool narrow = static_cast<int64_t>(grid_x) * grid_y * 4 < 2 * sms;  // see the top of this file
  // The eight-warp grid where the merge of one row is long enough to share among eight warps (one CTA per
  // row, gridDim.y) and its 4 * b * rows CTAs fit in one wave at four per SM. Past one wave the row grid is
  // faster (v8.0, benchmarks/NOTES.md: b4 h128 8192 53.9 -> 44.0 us, b2 h128 1024 25.5 -> 23.0): each splits
  // CTA merges only its few pieces per warp, so a second wave doubles the time of the same loads.
  const int64_t pairs = static_cast<int64_t>(params.b) * rows;
  const bool splits_grid = narrow &&
                           static_cast<int64_t>(params.b) * kSplitsGridMinPieces <= params.num_sm_parts &&
                           pairs * 4 <= kSplitsGridMaxCtasPerSm * sms && rows <= 65535;
  // Its regular build (at most 80 registers, 72 used) holds three CTAs per SM; a grid larger than that takes
  // the 64-register one (8 bytes of spill), which keeps it in one wave (b1 h128 8192 28.9 -> 28.2 us, 1024
  // 21.6 -> 20.4).
  const bool splits_min4 = pairs * 4 > kSplitsGridCtasPerSm * sms;
  const int grid_z = narrow && !splits_grid ? 8 : 4;
  // At most 8 CTAs per SM (about two waves: four CTAs of 256 threads fit per SM at <= 64 registers): b = 128,
  // h_q = 128 would otherwise launch 8,192 CTAs, which cost ~6 us of tail after the main kernel even when no
  // request is split (the CTAs stride over the row groups instead).
  const int64_t wave = 8 * sms, per_y = static_cast<int64_t>(grid_x) * grid_z;
  const int64_t y_cap = (wave + per_y - 1) / per_y;
  config.gridDim = dim3(grid_x, static_cast<unsigned>(grid_y < y_cap ? grid_y : y_cap), grid_z);
  if (splits_grid) config.gridDim = dim3(grid_x, rows, grid_z);
  config.blockDim = dim3(kCombineWarps * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id =
      cudaLaunchAttributeProgrammaticStreamSerialization;  // PDL: overlap with the main kernel's tail
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  if (dtype == DType::kBF16) {
    if (splits_grid && splits_min4) {
      return cudaLaunchKernelEx(&config, combine_splits_kernel<__nv_bfloat16, kSplitsGridMaxCtasPerSm>,
                                params);
    }
    if (splits_grid) {
      return cudaLaunchKernelEx(&config, combine_splits_kernel<__nv_bfloat16, kSplitsGridCtasPerSm>, params);
    }
    return narrow ? cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16, 2>, params)
                  : cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16, 4>, params);
  }
  if (splits_grid && splits_min4) {
    return cudaLaunchKernelEx(&config, combine_splits_kernel<__half, kSplitsGridMaxCtasPerSm>, params);
  }
  if (splits_grid) {
    return cudaLaunchKernelEx(&config, combine_splits_kernel<__half, kSplitsGridCtasPerSm>, params);
  }
  return narrow ? cudaLaunchKernelEx(&config, combine_kernel<__half, 2>, params)
                : cudaLaunchKernelEx(&config, combine_kernel<__half, 4>, params);
}

}  // namespace flashmla
