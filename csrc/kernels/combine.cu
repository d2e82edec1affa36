// Split-KV combine: for every request the scheduler split over n > 1 parts, merge the n normalised fp32
// partial outputs O_s (each with its log2-domain LSE l_s) into the final output and natural-log LSE:
//   l = log2(sum_s 2^(l_s - m)) + m,   m = max_s l_s,   out = sum_s 2^(l_s - l) * O_s,   lse = l * ln 2.
// Requests with n == 0 were written directly by the main kernel and are skipped. A row whose pieces are all
// empty (l_s = -inf for every s) gets out 0 and lse +inf; NaN (a request the main kernel flagged as invalid)
// propagates.
//
// Two layouts of the same merge (combine_kernel below), both striding over the requests with grid.x =
// min(b, 2 * num_sm_parts):
//   * wide, for batches with enough split requests to fill the GPU: CTA = 8 rows of a request, warp = one
//     row and all 512 columns (16 per lane), pieces loaded two at a time. The previous layout (4 CTAs per 8
//     rows, 4 columns per lane) took 8 waves of tiny CTAs at b = 128, h_q = 128: ~23 us after the main
//     kernel against ~1 us for FlashMLA's combine (benchmarks/kernel_breakdown.py);
//   * split, when the wide grid would have fewer CTAs than SMs (one to a few requests, each split over
//     every part): CTA = one row and 256 columns, the 8 warps take every 8th piece and add their sums
//     through smem, so the loads of all pieces are in flight together instead of n / 4 dependent rounds.
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

// Stores kN consecutive values (pairs packed to T2) at `out` in 8-byte stores.
template <typename T, int kN>
__device__ __forceinline__ void store_vals(T* out, const float* v) {
  using P2 = Pack2<T>;
#pragma unroll
  for (int i = 0; i < kN; i += 4) {
    typename P2::type packed[2] = {P2::make(v[i], v[i + 1]), P2::make(v[i + 2], v[i + 3])};
    *reinterpret_cast<uint2*>(out + i) = *reinterpret_cast<const uint2*>(packed);
  }
}

// kCols: columns per lane (a warp covers 32 * kCols of the 512; gridDim.z = 512 / (32 * kCols)).
// kSplit == false ("wide", many requests): CTA = 8 rows of a request, warp = one row, each warp walks every
//   piece of its row; 16 columns per lane, so one CTA covers the whole row and a large batch needs few CTAs
//   (the combine is then one or two waves of short CTAs instead of many waves of tiny ones).
// kSplit == true (few requests, each split over many parts): CTA = one row, the 8 warps take every 8th piece
//   and their sums are added through smem, so the loads of all pieces are in flight at once instead of a
//   chain of n / 4 dependent rounds.
template <typename T, int kCols, bool kSplit>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const DecodeParams p) {
  // Every CTA waits for the main kernel before it may finish: if a CTA with nothing to merge returned
  // first, a grid with no split request could complete while the main kernel still writes `out`, and stream
  // order for the kernels after this one would then rest on the main kernel alone.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  constexpr int kF4 = kCols / 4;           // float4 loads per lane and piece
  constexpr int kUnroll = kSplit ? 4 : 2;  // pieces loaded before they are summed (8 float4 in flight)
  __shared__ float4 red[kSplit ? kCombineWarps : 1][kSplit ? 32 * kF4 : 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = p.h_kv * p.q_seq_per_hk;
  const int row = kSplit ? static_cast<int>(blockIdx.y) : static_cast<int>(blockIdx.y) * kCombineWarps + warp;
  if (row >= rows) return;  // (never with kSplit, whose grid has exactly `rows` rows; warp-uniform otherwise)
  const int col_base = blockIdx.z * (32 * kCols);
  const int col = col_base + lane * kCols;
  const int h_k = row / p.q_seq_per_hk;
  const int grow = row % p.q_seq_per_hk;
  const int s_idx = grow / p.q_heads_per_hk;
  const int head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
  const int64_t rows_per_slot = rows;
  const int64_t piece_stride = rows_per_slot * kHeadDimV;
  const int s_first = kSplit ? warp : 0;
  constexpr int kStep = kSplit ? kCombineWarps : 1;

  // Grid-stride over requests: the grid has at most 2 * num_sm_parts columns (no more requests can be
  // split), so a large batch costs a short scan of num_splits per CTA, not b CTAs that exit at once. Every
  // condition below that skips a request is CTA-uniform (the kSplit path synchronises the CTA).
  for (int req = blockIdx.x; req < p.b; req += gridDim.x) {
    const int n = p.num_splits[req + 1] - p.num_splits[req];
    if (n == 0) continue;  // written directly by the main kernel
    const int64_t slot0 = p.num_splits[req];
    T* out =
        static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride + head * p.o_head_stride;
    float* lse_out = p.lse + req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride;
    if (n < 0 || slot0 < 0 || slot0 + n > 2 * static_cast<int64_t>(p.num_sm_parts)) {
      // num_splits does not match the metadata (mixed-up calls): flag the request instead of reading garbage.
      float nan[kCols];
#pragma unroll
      for (int i = 0; i < kCols; ++i) nan[i] = __int_as_float(0x7fc00000);
      if (!kSplit || warp == 0) {
        store_vals<T, kCols>(out + col, nan);
        if (lane == 0 && blockIdx.z == 0) *lse_out = nan[0];
      }
      continue;
    }

    // The row's LSE over all pieces (every warp computes it; n <= 2 * num_sm_parts loads, spread over lanes).
    const float* lse_acc = p.lse_accum + slot0 * rows_per_slot + row;
    float m = -INFINITY;
    for (int s = lane; s < n; s += 32) m = fmaxf(m, __ldcg(lse_acc + s * rows_per_slot));
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float m_use = m == -INFINITY ? 0.f : m;  // all pieces empty: avoid (-inf) - (-inf)
    float sum = 0.f;
    for (int s = lane; s < n; s += 32) sum += exp2f(__ldcg(lse_acc + s * rows_per_slot) - m_use);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const bool empty = sum == 0.f;
    const float l = log2f(sum) + m_use;

    float acc[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) acc[i] = 0.f;
    if (!empty) {
      const float* o_acc = p.o_accum + (slot0 * rows_per_slot + row) * kHeadDimV + col;
      auto add = [&](const float4(&x)[kF4], float w) {
#pragma unroll
        for (int f = 0; f < kF4; ++f) {
          acc[4 * f] += w * x[f].x;
          acc[4 * f + 1] += w * x[f].y;
          acc[4 * f + 2] += w * x[f].z;
          acc[4 * f + 3] += w * x[f].w;
        }
      };
      int s = s_first;
      for (; s + (kUnroll - 1) * kStep < n; s += kUnroll * kStep) {
        float4 x[kUnroll][kF4];
        float w[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const float4* src = reinterpret_cast<const float4*>(o_acc + (s + u * kStep) * piece_stride);
#pragma unroll
          for (int f = 0; f < kF4; ++f) x[u][f] = __ldcg(src + f);
          w[u] = __ldcg(lse_acc + (s + u * kStep) * rows_per_slot);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) add(x[u], exp2f(w[u] - l));
      }
      for (; s < n; s += kStep) {
        float4 x[kF4];
        const float4* src = reinterpret_cast<const float4*>(o_acc + s * piece_stride);
#pragma unroll
        for (int f = 0; f < kF4; ++f) x[f] = __ldcg(src + f);
        add(x, exp2f(__ldcg(lse_acc + s * rows_per_slot) - l));
      }
    }

    if constexpr (kSplit) {
#pragma unroll
      for (int f = 0; f < kF4; ++f) {
        red[warp][lane * kF4 + f] = make_float4(acc[4 * f], acc[4 * f + 1], acc[4 * f + 2], acc[4 * f + 3]);
      }
      __syncthreads();
      if (threadIdx.x < 32 * kF4) {
        float4 t = red[0][threadIdx.x];
#pragma unroll
        for (int w = 1; w < kCombineWarps; ++w) {
          const float4 u = red[w][threadIdx.x];
          t.x += u.x;
          t.y += u.y;
          t.z += u.z;
          t.w += u.w;
        }
        const float v[4] = {t.x, t.y, t.z, t.w};
        store_vals<T, 4>(out + col_base + 4 * threadIdx.x, v);
      }
      __syncthreads();  // `red` is reused by the next request
    } else {
      store_vals<T, kCols>(out + col, acc);
    }
    if (lane == 0 && blockIdx.z == 0 && (!kSplit || warp == 0)) {
      *lse_out = empty ? INFINITY : l * 0.69314718055994530942f;
    }
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
  // Wide (CTA = 8 rows, warp = row) unless that gives fewer CTAs than SMs; then split (CTA = one row and half
  // the columns, the warps share the pieces). See combine_kernel.
  const bool split = static_cast<int64_t>(grid_x) * grid_y < sms;
  config.gridDim = split ? dim3(grid_x, rows, 2) : dim3(grid_x, grid_y, 1);
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
    return split ? cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16, 8, true>, params)
                 : cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16, 16, false>, params);
  }
  return split ? cudaLaunchKernelEx(&config, combine_kernel<__half, 8, true>, params)
               : cudaLaunchKernelEx(&config, combine_kernel<__half, 16, false>, params);
}

}  // namespace flashmla
