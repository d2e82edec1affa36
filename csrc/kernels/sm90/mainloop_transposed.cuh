// FP8 KV-cache decode main kernel for Hopper (sm_90a) with the tokens as the wgmma M dimension, for the
// memory-bound shapes: at most 32 query rows per kv head (h_q * s_q / h_kv <= 32).
//
// Why transposed. The 64-row kernels (mainloop_serial.cuh) multiply a 64-row Q tile even when 16 of its rows
// are real: ~1.2 us of tensor time per page, close to the ~1.5 us an FP8 page takes to arrive at a full
// SM's share of HBM bandwidth, so with the dequantisation on the same chain the FP8 kernel was no faster
// than the bf16 one (benchmarks/NOTES.md, "FP8 KV cache"). Here the page's 64 tokens are the M dimension:
//   S^T [64 tokens x N] = K Q^T     wgmma m64nNk16, A = the dequantised page (K-major), B = Q (K-major);
//   O^T [512 x N]      += V^T P^T   wgmma m64nNk16, A = V^T, an MN-major view of the same page,
//                                   B = P [N x 64 tokens] (K-major), written by the softmax;
// with N = 16 or 32 (the real rows, padded to 16), the tensor work is N/64 of the 64-row tile's, and Q needs
// N x 576 instead of 64 x 576 values of shared memory: the room goes to a ring of FP8 staging pages, so that
// two or three pages are in flight while one is dequantised and multiplied.
//
// Per page (one CTA per SM, 256 threads = 2 warpgroups):
//   1. both warpgroups dequantise the landed FP8 page from its staging slot into the 16-bit, 128B-swizzled
//      page tile (the layout the dense kernels' TMA writes): warpgroup 0 columns 0..255, warpgroup 1 columns
//      256..575. Each warpgroup's P V reads only its own 256 columns, so a warpgroup may start overwriting
//      them as soon as its own P V of the previous page completed: no CTA barrier between P V and this step;
//   2. barrier; thread 128 refills the freed staging slot with the next page of the part (the producer walks
//      the same segment sequence as the consumers, across requests, so the ring stays full at request
//      boundaries);
//   3. warpgroup 0: S^T = K Q^T and the online softmax. A query is a column of S^T, spread over the four
//      warps: its max needs one exchange through shared memory per page; its sum is kept per thread (every
//      thread rescales its partial sums by the column's factor) and reduced once per segment;
//   4. barrier (P and the per-column rescale factors published); both warpgroups rescale and accumulate
//      their 256 rows of O^T.
// The chain per page is short (~0.6 us estimated against ~1.5 us of HBM time), so the kernel is bound by how
// many bytes the staging ring keeps in flight.
//
// Correctness rules (as mainloop_serial.cuh; docs/architecture.md): rows of the page past seqlen are written
// as zeros by the dequantisation (never read from the staging slot), logits are masked by index, a request
// with a bad seqlen or page id writes NaN into its own output only, smem written by ordinary stores and read
// by wgmma is fenced (fence.proxy.async) before the barrier that publishes it.
#pragma once

#include "kernels/sm90/common.cuh"
#include "kernels/sm90/dequant_fp8.cuh"

namespace flashmla::sm90 {

// One staging slot: the FP8 values as four 128-column byte boxes (box j = columns 128 j .. 128 j + 127, 128
// bytes per token row), then per-tensor: the 64 e4m3 RoPE values (a 64-column box); V3.2: the bf16 RoPE
// values (one 64 x 64 box, 128B swizzle, the dense tile layout) and the four float32 scales per token.
template <int kFmt>
constexpr int staging_slot_bytes() {
  return kFmt == kKvFp8Tensor ? 4 * kFp8BoxBytes + kPageSize * 64
                              : 4 * kFp8BoxBytes + kTileBytes + kV32ScaleBytes;
}
constexpr int kStageRopeOffset = 4 * kFp8BoxBytes;                // 1024-aligned (the V3.2 box is swizzled)
constexpr int kStageScaleOffset = 4 * kFp8BoxBytes + kTileBytes;  // V3.2 only

template <typename T, int kN>
struct TransposedTraits {
  // The dequantised page, 64 tokens x 576, K-major, 128B swizzle (as Traits<T>::SmemLayoutQK).
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kPageSize>, Int<kHeadDimK>>{}));
  // V^T (512 x 64) on the same bytes: element (d, t) is K(t, d); an MN-major A operand.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDimV>, Int<kPageSize>>{}, Stride<Int<kPageSize>, _1>{})));
  // Q, kN rows x 576, K-major (the B operand of S^T = K Q^T).
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<kHeadDimK>>{}));
  // P, kN query rows x 64 tokens, K-major (the B operand of O^T = V^T P^T).
  using SmemLayoutP =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<kPageSize>>{}));
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kPageSize>, Int<kN>, Int<kHeadDimK>>>()));
  using MmaO = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kPageSize>, Int<kN>, Int<kPageSize>>, GMMA::Major::MN,
                           GMMA::Major::K>()));
};

template <typename T, int kFmt, int kN, int kSlots>
struct alignas(1024) TransposedStorage {
  alignas(1024) T k[kPageSize * kHeadDimK];  // the dequantised page
  alignas(1024) T q[kN * kHeadDimK];
  alignas(1024) T p[kN * kPageSize];
  alignas(1024) char stage[kSlots][staging_slot_bytes<kFmt>()];
  float red[4][kN];       // per-warp column maxima of the current page (warpgroup 0)
  float scale[kN];        // per-column O rescale factor of the current page
  float row_max[kN];      // final running max per query row (log2 domain)
  float row_sum[4][kN];   // per-warp partial softmax denominators, at the end of a segment
  int slot_page[kSlots];  // page id the producer put in a slot: -1 nothing to read, -2 an invalid id
  uint64_t full[kSlots];  // completes when a slot's page has landed
};

// As many staging slots as fit (at most four).
template <typename T, int kFmt, int kN>
constexpr int transposed_slots() {
  if constexpr (sizeof(TransposedStorage<T, kFmt, kN, 4>) <= kSmemLimit) return 4;
  if constexpr (sizeof(TransposedStorage<T, kFmt, kN, 3>) <= kSmemLimit) return 3;
  return 2;
}
// The storage of one instantiation of the kernel, with as many slots as fit.
template <typename T, int kFmt, int kN>
using TransposedStorageFor = TransposedStorage<T, kFmt, kN, transposed_slots<T, kFmt, kN>()>;

// The producer thread: the TMA copies of one FP8 page into a staging slot, completing on `bar`; for page < 0
// only the barrier's phase is completed (the consumers then read nothing from the slot).
template <int kFmt>
__device__ __forceinline__ void issue_stage(const DecodeParams& p, char* slot, uint64_t* bar, int h_k,
                                            int page, bool evict_first) {
  if (page < 0) {
    mbar_arrive(bar);
    return;
  }
  mbar_arrive_expect_tx(bar, staging_slot_bytes<kFmt>());
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    tma_load_4d(&p.tma_k, slot + j * kFp8BoxBytes, bar, j * kFp8BoxCols, h_k, page, evict_first);
  }
  tma_load_4d(&p.tma_rope, slot + kStageRopeOffset, bar, 0, h_k, page, evict_first);
  if constexpr (kFmt == kKvFp8V32) {
    tma_load_4d(&p.tma_scale, slot + kStageScaleOffset, bar, 0, h_k, page, evict_first);
  }
}

// 16 converted values (two 16-byte chunks) to row t of column tile `tile` at 16-byte chunks ch and ch + 1,
// swizzled like TMA's 128B mode (chunk ^ t % 8). `odd_first` stores the second chunk first: the eight lanes
// of a row then cover all eight chunks in each store, with no bank conflict.
__device__ __forceinline__ void store_chunk_pair(char* page_tile, int tile, int t, int ch, const uint4& o0,
                                                 const uint4& o1, bool odd_first) {
  char* row = page_tile + tile * kTileBytes + t * 128;
  const int sw = t % 8;
  if (odd_first) {
    *reinterpret_cast<uint4*>(row + (((ch + 1) ^ sw) * 16)) = o1;
    *reinterpret_cast<uint4*>(row + ((ch ^ sw) * 16)) = o0;
  } else {
    *reinterpret_cast<uint4*>(row + ((ch ^ sw) * 16)) = o0;
    *reinterpret_cast<uint4*>(row + (((ch + 1) ^ sw) * 16)) = o1;
  }
}

// One warpgroup (wtid 0..127) dequantises its columns of the page in staging slot `slot` into the page tile:
// warpgroup 0 FP8 boxes 0 and 1 (columns 0..255), warpgroup 1 boxes 2 and 3 and the RoPE columns. Token rows
// >= valid are written as zeros. All of a thread's loads are issued before its first conversion (the
// dequantisation is on the page's critical chain: its latency counts, not only its instructions).
template <typename T, int kFmt>
__device__ __forceinline__ void dequant_stage(const char* slot, char* page_tile, int wg, int wtid,
                                              int valid) {
  const int c = wtid % 8;   // 16-byte chunk (16 values) of a token's 128-byte box row
  const int t0 = wtid / 8;  // token row of the first pass; passes step by 16 rows
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int box = 2 * wg + i / 4, t = t0 + 16 * (i % 4);
    v[i] = t < valid ? *reinterpret_cast<const uint4*>(slot + box * kFp8BoxBytes + t * 128 + c * 16) : zero;
  }
  [[maybe_unused]] const float* scales = reinterpret_cast<const float*>(slot + kStageScaleOffset);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int box = 2 * wg + i / 4, t = t0 + 16 * (i % 4);
    __nv_bfloat162 scale = __floats2bfloat162_rn(1.f, 1.f);
    if constexpr (kFmt == kKvFp8V32) {
      const float s = t < valid ? scales[t * 4 + box] : 1.f;
      scale = __floats2bfloat162_rn(s, s);
    }
    uint4 o0 = zero, o1 = zero;
    if (t < valid) convert16<T, kFmt == kKvFp8V32>(v[i], scale, o0, o1);
    store_chunk_pair(page_tile, 2 * box + c / 4, t, 2 * (c % 4), o0, o1, c >= 4);
  }
  if (wg == 0) return;
  // The RoPE columns 512..575 (column tile 8).
  if constexpr (kFmt == kKvFp8Tensor) {
    // 64 e4m3 values per token, 64 bytes: four chunks of 16 per token, 16 rows per pass of 64 threads.
    const int cr = wtid % 4, tr = wtid / 4;  // tr 0..31
    uint4 r[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int t = tr + 32 * i;
      r[i] = t < valid ? *reinterpret_cast<const uint4*>(slot + kStageRopeOffset + t * 64 + cr * 16) : zero;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int t = tr + 32 * i;
      uint4 o0 = zero, o1 = zero;
      if (t < valid) convert16<T, false>(r[i], __floats2bfloat162_rn(1.f, 1.f), o0, o1);
      store_chunk_pair(page_tile, kPBox, t, 2 * cr, o0, o1, false);
    }
  } else {
    // bf16 already, swizzled as the tile wants it: a plain copy of the 8 KB box (512 chunks, 4 per thread),
    // zero rows past `valid`.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int chunk = wtid + 128 * i, t = chunk / 8;
      const uint4 x =
          t < valid ? *reinterpret_cast<const uint4*>(slot + kStageRopeOffset + chunk * 16) : zero;
      *reinterpret_cast<uint4*>(page_tile + kPBox * kTileBytes + chunk * 16) = x;
    }
  }
}

// kN: query rows per kv head, padded (16 or 32). T: q's dtype, the dtype of the dequantised page and of every
// wgmma.
template <typename T, int kFmt, int kN>
__global__ void __launch_bounds__(kThreads, 1)
    decode_transposed_kernel(const __grid_constant__ DecodeParams p) {
  static_assert(kFmt != kKvNative, "the transposed kernel reads FP8 caches");
  static_assert(kFmt != kKvFp8V32 || std::is_same_v<T, cutlass::bfloat16_t>, "V3.2 FP8 takes bf16 q only");
  static_assert(kN == 16 || kN == 32, "16 or 32 query rows per kv head");
  constexpr int kSlots = transposed_slots<T, kFmt, kN>();
  using Tr = TransposedTraits<T, kN>;
  using Storage = TransposedStorageFor<T, kFmt, kN>;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);

  const int h_k = blockIdx.y, part = blockIdx.z;  // blockIdx.x is 0: all query rows fit one tile
  const PartWork pw = part_work(p, part);
  // Let the combine kernel (launched with PDL) start launching; it waits for this grid before reading.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  if (pw.end_req < pw.begin_req) return;

  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);  // warp-uniform (see mainloop_serial.cuh)
  const int wtid = threadIdx.x % 128;
  const int warp = wtid / 32;
  const int lane = threadIdx.x % 32;
  const int quad_col = 2 * (lane % 4);
  // Accumulator layout (m64nNk16, checked against CuTe's partition_C): value c + 2 rr + 4 j of a thread is
  // (M row r0 + 8 rr, N column 8 j + quad_col + c). Rows are tokens (S^T) or V columns (O^T), columns are
  // query rows.
  const int r0 = warp * 16 + lane / 4;
  const bool evict_first = p.num_splits[p.b] > 0;  // as mainloop_serial.cuh

  float scale_log2 = p.scale_log2, out_scale = 1.f;
  if constexpr (kFmt == kKvFp8Tensor) {
    out_scale = *p.k_scale;
    scale_log2 *= out_scale;
  }

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) mbar_init(&smem.full[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_k) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_rope) : "memory");
    if constexpr (kFmt == kKvFp8V32)
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_scale) : "memory");
  }
  __syncthreads();

  // ---- producer: thread 128 (warpgroup 1, idle while warpgroup 0 runs S^T and the softmax, so the
  // dependent block_table load is off the page's chain) issues the part's pages in consumption order, across
  // segments.
  const bool producer = threadIdx.x == 128;
  int prod_req = pw.begin_req, prod_blk = 0, prod_count = 0;
  bool prod_done = false;
  RequestWork prod_w{};
  if (producer) {
    prod_w = request_work(p, pw, pw.begin_req, pw.begin_blk);
    prod_blk = prod_w.blk_begin;
  }
  auto produce = [&]() {
    if (prod_done) return;
    while (prod_blk >= prod_w.blk_end) {  // segments without pages are skipped, as the consumers do
      int next_req = prod_req;
      RequestWork next_w = prod_w;
      if (!next_segment(p, pw, prod_req, prod_w, next_req, next_w)) {
        prod_done = true;
        return;
      }
      prod_req = next_req;
      prod_w = next_w;
      prod_blk = prod_w.blk_begin;
    }
    bool bad = false;
    const int page = block_page(p, prod_req, prod_blk, prod_w.seqlen_safe, bad);
    const int s = prod_count % kSlots;
    smem.slot_page[s] = bad ? -2 : page;  // published by the arrive below (release)
    issue_stage<kFmt>(p, smem.stage[s], &smem.full[s], h_k, page, evict_first);
    ++prod_count;
    ++prod_blk;
  };

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k), typename Tr::SmemLayoutK{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p), typename Tr::SmemLayoutP{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.k), typename Tr::SmemLayoutVt{});

  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(wtid);
  auto thr_o = mma_o.get_thread_slice(wtid);
  Tensor tSrK = thr_s.partition_fragment_A(sK);
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kPageSize>, Int<kN>>{});
  Tensor tOrV = thr_o.partition_fragment_A(
      local_tile(sVt, Shape<Int<kHeadDimV / 2>, Int<kPageSize>>{}, make_coord(wg, _0{})));
  Tensor tOrP = thr_o.partition_fragment_B(sP);
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kHeadDimV / 2>, Int<kN>>{});
  constexpr int kJ = kN / 8;  // column groups of 8 per accumulator tile

  load_q<T, kN>(p, sQ, pw.begin_req, h_k, 0);
  cp_async_commit();
  if (producer) {
#pragma unroll 1
    for (int s = 0; s < kSlots; ++s) produce();
  }

  RequestWork w = request_work(p, pw, pw.begin_req, pw.begin_blk);
  int cons_count = 0;  // pages consumed so far (slot = count % kSlots, phase = count / kSlots)
  for (int req = pw.begin_req;;) {
    bool bad = w.bad;
    // Visible-key limit of this thread's query columns (bottom-right causal mask for MTP).
    int limit[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qrow = 8 * j + quad_col + c;
        const int s_idx = qrow < p.q_seq_per_hk ? qrow / p.q_heads_per_hk : p.s_q - 1;
        limit[j][c] = w.seqlen_safe - (p.causal ? (p.s_q - 1 - s_idx) : 0);
      }
    }
    float m_run[kJ][2], l_part[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      m_run[j][0] = m_run[j][1] = -INFINITY;
      l_part[j][0] = l_part[j][1] = 0.f;
    }
    clear(tOrO);
    cp_async_wait<0>();  // this segment's Q (read by warpgroup 0 after the first barrier below)
    fence_async_proxy();

    for (int blk = w.blk_begin; blk < w.blk_end; ++blk, ++cons_count) {
      const int s = cons_count % kSlots;
      mbar_wait(&smem.full[s], (cons_count / kSlots) & 1);
      const int page = smem.slot_page[s];
      if (page == -2) bad = true;
      const int valid = bad ? 0 : block_tokens(w.seqlen_safe, blk);
      // This warpgroup's previous P V completed (warpgroup_wait<0> below), so its columns may be rewritten.
      dequant_stage<T, kFmt>(smem.stage[s], reinterpret_cast<char*>(smem.k), wg, wtid, valid);
      fence_async_proxy();  // ordinary stores, read by wgmma
      __syncthreads();      // the page tile is complete; slot s is free
      if (producer) produce();

      if (wg == 0) {
        warpgroup_fence_operand(tSrS);
        warpgroup_arrive();
        mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
        for (int kb = 0; kb < size<2>(tSrK); ++kb) {
          cute::gemm(mma_s, tSrK(_, _, kb), tSrQ(_, _, kb), tSrS);
          mma_s.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);

        // Mask by index, scale to the log2 domain, column maxima over this thread's two tokens, then over
        // the warp's 16 tokens (lanes with the same lane % 4), then over the four warps through smem.
        const int col0 = blk * kPageSize;
        float mx[kJ][2];
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float m = -INFINITY;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const int idx = c + 2 * rr + 4 * j;
              const float v = (col0 + r0 + 8 * rr < limit[j][c]) ? tSrS(idx) * scale_log2 : -INFINITY;
              tSrS(idx) = v;
              m = fmaxf(m, v);
            }
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
            mx[j][c] = m;
            if (lane < 4) smem.red[warp][8 * j + quad_col + c] = m;
          }
        }
        named_barrier_sync(1, 128);
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int qrow = 8 * j + quad_col + c;
            float m = mx[j][c];
#pragma unroll
            for (int w2 = 0; w2 < 4; ++w2) m = fmaxf(m, smem.red[w2][qrow]);
            const float m_new = next_running_max(m_run[j][c], m);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep exp2 finite
            const float sc = exp2f(m_run[j][c] - m_use);
            m_run[j][c] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const int idx = c + 2 * rr + 4 * j;
              const float e = exp2f(tSrS(idx) - m_use);
              sum += e;
              sP(qrow, r0 + 8 * rr) = static_cast<T>(e);
            }
            l_part[j][c] = l_part[j][c] * sc + sum;
            if (warp == 0 && lane < 4) smem.scale[qrow] = sc;
          }
        }
        fence_async_proxy();  // P is read by wgmma
      }
      __syncthreads();  // P and the rescale factors are published

      {
        // Rescale O^T's columns; skipped when no factor of the warp's columns moved (the usual case once the
        // running max has settled; see kMaxSlackLog2).
        float sc[kJ][2];
        bool all_one = true;
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            sc[j][c] = smem.scale[8 * j + quad_col + c];
            all_one = all_one && sc[j][c] == 1.f;
          }
        }
        if (!__all_sync(0xffffffffu, all_one)) {
#pragma unroll
          for (int m = 0; m < size<1>(tOrO); ++m) {
#pragma unroll
            for (int j = 0; j < kJ; ++j) {
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                tOrO(c + 4 * j, m, 0) *= sc[j][c];
                tOrO(c + 2 + 4 * j, m, 0) *= sc[j][c];
              }
            }
          }
        }
      }
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < size<2>(tOrV); ++kb) {
        cute::gemm(mma_o, tOrV(_, _, kb), tOrP(_, _, kb), tOrO);
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
    }

    // ---- end of the segment: the statistics of each query column, then the output.
    RequestWork w_next = w;
    int req_next = req;
    const bool more = next_segment(p, pw, req, w, req_next, w_next);
    __syncthreads();  // every wgmma of the segment is done: Q may be overwritten
    if (more) {
      load_q<T, kN>(p, sQ, req_next, h_k, 0);
      cp_async_commit();
    }
    if (wg == 0) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float l = l_part[j][c];
          l += __shfl_xor_sync(0xffffffffu, l, 4);
          l += __shfl_xor_sync(0xffffffffu, l, 8);
          l += __shfl_xor_sync(0xffffffffu, l, 16);
          const int qrow = 8 * j + quad_col + c;
          if (lane < 4) smem.row_sum[warp][qrow] = l;
          if (warp == 0 && lane < 4) smem.row_max[qrow] = m_run[j][c];
        }
      }
    }
    __syncthreads();

    const int64_t slot = static_cast<int64_t>(p.num_splits[req]) + w.split_idx;
    const bool slot_ok = slot >= 0 && slot < 2 * static_cast<int64_t>(p.num_sm_parts);
    const float nan = __int_as_float(0x7fc00000);
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qrow = 8 * j + quad_col + c;
        if (qrow >= p.q_seq_per_hk) continue;
        const float l =
            smem.row_sum[0][qrow] + smem.row_sum[1][qrow] + smem.row_sum[2][qrow] + smem.row_sum[3][qrow];
        const float m = smem.row_max[qrow];
        const bool empty = l == 0.f;  // no visible key (a NaN l stays NaN, as in the reference)
        const float inv = empty ? 0.f : out_scale / l;
        const int s_idx = qrow / p.q_heads_per_hk;
        const int head = h_k * p.q_heads_per_hk + qrow % p.q_heads_per_hk;
        const bool lse_writer = wg == 0 && warp == 0 && lane < 4;
        if (w.n_pieces == 0) {
          T* out = static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride +
                   head * p.o_head_stride + wg * (kHeadDimV / 2);
#pragma unroll
          for (int m_t = 0; m_t < size<1>(tOrO); ++m_t) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const float v = bad ? nan : tOrO(c + 2 * rr + 4 * j, m_t, 0) * inv;
              out[m_t * 64 + r0 + 8 * rr] = static_cast<T>(v);
            }
          }
          if (lse_writer) {
            p.lse[req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride] =
                bad ? nan : (empty ? INFINITY : (log2f(l) + m) * 0.69314718055994530942f);
          }
        } else if (slot_ok) {
          const int64_t acc_row = (slot * p.h_kv + h_k) * p.q_seq_per_hk + qrow;
          float* o_acc = p.o_accum + acc_row * kHeadDimV + wg * (kHeadDimV / 2);
#pragma unroll
          for (int m_t = 0; m_t < size<1>(tOrO); ++m_t) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              o_acc[m_t * 64 + r0 + 8 * rr] = bad ? nan : tOrO(c + 2 * rr + 4 * j, m_t, 0) * inv;
            }
          }
          if (lse_writer) p.lse_accum[acc_row] = bad ? nan : (empty ? -INFINITY : log2f(l) + m);
        }
      }
    }
    if (!more) break;
    req = req_next;
    w = w_next;
  }
}

}  // namespace flashmla::sm90
