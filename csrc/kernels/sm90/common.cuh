// Shared pieces of the sm_90a decode main loops (mainloop_serial.cuh, mainloop_seesaw.cuh): tile geometry,
// the wgmma/smem layouts, and small device helpers (cp.async, mbarriers, TMA-free page lookup, P packing).
// Torch-free; everything arrives through DecodeParams (kernels/params.h).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/launch.h"

namespace flashmla::sm90 {

using namespace cute;

// The kernel's helpers are lambdas over its register state; they must inline (a real call would move the
// accumulators through a stack frame).
#define FMLA_INLINE __attribute__((always_inline))

constexpr int kThreads = 256;
constexpr int kChunksPerRow = kHeadDimK / 8;  // 16-byte chunks per 576-wide row
constexpr int kBoxCols = 64;                  // columns of one TMA box / one 128B-swizzled column tile
constexpr int kBoxElems = kPageSize * kBoxCols;
constexpr int kNumBoxes = kHeadDimK / kBoxCols;  // 9: boxes 0-7 hold V (and K's first 512 columns), 8 RoPE
constexpr int kPBox = kNumBoxes - 1;             // where a page's P goes once its Q K^T is done

template <typename T>
struct Traits {
  // 64 x 576, K-major, 128B swizzle: nine 64x64 column tiles of 8 KB each.
  using SmemLayoutQK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockM>, Int<kHeadDimK>>{}));
  // V^T (512 x 64) viewed on the same bytes as K (64 x 576): element (d, t) is K(t, d).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutQK{}, make_layout(Shape<Int<kHeadDimV>, Int<kPageSize>>{}, Stride<Int<kPageSize>, _1>{})));
  // One 64x64 column tile, the same layout as one box of SmemLayoutQK (so P can live in box 8).
  using SmemLayoutP =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockM>, Int<kPageSize>>{}));
  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kPageSize>, Int<kHeadDimK>>>()));
  // P V with P from smem (the other warpgroup's page) ...
  using MmaPV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHeadDimV / 2>, Int<kPageSize>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
  // ... and from registers (the warpgroup's own page, straight from its softmax).
  using MmaPVrs = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHeadDimV / 2>, Int<kPageSize>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // .cg: cache in L2 only; src_bytes == 0 zero-fills the 16 bytes without reading global memory.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// A CTA barrier that may be reached from different (warpgroup-uniform) branches.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void fence_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Q rows of (req, h_k, m_block) -> sQ; rows past q_seq_per_hk are zero.
template <typename T, class SQ>
__device__ __forceinline__ void load_q(const DecodeParams& p, SQ& sQ, int req, int h_k, int m_block) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kBlockM * kChunksPerRow; i += kThreads) {
    const int r = i / kChunksPerRow, ch = i % kChunksPerRow;
    const int grow = m_block * kBlockM + r;
    void* dst = &sQ(r, ch * 8);
    if (grow < p.q_seq_per_hk) {
      const int s_idx = grow / p.q_heads_per_hk;
      const int head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
      const T* src = q + req * p.q_batch_stride + s_idx * p.q_seq_stride + head * p.q_head_stride + ch * 8;
      cp_async_16(dst, src, 16);
    } else {
      cp_async_16(dst, q, 0);
    }
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// Valid tokens of block `blk` (0..64); 0 for blocks past the end.
__device__ __forceinline__ int block_tokens(int seqlen, int blk) {
  const int v = seqlen - blk * kPageSize;
  return v < 0 ? 0 : (v > kPageSize ? kPageSize : v);
}

// Page id of block `blk`, or -1 when nothing must be read (no valid token, or an id outside the cache; the
// caller flags the latter as a bad request). block_table is read only for blocks holding valid tokens.
__device__ __forceinline__ int block_page(const DecodeParams& p, int req, int blk, int seqlen, bool& bad) {
  if (block_tokens(seqlen, blk) == 0) return -1;
  const int page = p.block_table[req * p.block_table_batch_stride + blk];
  if (page < 0 || page >= p.num_pages) {
    bad = true;
    return -1;
  }
  return page;
}

// 2^x with subnormal results flushed to zero (one MUFU.EX2; -inf -> 0, NaN -> NaN).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Zero the V part (columns 0..511) of rows [valid, 64) of a K buffer, by the 128 threads of one warpgroup.
template <class SK>
__device__ __forceinline__ void zero_v_tail(SK& sK, int valid, int wtid) {
  const uint4 z = make_uint4(0, 0, 0, 0);
  for (int i = valid * (kHeadDimV / 8) + wtid; i < kPageSize * (kHeadDimV / 8); i += 128) {
    const int t = i / (kHeadDimV / 8), ch = i % (kHeadDimV / 8);
    *reinterpret_cast<uint4*>(&sK(t, ch * 8)) = z;
  }
}

template <typename T>
struct Pack2;
template <>
struct Pack2<cutlass::bfloat16_t> {
  using type = __nv_bfloat162;
  static __device__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Pack2<cutlass::half_t> {
  using type = __half2;
  static __device__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};

// The dynamic shared-memory opt-in is a per-device attribute of a kernel function: set it once per device
// and kernel, not on every decode call (it is host work on the latency-critical small-batch path).
template <class Kernel>
cudaError_t configure_smem_once(Kernel kernel, int smem_bytes, std::atomic<bool>* configured,
                                int max_devices) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= max_devices || !configured[device].load(std::memory_order_acquire)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    if (device >= 0 && device < max_devices) configured[device].store(true, std::memory_order_release);
  }
  return cudaSuccess;
}

}  // namespace flashmla::sm90
