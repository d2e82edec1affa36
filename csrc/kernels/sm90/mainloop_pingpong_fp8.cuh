// FP8 KV-cache decode main kernel for Hopper (sm_90a), up to 32 query rows per kv head: tokens as the wgmma
// M dimension, the FP8 bytes converted straight into wgmma A-operand registers (no 16-bit page tile in
// shared memory), and the two warpgroups working on different pages (ping-pong).
//
// Why tokens as M. The 64-row kernels (mainloop_serial.cuh) multiply a 64-row Q tile even when 16 of its
// rows are real: ~1.2 us of tensor time per page, as long as an FP8 page takes to arrive at an SM's share of
// HBM bandwidth. With the page's 64 tokens as M and the 16 or 32 real rows as N, the tensor work scales with
// the real rows, and Q needs 18-36 KB of shared memory instead of 72: the room holds a ring of FP8 staging
// pages.
//
// Why registers. The previous kernel of this shape (dequantisation into a 16-bit tile, both warpgroups on
// every page; removed, see git history) measured 3.0 us per page per SM against ~1.6 us of HBM time: its
// three shared-memory phases (the tile written, read as K, read as V^T; ~280 KB per page) and two CTA
// barriers per page run one after another (benchmarks/NOTES.md, "FP8, the transposed kernel"). Here each
// thread loads the FP8 bytes its wgmma fragments need and converts them in registers, so a page costs ~70 KB
// of shared-memory reads instead, and the two warpgroups' pages overlap each other with no CTA barrier inside
// a segment.
//
//   S^T [64 tokens x N] = K Q^T     wgmma m64nNk16, A = K from registers, B = Q (smem, K-major);
//   O^T [512 x N]      += V^T P^T   wgmma m64nNk16, A = V^T from registers, B = P (smem, K-major).
//
// K as a register operand. A thread's A fragment of one k-step holds, for its two token rows, the columns
// {2q, 2q+1, 2q+8, 2q+9} (q = lane % 4). A dot product does not care in which order its k terms come, so the
// 576 columns are permuted: one 16-byte load of a token row gives the thread its four values for four
// consecutive k-steps, and Q is stored in shared memory with the same permutation (q_logical below). The
// 16-byte chunk each thread reads is chosen so that the eight lanes of a load phase (two token rows) hit
// eight different bank groups under TMA's 128B swizzle.
//
// V^T as a register operand. The M dimension of O^T (V columns) and its K dimension (tokens) are read with
// ldmatrix.trans on the FP8 bytes taken as 16-bit pairs: each result register holds two adjacent columns of
// two adjacent tokens; one byte permute makes them two (token, token) pairs, one per column, which is what
// the A fragment wants (the V columns of a warp's 16 M rows are permuted: M rows r and r + 8 are columns
// 2r and 2r + 1 of the warp's 16-column chunk; the output is written back in natural order).
//
// Pages, warpgroups, producer. A producer warpgroup (one working thread, 256) walks the part's pages across
// segments and keeps a ring of FP8 staging slots full (full/empty mbarriers). Within a segment, warpgroup 0
// takes its even pages and warpgroup 1 its odd ones, each with its own softmax state and O^T accumulator over
// all 512 columns; a warpgroup frees a slot as soon as its V^T fragments are loaded. At the end of a segment
// the two states are merged through shared memory (the Q buffer, free then) and each warpgroup writes half of
// O.
//
// Correctness rules (docs/architecture.md): logits of tokens past seqlen are masked by index, V values of
// those tokens are zeroed in registers (a page's unused rows may hold anything, NaN included), a request
// with a bad seqlen or page id writes NaN into its own output only, smem written by ordinary stores and read
// by wgmma is fenced (fence.proxy.async) before the barrier that publishes it.
#pragma once

#include "kernels/sm90/common.cuh"
#include "kernels/sm90/dequant_fp8.cuh"

namespace flashmla::sm90 {

// One staging slot: the FP8 values as four 128-column byte boxes (box j = columns 128 j .. 128 j + 127, 128
// bytes per token row), then per-tensor: the 64 e4m3 RoPE values (a 64-column box, 64 bytes per token row);
// V3.2: the bf16 RoPE values (one 64 x 64 box, 128B swizzle) and the four float32 scales per token. The value
// boxes land 128B-swizzled (16-byte chunk c of token row t at chunk c ^ t % 8; the host's map for this
// kernel).
template <int kFmt>
constexpr int staging_slot_bytes() {
  return kFmt == kKvFp8Tensor ? 4 * kFp8BoxBytes + kPageSize * 64
                              : 4 * kFp8BoxBytes + kTileBytes + kV32ScaleBytes;
}
constexpr int kStageRopeOffset = 4 * kFp8BoxBytes;                // 1024-aligned (the V3.2 box is swizzled)
constexpr int kStageScaleOffset = 4 * kFp8BoxBytes + kTileBytes;  // V3.2 only

template <typename T, int kN>
struct PingPongTraits {
  // Q, kN rows x 576 (columns permuted: q_logical), K-major, 128B swizzle: the B operand of S^T = K Q^T.
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<kHeadDimK>>{}));
  // P, kN query rows x 64 tokens, K-major: the B operand of O^T = V^T P^T.
  using SmemLayoutP =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<kPageSize>>{}));
  // Used only to partition B into per-k-step smem descriptors (A comes from registers: wgmma_rs).
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kPageSize>, Int<kN>, Int<kHeadDimK>>>()));
  using MmaO = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kPageSize>, Int<kN>, Int<kPageSize>>, GMMA::Major::MN,
                           GMMA::Major::K>()));
};

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

// Two consumer warpgroups and a producer warpgroup (one thread of it works). Why a whole warpgroup for one
// thread: warps go to the SM's four schedulers in turn, so a ninth warp would cap every thread at 168
// registers (a scheduler's 16 K registers over three warps); with three warpgroups, setmaxnreg moves the
// producer's registers to the consumers (40 + 2 x 232 per thread-slot, 64,512 of 65,536).
constexpr int kPpThreads = 384;
constexpr int kPpConsumers = 256;
constexpr int kPpProducer = 256;    // the producer thread
constexpr int kPpMergeBarrier = 3;  // named barrier of the 256 consumer threads (ids 1, 2: warpgroups)
constexpr int kPpConsumerRegs = 232;
constexpr int kPpProducerRegs = 40;

// Four staging slots, an even number: slot s then always passes between pages of the same warpgroup within
// a segment (page n - kSlots has the parity of page n), so the warpgroup waiting on a slot's `full` barrier
// has waited on its previous phase itself. With an odd count the owner of page n never waited for page
// n - kSlots, and could see that earlier phase's parity and pass before its own page landed. (Five would fit
// per-tensor at 16 rows.)
constexpr int kPpSlots = 4;

template <typename T, int kFmt, int kN, int kSlots = kPpSlots>
struct alignas(1024) PingPongStorage {
  alignas(1024) T q[kN * kHeadDimK];  // Q, columns permuted (q_logical); the merge's scratch at segment ends
  alignas(1024) T p[2][kN * kPageSize];  // each warpgroup's P
  alignas(1024) char stage[kSlots][staging_slot_bytes<kFmt>()];
  float red[2][4][kN];      // per-warp column maxima of a warpgroup's current page
  float row_max[2][kN];     // each warpgroup's running max at the end of a segment
  float row_sum[2][4][kN];  // per-warp partial softmax denominators at the end of a segment
  int bad[2];
  int slot_page[kSlots];  // page id the producer put in a slot: -1 nothing to read, -2 an invalid id
  uint64_t full[kSlots];
  uint64_t empty[kSlots];
};

// wgmma m64nNk16 with A (four registers of 16-bit pairs) from registers and B from a shared-memory
// descriptor; `accumulate` false overwrites d.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_rs(const uint32_t (&a)[4], uint64_t desc, float (&d)[kN / 2],
                                         bool accumulate) {
  constexpr bool kBf16 = std::is_same_v<T, cutlass::bfloat16_t>;
  const GMMA::ScaleOut sc = accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero;
  if constexpr (kN == 16) {
    using Op =
        std::conditional_t<kBf16, SM90::GMMA::MMA_64x16x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>,
                           SM90::GMMA::MMA_64x16x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::K>>;
    Op::fma(a[0], a[1], a[2], a[3], desc, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], sc);
  } else {
    using Op =
        std::conditional_t<kBf16, SM90::GMMA::MMA_64x32x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>,
                           SM90::GMMA::MMA_64x32x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::K>>;
    Op::fma(a[0], a[1], a[2], a[3], desc, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10],
            d[11], d[12], d[13], d[14], d[15], sc);
  }
}

// warpgroup_fence_operand over a register array (wgmma operands or accumulators).
template <typename R, int kNum>
__device__ __forceinline__ void fence_regs(R (&r)[kNum]) {
#pragma unroll
  for (int i = 0; i < kNum; ++i) warpgroup_fence_operand(r[i]);
}

// Where source column c (even) of Q goes in the permuted Q: k-step S and position pp (0..15) in it, so that
// the k-step's A fragment, as the kernel loads it from the page, meets the same columns. Value columns: the
// thread with lane % 4 == qq reads, for k-steps 4g .. 4g+3, 16-byte chunk 2 qq + g % 2 of the 128-column box
// g / 2 (word i of it: k-step 4g + i; its bytes 0, 1 are fragment positions 2 qq, 2 qq + 1, bytes 2, 3
// positions 2 qq + 8, 2 qq + 9). RoPE columns 512..575 (k-steps 32..35): per-tensor e4m3, a 64-byte row,
// chunk qq; V3.2 bf16, a 128-byte row, chunks 2 qq + h (h = 0, 1), 8 values each: k-steps 32 + 2h and
// 33 + 2h.
template <int kFmt>
__device__ __forceinline__ void q_logical(int c, int& S, int& pp) {
  const int hi = (c & 3) ? 8 : 0;
  if (c < kHeadDimV) {
    const int box = c >> 7, chunk = (c & 127) >> 4;
    S = 4 * (2 * box + (chunk & 1)) + ((c & 15) >> 2);
    pp = 2 * (chunk >> 1) + hi;
  } else if constexpr (kFmt == kKvFp8Tensor) {
    const int w = c - kHeadDimV;
    S = 32 + ((w & 15) >> 2);
    pp = 2 * (w >> 4) + hi;
  } else {
    const int w = c - kHeadDimV, chunk = w >> 3;
    S = 32 + 2 * (chunk & 1) + ((w & 7) >> 2);
    pp = 2 * (chunk >> 1) + hi;
  }
}

// Q rows of (req, h_k) -> sQ with the columns permuted (q_logical), by the 256 consumer threads; rows past
// q_seq_per_hk are zero. Ordinary stores: the caller fences and publishes.
template <typename T, int kFmt, int kN, class SQ>
__device__ __forceinline__ void load_q_permuted(const DecodeParams& p, SQ& sQ, int req, int h_k, int ctid) {
  const T* q = static_cast<const T*>(p.q);
  for (int i = ctid; i < kN * kChunksPerRow; i += kPpConsumers) {
    const int r = i / kChunksPerRow, ch = i % kChunksPerRow;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < p.q_seq_per_hk) {
      const int s_idx = r / p.q_heads_per_hk;
      const int head = h_k * p.q_heads_per_hk + r % p.q_heads_per_hk;
      v = __ldg(reinterpret_cast<const uint4*>(q + req * p.q_batch_stride + s_idx * p.q_seq_stride +
                                               head * p.q_head_stride + ch * 8));
    }
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      int S, pp;
      q_logical<kFmt>(ch * 8 + 2 * u, S, pp);
      *reinterpret_cast<uint32_t*>(&sQ(r, 16 * S + pp)) = w[u];
    }
  }
}

// e4m3 pair (16 bits) -> a 16-bit pair of T, times `scale` for V3.2 (bf16 only).
template <typename T, bool kScaled>
__device__ __forceinline__ void e4m3x4_to(uint32_t x, __nv_bfloat162 scale_lo, __nv_bfloat162 scale_hi,
                                          uint32_t& lo, uint32_t& hi) {
  e4m3x4_to_f16x4(x, lo, hi);
  if constexpr (std::is_same_v<T, cutlass::bfloat16_t>) {
    lo = f16x2_to_bf16x2<kScaled>(lo, scale_lo);
    hi = f16x2_to_bf16x2<kScaled>(hi, scale_hi);
  }
}

__device__ __forceinline__ void ldsm_x4_trans(const void* smem, uint32_t (&d)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(smem_u32(smem)));
}

// kN: query rows per kv head, padded (16 or 32). T: q's and out's dtype and the dtype of every wgmma.
template <typename T, int kFmt, int kN>
__global__ void __launch_bounds__(kPpThreads, 1)
    decode_pingpong_fp8_kernel(const __grid_constant__ DecodeParams p) {
  static_assert(kFmt != kKvNative, "FP8 caches only");
  static_assert(kFmt != kKvFp8V32 || std::is_same_v<T, cutlass::bfloat16_t>, "V3.2 FP8 takes bf16 q only");
  static_assert(kN == 16 || kN == 32, "16 or 32 query rows per kv head");
  constexpr bool kV32 = kFmt == kKvFp8V32;
  constexpr int kSlots = kPpSlots;
  constexpr int kJ = kN / 8;    // column groups of 8 per accumulator
  constexpr int kAcc = kN / 2;  // accumulator registers per m64 tile
  using Tr = PingPongTraits<T, kN>;
  using Storage = PingPongStorage<T, kFmt, kN>;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);

  const int h_k = blockIdx.y, part = blockIdx.z;
  const PartWork pw = part_work(p, part);
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  if (pw.end_req < pw.begin_req) return;
  const bool evict_first = p.num_splits[p.b] > 0;  // as mainloop_serial.cuh

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      mbar_init(&smem.full[s], 1);
      mbar_init(&smem.empty[s], 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // ---- producer: the part's pages in consumption order, across segments; the next page id is looked up
  // before waiting for its slot.
  if (threadIdx.x >= kPpConsumers) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kPpProducerRegs));
    if (threadIdx.x != kPpProducer) return;
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_k) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_rope) : "memory");
    if constexpr (kV32) asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_scale) : "memory");
    int req = pw.begin_req;
    RequestWork w = request_work(p, pw, req, pw.begin_blk);
    int blk = w.blk_begin;
#pragma unroll 1
    for (int n = 0;; ++n, ++blk) {
      while (blk >= w.blk_end) {  // segments without pages are skipped, as the consumers do
        int next_req = req;
        RequestWork next_w = w;
        if (!next_segment(p, pw, req, w, next_req, next_w)) return;
        req = next_req;
        w = next_w;
        blk = w.blk_begin;
      }
      bool bad = false;
      const int page = block_page(p, req, blk, w.seqlen_safe, bad);
      const int s = n % kSlots;
      if (n >= kSlots) mbar_wait(&smem.empty[s], ((n / kSlots) - 1) & 1);
      smem.slot_page[s] = bad ? -2 : page;  // published by the arrive in issue_stage (release)
      issue_stage<kFmt>(p, smem.stage[s], &smem.full[s], h_k, page, evict_first);
    }
  }

  // ---- consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kPpConsumerRegs));
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);  // warp-uniform
  const int wtid = threadIdx.x % 128;
  const int warp = wtid / 32;
  const int lane = threadIdx.x % 32;
  const int qq = lane % 4;
  const int quad_col = 2 * qq;
  // Accumulator layout (m64nNk16): value c + 2 rr + 4 j of a thread is (M row r0 + 8 rr, N column
  // 8 j + quad_col + c); S^T rows are tokens, O^T rows V columns (permuted: see the top of the file).
  const int r0 = warp * 16 + lane / 4;

  float scale_log2 = p.scale_log2, out_scale = 1.f;
  if constexpr (kFmt == kKvFp8Tensor) {
    out_scale = *p.k_scale;
    scale_log2 *= out_scale;
  }

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Tr::SmemLayoutQ{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p[wg]), typename Tr::SmemLayoutP{});
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  Tensor tSrQ = mma_s.get_thread_slice(wtid).partition_fragment_B(sQ);  // 36 descriptors, one per k-step
  Tensor tOrP = mma_o.get_thread_slice(wtid).partition_fragment_B(sP);  // 4 descriptors

  load_q_permuted<T, kFmt, kN>(p, sQ, pw.begin_req, h_k, threadIdx.x);
  fence_async_proxy();
  named_barrier_sync(kPpMergeBarrier, kPpConsumers);

  float acc_o[8][kAcc];
  float acc_s[kAcc];
  RequestWork w = request_work(p, pw, pw.begin_req, pw.begin_blk);
  int cons_base = 0;  // pages of the part consumed before this segment (slot = n % kSlots)
  for (int req = pw.begin_req;;) {
    bool bad = w.bad;
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
#pragma unroll
    for (int mb = 0; mb < 8; ++mb) {
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc_o[mb][i] = 0.f;
    }

    // (Metadata from another call can put blk_begin past blk_end: no page then, as the producer sees it.)
    const int nblk = max(0, w.blk_end - w.blk_begin);
#pragma unroll 1
    for (int k = wg; k < nblk; k += 2) {
      const int n = cons_base + k, s = n % kSlots;
      mbar_wait(&smem.full[s], (n / kSlots) & 1);
      if (smem.slot_page[s] == -2) bad = true;
      const int blk = w.blk_begin + k;
      // Warp-uniform by construction (every thread reads the same values); the shuffle tells the compiler,
      // which otherwise treats the wgmma below as divergent and serialises it.
      const int valid = __shfl_sync(0xffffffffu, bad ? 0 : block_tokens(w.seqlen_safe, blk), 0);
      const char* st = smem.stage[s];
      if (valid > 0) {
        // ---- S^T = K Q^T: nine groups of four k-steps (one 16-byte load per token row), issued in units of
        // kU k-steps; a unit's A registers are reused two units later, after a wait for the unit that read
        // them.
        [[maybe_unused]] __nv_bfloat162 ksc[4][2];
        if constexpr (kV32) {
          const float* scales = reinterpret_cast<const float*>(st + kStageScaleOffset);
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const float4 s4 = *reinterpret_cast<const float4*>(scales + (r0 + 8 * rr) * 4);
            ksc[0][rr] = __floats2bfloat162_rn(s4.x, s4.x);
            ksc[1][rr] = __floats2bfloat162_rn(s4.y, s4.y);
            ksc[2][rr] = __floats2bfloat162_rn(s4.z, s4.z);
            ksc[3][rr] = __floats2bfloat162_rn(s4.w, s4.w);
          }
        }
        // kU: 4 at 16 rows; 2 at 32, where the O^T accumulator leaves fewer registers.
        constexpr int kU = kN == 32 ? 2 : 4;
        uint32_t a_s[2][kU][4];
        fence_regs(acc_s);
#pragma unroll
        for (int g = 0; g < 9; ++g) {
          uint4 x[2], y[2];
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int t = r0 + 8 * rr;
            if (g < 8) {
              const int chunk = 2 * qq + (g & 1);
              x[rr] = *reinterpret_cast<const uint4*>(st + (g >> 1) * kFp8BoxBytes + t * 128 +
                                                      ((chunk ^ (t & 7)) << 4));
            } else if constexpr (kV32) {  // bf16 RoPE: chunks 2 qq (k-steps 32, 33) and 2 qq + 1 (34, 35)
              x[rr] = *reinterpret_cast<const uint4*>(st + kStageRopeOffset + t * 128 +
                                                      (((2 * qq) ^ (t & 7)) << 4));
              y[rr] = *reinterpret_cast<const uint4*>(st + kStageRopeOffset + t * 128 +
                                                      (((2 * qq + 1) ^ (t & 7)) << 4));
            } else {
              x[rr] = *reinterpret_cast<const uint4*>(st + kStageRopeOffset + t * 64 + qq * 16);
            }
          }
          const uint32_t wr[2][4] = {{x[0].x, x[0].y, x[0].z, x[0].w}, {x[1].x, x[1].y, x[1].z, x[1].w}};
#pragma unroll
          for (int h = 0; h < 4 / kU; ++h) {
            const int u = g * (4 / kU) + h;
            if (u >= 2) warpgroup_wait<1>();  // unit u - 2 has read a_s[u % 2]
            uint32_t (&a)[kU][4] = a_s[u & 1];
#pragma unroll
            for (int ii = 0; ii < kU; ++ii) {
              const int i = h * kU + ii;  // k-step 4 g + i
              if (g < 8 || !kV32) {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                  __nv_bfloat162 sc = __floats2bfloat162_rn(1.f, 1.f);
                  if constexpr (kV32) sc = ksc[g >> 1][rr];
                  e4m3x4_to<T, kV32>(wr[rr][i], sc, sc, a[ii][rr], a[ii][2 + rr]);
                }
              } else {
                const uint4* z = i < 2 ? x : y;
                const bool second = i % 2 == 1;
                a[ii][0] = second ? z[0].z : z[0].x;
                a[ii][1] = second ? z[1].z : z[1].x;
                a[ii][2] = second ? z[0].w : z[0].y;
                a[ii][3] = second ? z[1].w : z[1].y;
              }
            }
#pragma unroll
            for (int ii = 0; ii < kU; ++ii) fence_regs(a[ii]);
            warpgroup_arrive();
#pragma unroll
            for (int ii = 0; ii < kU; ++ii) {
              const int i = h * kU + ii;
              wgmma_rs<T, kN>(a[ii], static_cast<uint64_t>(tSrQ(_0{}, _0{}, 4 * g + i)), acc_s,
                              g > 0 || i > 0);
            }
            warpgroup_commit_batch();
          }
        }
        warpgroup_wait<0>();
        fence_regs(acc_s);

        // ---- softmax: mask by index, column maxima over the warpgroup's four warps, P to smem.
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
              const float v = (col0 + r0 + 8 * rr < limit[j][c]) ? acc_s[idx] * scale_log2 : -INFINITY;
              acc_s[idx] = v;
              m = fmaxf(m, v);
            }
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
            mx[j][c] = m;
            if (lane < 4) smem.red[wg][warp][8 * j + quad_col + c] = m;
          }
        }
        named_barrier_sync(1 + wg, 128);
        float sc[kJ][2];
        bool all_one = true;
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int qrow = 8 * j + quad_col + c;
            float m = mx[j][c];
#pragma unroll
            for (int w2 = 0; w2 < 4; ++w2) m = fmaxf(m, smem.red[wg][w2][qrow]);
            const float m_new = next_running_max(m_run[j][c], m);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep exp2 finite
            sc[j][c] = exp2f(m_run[j][c] - m_use);
            all_one = all_one && sc[j][c] == 1.f;
            m_run[j][c] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const float e = exp2f(acc_s[c + 2 * rr + 4 * j] - m_use);
              sum += e;
              sP(qrow, r0 + 8 * rr) = static_cast<T>(e);
            }
            l_part[j][c] = l_part[j][c] * sc[j][c] + sum;
          }
        }
        fence_async_proxy();  // P is read by wgmma
        named_barrier_sync(1 + wg, 128);
        if (!__all_sync(0xffffffffu, all_one)) {
#pragma unroll
          for (int mb = 0; mb < 8; ++mb) {
#pragma unroll
            for (int j = 0; j < kJ; ++j) {
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                acc_o[mb][c + 4 * j] *= sc[j][c];
                acc_o[mb][c + 2 + 4 * j] *= sc[j][c];
              }
            }
          }
        }

        // ---- O^T += V^T P^T: per 64-column block mb and pair of k-steps, one ldmatrix.x4.trans (tokens
        // 32 sp .. 32 sp + 31 of the warp's 16-column chunk), one byte permute and two conversions per
        // register. Tokens past `valid` are zeroed (their bytes may be anything).
        uint32_t vmask[2][4];
#pragma unroll
        for (int sp = 0; sp < 2; ++sp) {
#pragma unroll
          for (int mi = 0; mi < 4; ++mi) {
            const int t = 32 * sp + 8 * mi + quad_col;
            vmask[sp][mi] = (t < valid ? 0x0000ffffu : 0u) | (t + 1 < valid ? 0xffff0000u : 0u);
          }
        }
        const int t_ld = lane % 8 + 8 * (lane / 8);  // token of this lane's ldmatrix row (plus 32 sp)
        uint32_t a_o[2][2][4];
        [[maybe_unused]] __nv_bfloat162 vsc[2][4];
#pragma unroll
        for (int mb = 0; mb < 8; ++mb) {
          fence_regs(acc_o[mb]);
          if constexpr (kV32) {
            if (mb % 2 == 0) {
              // Scale pairs (token, token + 1) of this thread's four token pairs per k-step pair, for the
              // 128-column group of m-blocks mb and mb + 1.
              const float* scales = reinterpret_cast<const float*>(st + kStageScaleOffset);
#pragma unroll
              for (int sp = 0; sp < 2; ++sp) {
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                  const int t = 32 * sp + 8 * mi + quad_col;
                  // Unused rows' scales may be anything (inf, NaN): 0 x NaN would reach O despite vmask.
                  vsc[sp][mi] = __floats2bfloat162_rn(t < valid ? scales[t * 4 + mb / 2] : 1.f,
                                                      t + 1 < valid ? scales[(t + 1) * 4 + mb / 2] : 1.f);
                }
              }
            }
          }
          const int chunk = 4 * (mb & 1) + warp;
#pragma unroll
          for (int sp = 0; sp < 2; ++sp) {
            const int t = 32 * sp + t_ld;
            uint32_t d[4];
            ldsm_x4_trans(st + (mb >> 1) * kFp8BoxBytes + t * 128 + ((chunk ^ (t & 7)) << 4), d);
            const int u = 2 * mb + sp;  // unit: its A registers are reused two units later
            if (u >= 2) warpgroup_wait<1>();
            uint32_t (&a)[2][4] = a_o[u & 1];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
              const uint32_t x = __byte_perm(d[mi] & vmask[sp][mi], 0, 0x3120);
              __nv_bfloat162 sc2 = __floats2bfloat162_rn(1.f, 1.f);
              if constexpr (kV32) sc2 = vsc[sp][mi];
              // matrix mi: k-step 2 sp + mi / 2, tokens + 8 (mi odd): fragment registers 2 (mi % 2), + 1
              e4m3x4_to<T, kV32>(x, sc2, sc2, a[mi / 2][2 * (mi % 2)], a[mi / 2][2 * (mi % 2) + 1]);
            }
            fence_regs(a[0]);
            fence_regs(a[1]);
            warpgroup_arrive();
            wgmma_rs<T, kN>(a[0], static_cast<uint64_t>(tOrP(_0{}, _0{}, 2 * sp)), acc_o[mb], true);
            wgmma_rs<T, kN>(a[1], static_cast<uint64_t>(tOrP(_0{}, _0{}, 2 * sp + 1)), acc_o[mb], true);
            warpgroup_commit_batch();
          }
        }
      }
      mbar_arrive(&smem.empty[s]);  // this warpgroup has read the slot (V^T fragments are in registers)
      warpgroup_wait<0>();          // (unconditional: nothing is pending when the page was skipped)
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) fence_regs(acc_o[mb]);
    }
    cons_base += nblk;

    // ---- end of the segment: merge the two warpgroups' states, write O (warpgroup 0 columns 0..255,
    // warpgroup 1 256..511) and the LSE.
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float l = l_part[j][c];
        l += __shfl_xor_sync(0xffffffffu, l, 4);
        l += __shfl_xor_sync(0xffffffffu, l, 8);
        l += __shfl_xor_sync(0xffffffffu, l, 16);
        const int qrow = 8 * j + quad_col + c;
        if (lane < 4) smem.row_sum[wg][warp][qrow] = l;
        if (warp == 0 && lane < 4) smem.row_max[wg][qrow] = m_run[j][c];
      }
    }
    if (wtid == 0) smem.bad[wg] = bad;
    named_barrier_sync(kPpMergeBarrier, kPpConsumers);  // also: every wgmma of the segment is done
    bad = smem.bad[0] || smem.bad[1];
    float f_own[kJ][2], inv[kJ][2], lse2[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qrow = 8 * j + quad_col + c;
        const float m0 = smem.row_max[0][qrow], m1 = smem.row_max[1][qrow];
        const float l0 = smem.row_sum[0][0][qrow] + smem.row_sum[0][1][qrow] + smem.row_sum[0][2][qrow] +
                         smem.row_sum[0][3][qrow];
        const float l1 = smem.row_sum[1][0][qrow] + smem.row_sum[1][1][qrow] + smem.row_sum[1][2][qrow] +
                         smem.row_sum[1][3][qrow];
        const float m = fmaxf(m0, m1);
        // A warpgroup that saw no visible key has m = -inf and l = 0: factor 0 (not exp2(NaN)).
        const float f0 = m0 == -INFINITY ? 0.f : exp2f(m0 - m);
        const float f1 = m1 == -INFINITY ? 0.f : exp2f(m1 - m);
        const float l = l0 * f0 + l1 * f1;
        const bool empty = l == 0.f;  // no visible key (a NaN l stays NaN, as in the reference)
        f_own[j][c] = wg == 0 ? f0 : f1;
        inv[j][c] = empty ? 0.f : out_scale / l;
        lse2[j][c] = empty ? -INFINITY : log2f(l) + m;  // log2 domain; -inf marks "empty"
      }
    }
    // The scratch (the Q buffer): thread wtid of one warpgroup hands its values to thread wtid of the other.
    float* scratch = reinterpret_cast<float*>(smem.q);
    auto hand_over = [&](int mb0) FMLA_INLINE {
#pragma unroll
      for (int mb = 0; mb < 4; ++mb) {
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const int i = c + 2 * rr + 4 * j;
              scratch[(mb * kAcc + i) * 128 + wtid] = acc_o[mb0 + mb][i] * f_own[j][c];
            }
          }
        }
      }
    };
    auto take_over = [&](int mb0) FMLA_INLINE {
#pragma unroll
      for (int mb = 0; mb < 4; ++mb) {
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const int i = c + 2 * rr + 4 * j;
              acc_o[mb0 + mb][i] = acc_o[mb0 + mb][i] * f_own[j][c] + scratch[(mb * kAcc + i) * 128 + wtid];
            }
          }
        }
      }
    };
    if (wg == 1) hand_over(0);
    named_barrier_sync(kPpMergeBarrier, kPpConsumers);
    if (wg == 0) {
      take_over(0);
      hand_over(4);  // the same scratch words this thread just read
    }
    named_barrier_sync(kPpMergeBarrier, kPpConsumers);
    if (wg == 1) take_over(4);

    const int64_t slot = static_cast<int64_t>(p.num_splits[req]) + w.split_idx;
    const bool slot_ok = slot >= 0 && slot < 2 * static_cast<int64_t>(p.num_sm_parts);
    const float nan = __int_as_float(0x7fc00000);
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qrow = 8 * j + quad_col + c;
        if (qrow >= p.q_seq_per_hk) continue;
        const int s_idx = qrow / p.q_heads_per_hk;
        const int head = h_k * p.q_heads_per_hk + qrow % p.q_heads_per_hk;
        const bool lse_writer = wg == 0 && warp == 0 && lane < 4;
        const float sc_o = inv[j][c];
        if (w.n_pieces == 0) {
          T* out = static_cast<T*>(p.out) + req * p.o_batch_stride + s_idx * p.o_seq_stride +
                   head * p.o_head_stride + 16 * warp + 2 * (lane / 4);
#pragma unroll
          for (int mb = 0; mb < 8; ++mb) {
            if (mb / 4 != wg) continue;  // (a constant register index, a run-time condition)
            const float a = bad ? nan : acc_o[mb][c + 4 * j] * sc_o;
            const float b = bad ? nan : acc_o[mb][c + 2 + 4 * j] * sc_o;
            *reinterpret_cast<typename Pack2<T>::type*>(out + 64 * mb) = Pack2<T>::make(a, b);
          }
          if (lse_writer) {
            const float l2 = lse2[j][c];
            p.lse[req * p.lse_batch_stride + head * p.lse_head_stride + s_idx * p.lse_seq_stride] =
                bad ? nan : (l2 == -INFINITY ? INFINITY : l2 * 0.69314718055994530942f);
          }
        } else if (slot_ok) {
          const int64_t acc_row = (slot * p.h_kv + h_k) * p.q_seq_per_hk + qrow;
          float* o_acc = p.o_accum + acc_row * kHeadDimV + 16 * warp + 2 * (lane / 4);
#pragma unroll
          for (int mb = 0; mb < 8; ++mb) {
            if (mb / 4 != wg) continue;
            float2 v;
            v.x = bad ? nan : acc_o[mb][c + 4 * j] * sc_o;
            v.y = bad ? nan : acc_o[mb][c + 2 + 4 * j] * sc_o;
            *reinterpret_cast<float2*>(o_acc + 64 * mb) = v;
          }
          if (lse_writer) p.lse_accum[acc_row] = bad ? nan : lse2[j][c];
        }
      }
    }

    RequestWork w_next = w;
    int req_next = req;
    const bool more = next_segment(p, pw, req, w, req_next, w_next);
    if (!more) break;
    named_barrier_sync(kPpMergeBarrier, kPpConsumers);  // the scratch is read: Q may be overwritten
    load_q_permuted<T, kFmt, kN>(p, sQ, req_next, h_k, threadIdx.x);
    fence_async_proxy();
    named_barrier_sync(kPpMergeBarrier, kPpConsumers);
    req = req_next;
    w = w_next;
  }
}

}  // namespace flashmla::sm90
