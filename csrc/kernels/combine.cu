// Split-KV combine: for every request the scheduler split over n > 1 parts, merge the n normalised fp32
// partial outputs O_s (each with its log2-domain LSE l_s) into the final output and natural-log LSE:
//   l = log2(sum_s 2^(l_s - m)) + m,   m = max_s l_s,   out = sum_s 2^(l_s - l) * O_s,   lse = l * ln 2.
// Requests with n == 0 were written directly by the main kernel and are skipped. A row whose pieces are all
// empty (l_s = -inf for every s) gets out 0 and lse +inf; NaN (a request the main kernel flagged as invalid)
// propagates.
//
// One warp per output row (request, kv head, query row); 8 rows per CTA. Each lane owns 16 of the 512
// columns, so a split's row is read with 4 coalesced 16-byte loads per lane.
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

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const DecodeParams p) {
  const int req = blockIdx.x;
  const int n = p.num_splits[req + 1] - p.num_splits[req];
  if (n == 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.y * kCombineWarps + warp;  // in [0, h_kv * q_seq_per_hk)
  if (row >= p.h_kv * p.q_seq_per_hk) return;
  const int h_k = row / p.q_seq_per_hk;
  const int grow = row % p.q_seq_per_hk;
  const int64_t slot0 = p.num_splits[req];
  const int64_t rows_per_slot = static_cast<int64_t>(p.h_kv) * p.q_seq_per_hk;
  const float* lse_acc = p.lse_accum + slot0 * rows_per_slot + row;

  float m = -INFINITY;
  for (int s = lane; s < n; s += 32) m = fmaxf(m, lse_acc[s * rows_per_slot]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  const float m_use = m == -INFINITY ? 0.f : m;  // all pieces empty: avoid (-inf) - (-inf)
  float sum = 0.f;
  for (int s = lane; s < n; s += 32) sum += exp2f(lse_acc[s * rows_per_slot] - m_use);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const bool empty = sum == 0.f;
  const float l = log2f(sum) + m_use;

  float acc[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) acc[c] = 0.f;
  if (!empty) {
    const float* o_acc = p.o_accum + (slot0 * rows_per_slot + row) * kHeadDimV + lane * 16;
    for (int s = 0; s < n; ++s) {
      const float w = exp2f(lse_acc[s * rows_per_slot] - l);
      const float4* src = reinterpret_cast<const float4*>(o_acc + s * rows_per_slot * kHeadDimV);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float4 x = src[v];
        acc[4 * v + 0] += w * x.x;
        acc[4 * v + 1] += w * x.y;
        acc[4 * v + 2] += w * x.z;
        acc[4 * v + 3] += w * x.w;
      }
    }
  }

  const int s_idx = grow / p.q_heads_per_hk;
  const int head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
  using P2 = Pack2<T>;
  typename P2::type packed[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) packed[c] = P2::make(acc[2 * c], acc[2 * c + 1]);
  T* out = static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride + head * p.o_head_stride +
           lane * 16;
  reinterpret_cast<uint4*>(out)[0] = reinterpret_cast<const uint4*>(packed)[0];
  reinterpret_cast<uint4*>(out)[1] = reinterpret_cast<const uint4*>(packed)[1];
  if (lane == 0) {
    p.lse[req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride] =
        empty ? INFINITY : l * 0.69314718055994530942f;
  }
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& params, DType dtype, cudaStream_t stream) {
  const int rows = params.h_kv * params.q_seq_per_hk;
  const dim3 grid(params.b, (rows + kCombineWarps - 1) / kCombineWarps);
  if (dtype == DType::kBF16) {
    combine_kernel<__nv_bfloat16><<<grid, kCombineWarps * 32, 0, stream>>>(params);
  } else {
    combine_kernel<__half><<<grid, kCombineWarps * 32, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace flashmla
