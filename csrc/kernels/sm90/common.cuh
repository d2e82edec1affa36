// Shared pieces of the sm_90a decode main loops (mainloop_serial.cuh, mainloop_seesaw.cuh): tile geometry,
// the wgmma/smem layouts, and small device helpers (cp.async, mbarriers, TMA-free page lookup, P packing).
// Torch-free; everything arrives through DecodeParams (kernels/params.h).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/launch.h"
#include "kernels/smem_opt_in.h"
#include "kernels/sm90/seg_trace.cuh"

namespace flashmla::sm90 {

using namespace cute;

// The kernel's helpers are lambdas over its register state; they must inline (a real call would move the
// accumulators through a stack frame).
#define FMLA_INLINE __attribute__((always_inline))

constexpr int kThreads = 256;
constexpr int kSmemLimit = 227 * 1024;        // dynamic shared memory an sm_90 CTA can opt in to
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
// One arrival on `bar` (release semantics: this thread's earlier shared-memory writes are visible to the
// threads that observe the phase complete).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
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

// How far (log2 domain) a page's row max may exceed the running max before it replaces it. 8: P values stay
// at most 2^8 = 256, which bf16 and fp16 hold (the row sums are fp32), and once the max has settled almost no
// page exceeds it by that much, so the O rescale is skipped on nearly every page (-3 % on the seesaw rows;
// benchmarks/NOTES.md, v10.0). 0 would be the plain running max, which rescales O whenever any row of a warp
// moved its max: several times per page pair in the benchmark's data.
constexpr float kMaxSlackLog2 = 8.f;

// The running row max a page's softmax works against (log2 domain). A page's row max mx replaces the old max
// only when it exceeds it by more than kMaxSlackLog2; otherwise the old max stays, the page's P values may
// reach 2^kMaxSlackLog2, and the rescale factor is exactly 1, so O is not rescaled (the loops skip that when
// a whole warp's factors are 1). Exact in real arithmetic: O and the row sum are kept relative to the same
// max and the epilogue divides one by the other. Also handles the first page (m_old = -inf: -inf - (-inf) is
// NaN, the max stays -inf for a fully masked page) and NaN or +inf logits like fmaxf.
// (mx - m_old, not m_old + slack: for |m_old| >= 2^27 the sum rounds by more than the slack, and P could then
// reach 2^16, past fp16's range.)
__device__ __forceinline__ float next_running_max(float m_old, float mx) {
  return mx - m_old > kMaxSlackLog2 ? mx : m_old;
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

// One 64 x 64 box (columns [col, col + 64) of the 64 tokens of `page`, kv head h_k) of the KV cache into
// smem with TMA (tma_load_4d: the same copy through any 4-D map with these coordinates), completing `bar`'s
// transaction count. evict_first marks the lines evict-first in L2 (a page is read once per CTA pair and
// never again in the call), so that L2 keeps the split partials the main kernel writes and the combine reads
// right after. Where nothing is split the hint only costs: with L2 full of dirty lines, as after any kernel
// that wrote its output (and after the benchmark's L2 flush), hinted copies made the unsplit memory-bound
// rows 3-4 % slower (benchmarks/NOTES.md, v9.5): the serial loop passes evict_first only where the call
// leaves split partials; the seesaw loop, faster with the hint, always does.
__device__ __forceinline__ void tma_load_4d(const CUtensorMap* map, void* dst, uint64_t* bar, int c0, int h_k,
                                            int page, bool evict_first) {
  if (evict_first) {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], "
        "[%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(smem_u32(dst)),
        "l"(map), "r"(c0), "r"(0), "r"(h_k), "r"(page), "r"(smem_u32(bar)), "l"(policy)
        : "memory");
    return;
  }
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(c0), "r"(0), "r"(h_k), "r"(page), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void tma_load_box(const DecodeParams& p, void* dst, uint64_t* bar, int col,
                                             int h_k, int page, bool evict_first) {
  tma_load_4d(&p.tma_k, dst, bar, col, h_k, page, evict_first);
}

// A part's work record (scheduler contract: kernels/params.h), as the main loops read it.
struct PartWork {
  int begin_req;     // first request of the part
  int end_req;       // last request, clamped to b - 1: metadata computed for a larger (padded) batch never
                     // indexes past this one; end_req < begin_req means the part has no work
  int meta_end_req;  // the unclamped last request: the one whose piece ends at end_blk
  int begin_blk, end_blk, begin_split;
  bool invariant;  // batch-invariant schedule: segments end at chunk boundaries (params.h)
};
__device__ __forceinline__ PartWork part_work(const DecodeParams& p, int part) {
  const int* rec = p.meta + part * kMetaSize;
  PartWork pw;
  pw.begin_req = rec[kMetaBeginReq];
  pw.meta_end_req = rec[kMetaEndReq];
  pw.end_req = min(pw.meta_end_req, p.b - 1);
  pw.begin_blk = rec[kMetaBeginBlock];
  pw.end_blk = rec[kMetaEndBlock];
  pw.begin_split = rec[kMetaBeginSplit];
  pw.invariant = (rec[kMetaFlags] & kMetaFlagBatchInvariant) != 0;
  return pw;
}

// One segment of a part, as the main loops see it (scheduler contract: kernels/params.h): a request's blocks
// in the part, or, in a batch-invariant schedule, one chunk of them.
struct RequestWork {
  int seqlen_safe;  // seqlen, or 0 for a request flagged bad (then nothing is read for it)
  int blk_begin;    // first 64-token block of the segment
  int blk_end;      // one past its last
  int range_end;    // one past the request's last block in this part (> blk_end: another chunk follows)
  int split_idx;    // which piece of the request this segment computes
  int n_pieces;     // 0: this segment writes the final output; else the number of fp32 partials
  bool bad;         // negative seqlen, or more pages than block_table has columns: output becomes NaN
};
// The segment of request `req` that starts at block `blk_begin` (the part's begin_blk for its first request,
// else 0 or, batch-invariant, a chunk boundary).
__device__ __forceinline__ RequestWork request_work(const DecodeParams& p, const PartWork& pw, int req,
                                                    int blk_begin) {
  RequestWork w;
  const int seqlen = p.seqlens[req];
  // ceil(seqlen / 64) without forming seqlen + 63, which overflows int32 near INT32_MAX.
  const int pages = seqlen / kPageSize + (seqlen % kPageSize > 0 ? 1 : 0);
  const int nblk = seqlen > 0 ? pages : 1;
  w.bad = seqlen < 0 || pages > p.max_blocks_per_seq;
  w.blk_begin = blk_begin;
  // Compared with the part's unclamped last request: metadata naming a request past the batch must not cut
  // request b - 1 at that other request's block count.
  w.range_end = req == pw.meta_end_req ? pw.end_blk : nblk;
  w.blk_end = w.range_end;
  w.split_idx = req == pw.begin_req ? pw.begin_split : 0;
  if (pw.invariant) {  // the chunk holding blk_begin, as the scheduler cut it (the same rule)
    const int chunk = invariant_chunk_blocks(nblk, p.num_m_blocks * p.h_kv);
    w.split_idx = blk_begin / chunk;
    w.blk_end = min(w.range_end, (w.split_idx + 1) * chunk);
  }
  w.n_pieces = p.num_splits[req + 1] - p.num_splits[req];
  // Metadata planned for other lengths or another head geometry cuts at other boundaries, or counts other
  // pieces: such a request's rows become NaN, written to its own output or its own first partial slot only
  // (never into another request's partials).
  if (pw.invariant) {
    const int chunk = invariant_chunk_blocks(nblk, p.num_m_blocks * p.h_kv);
    const int n_chunks = (nblk + chunk - 1) / chunk;
    const bool aligned = blk_begin % chunk == 0 && (w.range_end == nblk || w.range_end % chunk == 0);
    if (!aligned || w.n_pieces != (n_chunks > 1 ? n_chunks : 0)) {
      w.bad = true;
      w.split_idx = 0;
    }
  }
  w.seqlen_safe = w.bad ? 0 : seqlen;
  return w;
}
// The segment after w (of request req): the next chunk of the same request, or the next request's blocks
// in the part. Returns false after the part's last segment.
__device__ __forceinline__ bool next_segment(const DecodeParams& p, const PartWork& pw, int req,
                                             const RequestWork& w, int& next_req, RequestWork& next_w) {
  if (w.blk_end < w.range_end) {
    next_req = req;
    next_w = request_work(p, pw, req, w.blk_end);
    return true;
  }
  if (req < pw.end_req) {
    next_req = req + 1;
    next_w = request_work(p, pw, req + 1, 0);
    return true;
  }
  return false;
}

// Visible-key limit of a thread's two rows r0 and r0 + 8 (bottom-right causal mask for MTP).
__device__ __forceinline__ void row_limits(const DecodeParams& p, int seqlen_safe, int m_block, int r0,
                                           int (&limit)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int grow = m_block * kBlockM + r0 + 8 * r;
    const int s_idx = grow < p.q_seq_per_hk ? grow / p.q_heads_per_hk : p.s_q - 1;
    limit[r] = seqlen_safe - (p.causal ? (p.s_q - 1 - s_idx) : 0);
  }
}

// Epilogue of one request: this thread's rows r0, r0 + 8 of its warpgroup's 256-column half of O, divided by
// the softmax denominator l (row max m, log2 domain), go to out/lse (the request is not split) or to the fp32
// partials o_accum/lse_accum (it is). `l` and `m` are read by the caller once the rows' statistics are final.
template <typename T, class TensorO>
__device__ __forceinline__ void write_rows(const DecodeParams& p, const TensorO& tOrO, const RequestWork& w,
                                           int req, int h_k, int m_block, int r0, int wg, int quad_col,
                                           int lane, const float (&l_row)[2], const float (&m_row)[2],
                                           bool bad, float out_scale = 1.f) {
  const int64_t slot = static_cast<int64_t>(p.num_splits[req]) + w.split_idx;
  // Metadata and num_splits from different calls could name a slot past the workspace (2 * num_sm_parts
  // pieces): never write there (the combine kernel flags such a request with NaN).
  const bool slot_ok = slot >= 0 && slot < 2 * static_cast<int64_t>(p.num_sm_parts);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + 8 * r;
    const int grow = m_block * kBlockM + row;
    if (grow >= p.q_seq_per_hk) continue;
    const float l = l_row[r];
    const float m = m_row[r];
    // l == 0: no visible key. A NaN l (NaN in q or in visible cache rows) must stay NaN, not become
    // "empty": it propagates to out and lse like the reference's.
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : out_scale / l;  // out_scale: the per-tensor FP8 k_scale, else 1
    const float nan = __int_as_float(0x7fc00000);
    const int col_base = wg * (kHeadDimV / 2) + quad_col;
    if (w.n_pieces == 0) {
      const int s_idx = grow / p.q_heads_per_hk;
      const int head = h_k * p.q_heads_per_hk + grow % p.q_heads_per_hk;
      T* out = static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride +
               head * p.o_head_stride + col_base;
#pragma unroll
      for (int j = 0; j < kHeadDimV / 2 / 8; ++j) {
        const float a = bad ? nan : tOrO(2 * r + 4 * j) * inv;
        const float b = bad ? nan : tOrO(1 + 2 * r + 4 * j) * inv;
        *reinterpret_cast<typename Pack2<T>::type*>(out + 8 * j) = Pack2<T>::make(a, b);
      }
      if (wg == 0 && lane % 4 == 0) {
        p.lse[req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride] =
            bad ? nan : (empty ? INFINITY : (log2f(l) + m) * 0.69314718055994530942f);
      }
    } else if (slot_ok) {
      const int64_t acc_row = (slot * p.h_kv + h_k) * p.q_seq_per_hk + grow;
      float* o_acc = p.o_accum + acc_row * kHeadDimV + col_base;
#pragma unroll
      for (int j = 0; j < kHeadDimV / 2 / 8; ++j) {
        float2 v;
        v.x = bad ? nan : tOrO(2 * r + 4 * j) * inv;
        v.y = bad ? nan : tOrO(1 + 2 * r + 4 * j) * inv;
        *reinterpret_cast<float2*>(o_acc + 8 * j) = v;
      }
      if (wg == 0 && lane % 4 == 0) {
        p.lse_accum[acc_row] = bad ? nan : (empty ? -INFINITY : log2f(l) + m);
      }
    }
  }
}

}  // namespace flashmla::sm90
