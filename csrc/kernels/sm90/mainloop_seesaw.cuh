// Split-KV MLA decode main kernel for Hopper (sm_90a): wgmma on the tensor cores, TMA page pipeline,
// "seesaw" schedule across two warpgroups.
//
// Work: CTA (m_block, h_k, part) processes the 64 query rows [m_block*64, m_block*64 + 64) of kv head h_k
// (rows pack MTP tokens and the query heads sharing the kv head: row = s_idx * (h_q/h_kv) + head) for every
// (request, block) range the scheduler gave `part`. One 64-token page is one N tile, so paging costs nothing
// inside a tile: the page id is looked up once per tile and becomes the 4th TMA coordinate.
//
// Output ownership: O is 64 x 512 fp32, half the register file, so it is split by columns: warpgroup 0 owns
// O_L (columns 0..255), warpgroup 1 owns O_R (256..511), 128 registers per thread each. V is the first 512
// columns of the K tile (an MN-major view of the same smem), so every page is read from HBM once.
//
// Seesaw schedule. Pages go in pairs (A, B) through two smem buffers (A in buffer 0, B in buffer 1). Each
// warpgroup computes one S = Q K^T per pair (WG0 for A, WG1 for B) and the P V products of both pages for its
// own half of O. The running row max is handed from one warpgroup to the other through smem together with
// that page's P, so each softmax sees the max of every earlier page:
//     WG0: softmax(S_A) against m -> m_A, s_A = exp(m - m_A), P_A;  O_L = O_L s_A + P_A V_A[L]  (P_A in regs)
//     WG1: O_R = O_R s_A + P_A V_A[R] (P_A from smem), and meanwhile softmax(S_B) against m_A -> m_B, s_B,
//     P_B WG1: O_R = O_R s_B + P_B V_B[R]  (P_B in regs) WG0: O_L = O_L s_B + P_B V_B[L]  (P_B from smem)
// Each warpgroup issues the same tensor work per full pair (one 64x64x576 + two 64x256x64 products), and
// while one runs its softmax on the CUDA cores the other has wgmmas in flight (WG1's softmax of B runs under
// both warpgroups' P_A V_A), so the tensor cores stay fed with a single O tile (a second O tile, as in FA3's
// ping-pong, would not fit in registers).
//
// Shared memory: Q (72 KB) + two page buffers (72 KB each) + row statistics = 218 KB. P of a page is stored
// in that page's own RoPE tile (columns 512..575 of its buffer), which is free once Q K^T of the page is done
// and is not reloaded before the last P V of the page: no separate P buffer.
//
// TMA: a page is nine 64x64 boxes (8 KB each). Each buffer has two mbarriers, one per group of boxes, and a
// group is refilled with the next page as soon as its last reader is done, by the warpgroup that read it
// last:
//     buffer 0 (A): boxes 0-3 (V_L)          after WG0's P_A V_A[L]   (WG0, its first P V of the pair)
//                   boxes 4-8 (V_R, P_A)     after WG1's P_A V_A[R]   (WG1, its first P V of the pair)
//     buffer 1 (B): boxes 4-7 (V_R)          after WG1's P_B V_B[R]   (WG1)
//                   boxes 0-3, 8 (V_L, P_B)  after WG0's P_B V_B[L]   (WG0)
// Page A is consumed first by both warpgroups, so the next A is in flight from the middle of the pair and its
// Q K^T (WG0) rarely waits; the next B lands while WG0 runs the next A's Q K^T and softmax.
// Q K^T of the next page consumes the boxes in the order they were refilled, so its first wgmmas start while
// the rest of the page is still landing.
//
// Correctness rules this file keeps (see docs/architecture.md):
//   * V rows past seqlen (the tail of a request's last page, where stale data or NaN may sit) are zeroed in
//     smem after the copy lands: P = 0 there does not help, because 0 * NaN = NaN in the MMA. Their logits
//     are masked by index, never by value. Pages past the end are never copied and block_table entries past
//     the last page are never read;
//   * masked logits are -inf and the running max is guarded, so a row with no visible key ends with L = 0 and
//     writes out 0 / lse +inf (or an empty partial with lse -inf);
//   * shared memory written by ordinary stores (P, zero fill, cp.async'd Q) and read by wgmma (async proxy)
//     is fenced with fence.proxy.async before the barrier that publishes it;
//   * no accumulator register is touched while a wgmma that writes it may be in flight, and every branch
//     around wgmma code ends with nothing in flight: otherwise ptxas serialises the wgmmas (C7515);
//   * a request whose seqlen is negative, needs more pages than block_table has columns, or names a page id
//     outside the cache is never dereferenced out of bounds: its output rows become NaN instead.
#pragma once

#include "kernels/sm90/common.cuh"

namespace flashmla::sm90 {

// Named barriers (0 is __syncthreads). Each handoff between the warpgroups is a bar.sync of all 256 threads
// (both sides wait), in the same order in both warpgroups; the producer side was measured to be the later
// arrival, so the wait costs it nothing. (Warpgroup-local barriers are avoided: with them compute-sanitizer's
// racecheck reported hazards on these handoffs.)
enum NamedBarrier : int {
  kBarAReady = 1,  // m_A, s_A and P_A of the pair are in smem (WG0 -> WG1)
  kBarBReady = 2,  // m_B, s_B and P_B are in smem (WG1 -> WG0)
  kBarZero = 3,    // the V tails of the pair's pages are zeroed (only where a page has rows past seqlen)
};

template <typename T>
struct alignas(1024) SeesawStorage {
  alignas(1024) T q[kBlockM * kHeadDimK];
  alignas(1024) T k[2][kPageSize * kHeadDimK];
  float m_a[kBlockM];         // running max (log2 domain) after page A of the pair (WG0 -> WG1)
  float s_a[kBlockM];         // rescale of earlier state by page A
  float m_b[kBlockM];         // running max after page B (WG1 -> WG0)
  float s_b[kBlockM];         // rescale by page B
  float row_sum[2][kBlockM];  // per-warpgroup softmax denominators, summed in the epilogue
  uint64_t kbar[2][2];        // [buffer][box group]: completes when that group of the buffer's page landed
};

// Box `i` of group `grp` of buffer `buf` (see the refill table at the top of this file). Buffer 1's groups
// are in the order Q K^T of page B waits for them: 4-7 first (usually refilled first), then 0-3 and 8.
__device__ __forceinline__ int group_box(int buf, int grp, int i) {
  if (buf == 0) return grp == 0 ? i : 4 + i;
  return grp == 0 ? 4 + i : (i < 4 ? i : kPBox);
}
__device__ __forceinline__ int group_boxes(int grp) {
  return grp == 0 ? 4 : 5;
}

// One thread: copy one box group of `page` (kv head h_k) into buffer `buf` with TMA, completing on the
// group's mbarrier, or, for page < 0, just complete the barrier's phase (nothing to read; the consumer
// zero-fills the V rows instead).
__device__ __forceinline__ void issue_group(const DecodeParams& p, void* buf_base, uint64_t* bar, int buf,
                                            int grp, int h_k, int page) {
  if (page < 0) {
    mbar_arrive(bar);
    return;
  }
  constexpr int kTileBytes = kBoxElems * 2;
  const int n = group_boxes(grp);
  mbar_arrive_expect_tx(bar, kTileBytes * n);
  for (int i = 0; i < n; ++i) {
    const int box = group_box(buf, grp, i);
    tma_load_box(p, static_cast<char*>(buf_base) + box * kTileBytes, bar, box * kBoxCols, h_k, page, true);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_seesaw_kernel(const __grid_constant__ DecodeParams p) {
  using Tr = Traits<T>;
  using P2 = typename Pack2<T>::type;
  extern __shared__ __align__(1024) char smem_raw[];
  SeesawStorage<T>& smem = *reinterpret_cast<SeesawStorage<T>*>(smem_raw);

  const int m_block = blockIdx.x, h_k = blockIdx.y, part = blockIdx.z;
  FMLA_TRACE_ENTRY();
  const PartWork pw = part_work(p, part);
  // Let the combine kernel (launched with PDL) start launching now; it waits (griddepcontrol.wait) for this
  // grid to complete before it reads any partial result.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  if (pw.end_req < pw.begin_req) {  // a part with no work
    FMLA_TRACE_EXIT();
    return;
  }

  // Broadcast from lane 0 so the compiler knows the warpgroup index is warp-uniform; otherwise it treats the
  // role branches as divergent and serialises every wgmma (ptxas C7518).
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
  const int wtid = threadIdx.x % 128;
  const int lane = threadIdx.x % 32;
  const int quad_col = 2 * (lane % 4);
  // The wgmma accumulator gives each thread rows r0 and r0 + 8 of the 64-row tile; value index
  // c + 2 * r + 4 * j holds (row r0 + 8 r, column 8 j + quad_col + c) (checked against CuTe's partition_C).
  // Both warpgroups use the same thread -> row map, so row statistics pass between thread t of one
  // warpgroup and thread t of the other.
  const int r0 = (wtid / 32) * 16 + lane / 4;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) mbar_init(&smem.kbar[i / 2][i % 2], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_k) : "memory");
  }
  __syncthreads();
  // Bit 2 * buf + grp: parity of the next phase of kbar[buf][grp] this thread waits for. Each warpgroup waits
  // once for every fill of each group it reads, so its parities stay in step with the fills.
  uint32_t kphase = 0;
  FMLA_PAIR_DECL();  // diagnostic builds only: index of the page pair being stamped (seg_trace.cuh)
  auto wait_group = [&](int buf, int grp) FMLA_INLINE {
    const int bit = 2 * buf + grp;
    mbar_wait(&smem.kbar[buf][grp], (kphase >> bit) & 1);
    kphase ^= 1u << bit;
  };

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Tr::SmemLayoutQK{});
  Tensor sK0 = make_tensor(make_smem_ptr(smem.k[0]), typename Tr::SmemLayoutQK{});
  Tensor sK1 = make_tensor(make_smem_ptr(smem.k[1]), typename Tr::SmemLayoutQK{});
  const auto v_tile = Shape<Int<kHeadDimV / 2>, Int<kPageSize>>{};

  typename Tr::MmaQK mma_qk;
  typename Tr::MmaPV mma_pv;
  typename Tr::MmaPVrs mma_pv_rs;
  auto thr_qk = mma_qk.get_thread_slice(wtid);
  auto thr_pv = mma_pv.get_thread_slice(wtid);
  auto thr_pv_rs = mma_pv_rs.get_thread_slice(wtid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kPageSize>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDimV / 2>>{});
  // P of the warpgroup's own page as the register A operand of P V. Its value order is the accumulator's
  // (for 16-bit types the m64k16 A fragment holds the same (row, column) pairs as two 8-column groups of the
  // m64n64 accumulator), so the conversion is element-wise.
  Tensor tOrPrs = thr_pv_rs.partition_fragment_A(
      make_tensor(make_smem_ptr(smem.k[0] + kPBox * kBoxElems), typename Tr::SmemLayoutP{}));
  static_assert(decltype(size(tOrPrs))::value == decltype(size(tSrS))::value);

  auto p_box = [&](int buf) FMLA_INLINE {
    return make_tensor(make_smem_ptr(smem.k[buf] + kPBox * kBoxElems), typename Tr::SmemLayoutP{});
  };
  // S (+)= Q K^T over boxes [kFirst, kFirst + kN) of buffer `buf`, committed as one wgmma group.
  auto issue_qk = [&](int buf, auto first_c, auto n_c, auto zero_c) FMLA_INLINE {
    constexpr int kFirst = decltype(first_c)::value, kN = decltype(n_c)::value;
    constexpr bool kZero = decltype(zero_c)::value;
    // A runtime buffer pointer only changes the descriptors' start address: no branch around the wgmmas.
    Tensor tSrK =
        thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(smem.k[buf]), typename Tr::SmemLayoutQK{}));
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 4 * kFirst; kb < 4 * (kFirst + kN); ++kb) {
      mma_qk.accumulate_ = (kZero && kb == 4 * kFirst) ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
      cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
    }
    warpgroup_commit_batch();
  };
  // Q K^T of a whole page, each box group waited for just before its first wgmma (WG0 reads buffer 0 in box
  // order; WG1 reads buffer 1 in the order its groups are refilled). Ends with nothing in flight.
  auto qk_page = [&](int buf) FMLA_INLINE {
    if (buf == 0) {
      wait_group(0, 0);
      issue_qk(0, Int<0>{}, Int<4>{}, std::true_type{});
      wait_group(0, 1);
      issue_qk(0, Int<4>{}, Int<5>{}, std::false_type{});
    } else {
      wait_group(1, 0);
      FMLA_PAIR_STAMP(7);
      issue_qk(1, Int<4>{}, Int<4>{}, std::true_type{});
      wait_group(1, 1);
      FMLA_PAIR_STAMP(8);
      issue_qk(1, Int<0>{}, Int<4>{}, std::false_type{});
      issue_qk(1, Int<8>{}, Int<1>{}, std::false_type{});
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    if (buf == 1) FMLA_PAIR_STAMP(9);
  };
  // O[:, this warpgroup's half] += P V of buffer `buf`; P from registers (own page) or from the buffer's P
  // box (the other warpgroup's page). Committed as one group, not waited for.
  auto issue_pv_rs = [&](int buf) FMLA_INLINE {
    Tensor sVt = make_tensor(make_smem_ptr(smem.k[buf]), typename Tr::SmemLayoutVt{});
    Tensor tOrV = thr_pv_rs.partition_fragment_B(local_tile(sVt, v_tile, make_coord(wg, _0{})));
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(tOrPrs);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tOrPrs); ++kb) {
      cute::gemm(mma_pv_rs, tOrPrs(_, _, kb), tOrV(_, _, kb), tOrO);
    }
    warpgroup_commit_batch();
  };
  auto issue_pv_ss = [&](int buf) FMLA_INLINE {
    Tensor sVt = make_tensor(make_smem_ptr(smem.k[buf]), typename Tr::SmemLayoutVt{});
    Tensor tOrV = thr_pv.partition_fragment_B(local_tile(sVt, v_tile, make_coord(wg, _0{})));
    Tensor tOrP = thr_pv.partition_fragment_A(p_box(buf));
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
    }
    warpgroup_commit_batch();
  };
  // P (fp32 in tSrS) -> the register A operand; those packed values -> the P box of buffer `buf`, for the
  // other warpgroup (32-bit pairs: values c = 0, 1 are adjacent columns of one row, and the swizzle moves
  // whole 16-byte chunks).
  auto p_to_regs = [&]() FMLA_INLINE {
    P2* d = reinterpret_cast<P2*>(raw_pointer_cast(tOrPrs.data()));
#pragma unroll
    for (int i = 0; i < size(tSrS); i += 2) d[i / 2] = Pack2<T>::make(tSrS(i), tSrS(i + 1));
  };
  auto store_p_regs = [&](int buf) FMLA_INLINE {
    Tensor tSsP = thr_qk.partition_C(p_box(buf));
    const P2* d = reinterpret_cast<const P2*>(raw_pointer_cast(tOrPrs.data()));
#pragma unroll
    for (int i = 0; i < size(tSrS); i += 2) *reinterpret_cast<P2*>(&tSsP(i)) = d[i / 2];
  };
  // O *= per-row scale. Once the running max settles most pages leave it unchanged (scale == 1): skip the
  // 128 multiplies per thread when that holds for the whole warp (a warp-uniform branch).
  auto rescale_o = [&](float s0, float s1) FMLA_INLINE {
    if (!__all_sync(0xffffffffu, s0 == 1.f && s1 == 1.f)) {
#pragma unroll
      for (int j = 0; j < kHeadDimV / 2 / 8; ++j) {
        tOrO(4 * j) *= s0;
        tOrO(1 + 4 * j) *= s0;
        tOrO(2 + 4 * j) *= s1;
        tOrO(3 + 4 * j) *= s1;
      }
    }
  };

  // Loads of a segment's Q (cp.async, all threads) and first two pages (thread 0). Q first: thread 0's page
  // lookups are dependent loads, and its warp's share of Q would otherwise wait behind them. The next
  // segment's loads are issued as soon as this segment's page loop is done (Q and both page buffers are free
  // then), so they land while this segment's epilogue runs.
  bool lookup_bad = false;  // thread 0's page lookups of the segment being loaded found an invalid page id
  auto start_segment = [&](int req, const RequestWork& ws) FMLA_INLINE {
    load_q<T>(p, sQ, req, h_k, m_block);
    cp_async_commit();
    if (threadIdx.x == 0 && ws.blk_begin < ws.blk_end) {
      const int pa = block_page(p, req, ws.blk_begin, ws.seqlen_safe, lookup_bad);
      issue_group(p, smem.k[0], &smem.kbar[0][0], 0, 0, h_k, pa);
      issue_group(p, smem.k[0], &smem.kbar[0][1], 0, 1, h_k, pa);
      if (ws.blk_begin + 1 < ws.blk_end) {
        const int pb = block_page(p, req, ws.blk_begin + 1, ws.seqlen_safe, lookup_bad);
        issue_group(p, smem.k[1], &smem.kbar[1][0], 1, 0, h_k, pb);
        issue_group(p, smem.k[1], &smem.kbar[1][1], 1, 1, h_k, pb);
      }
    }
  };

  RequestWork w = request_work(p, pw, pw.begin_req, pw.begin_blk);
  start_segment(pw.begin_req, w);
  // One iteration per segment: a request's blocks in the part, or one chunk of them (batch-invariant).
  [[maybe_unused]] int seg = 0;  // segment index, for the diagnostic trace
  for (int req = pw.begin_req;; ++seg) {
    FMLA_TRACE_STAMP(seg, kStampSegStart, w.blk_end - w.blk_begin);
    bool bad = w.bad || lookup_bad;  // may also be set by the page lookups below
    lookup_bad = false;
    int limit[2];
    row_limits(p, w.seqlen_safe, m_block, r0, limit);
    cp_async_wait<0>();
    fence_async_proxy();
    __syncthreads();
    FMLA_TRACE_STAMP(seg, kStampReady);

    float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of every page seen so far
    float l_run[2] = {0.f, 0.f};              // this thread's share of the softmax denominator
    clear(tOrO);
    if (wg == 0 && w.blk_begin < w.blk_end) {
      qk_page(0);
      FMLA_TRACE_STAMP(seg, kStampFirstS);
    } else if (wg == 1 && w.blk_begin + 1 < w.blk_end) {
      qk_page(1);
    }

    // Masks, scales and exponentiates S of block `blk` in place against the running max m (updated to include
    // this page); returns the per-row rescale of earlier state in sc and this thread's row sums in sum. It
    // runs twice per pair on the critical path (WG1's softmax waits for WG0's max), so it is kept short: the
    // per-element mask only where some row of the warp ends inside this page (the sequence end, causal MTP),
    // and ex2.approx.ftz (exp2f adds denormal handling to every element; p < 2^-126 flushing to 0 is
    // harmless).
    auto softmax = [&](int blk, float (&m)[2], float (&sc)[2], float (&sum)[2]) FMLA_INLINE {
      const int col0 = blk * kPageSize;
      // 64-bit: col0 + 64 overflows int32 on the last page of a ~2^31-token (invalid, NaN-flagged) request.
      const bool need_mask =
          __any_sync(0xffffffffu, static_cast<int64_t>(col0) + kPageSize > min(limit[0], limit[1]));
      if (need_mask) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int lim = limit[r] - col0;  // columns < lim are visible
#pragma unroll
          for (int j = 0; j < kPageSize / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int idx = c + 2 * r + 4 * j;
              tSrS(idx) = (8 * j + quad_col + c < lim) ? tSrS(idx) * p.scale_log2 : -INFINITY;
            }
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < size(tSrS); ++i) tSrS(i) *= p.scale_log2;
      }
      // Both rows' maxima as trees (depth 4 instead of a 16-long chain), their quad shuffles interleaved:
      // this softmax is on the pair's critical path, and its latency is dependency chains, not issue slots.
      float mx[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float t[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) t[j] = fmaxf(tSrS(2 * r + 4 * j), tSrS(1 + 2 * r + 4 * j));
#pragma unroll
        for (int k = 0; k < 4; ++k) t[k] = fmaxf(t[k], t[k + 4]);
        mx[r] = fmaxf(fmaxf(t[0], t[2]), fmaxf(t[1], t[3]));
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
#pragma unroll
      for (int r = 0; r < 2; ++r) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = next_running_max(m[r], mx[r]);
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep exp2 finite
        sc[r] = exp2_ftz(m[r] - m_use[r]);
        m[r] = m_new;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float s4[4] = {0.f, 0.f, 0.f, 0.f};  // four partial sums: a 4-long chain instead of 16
#pragma unroll
        for (int j = 0; j < kPageSize / 8; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int idx = c + 2 * r + 4 * j;
            const float e = exp2_ftz(tSrS(idx) - m_use[r]);
            tSrS(idx) = e;
            s4[(2 * j + c) % 4] += e;
          }
        }
        sum[r] = (s4[0] + s4[1]) + (s4[2] + s4[3]);
      }
    };

    // The running max after a page and its rescale factor, handed between the warpgroups through smem (one
    // writer per row: lane 0 of each quad).
    auto publish_stats = [&](float* m_dst, float* s_dst, const float (&sc)[2]) FMLA_INLINE {
      if (lane % 4 == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          m_dst[r0 + 8 * r] = m_run[r];
          s_dst[r0 + 8 * r] = sc[r];
        }
      }
    };
    auto take_stats = [&](const float* m_src, const float* s_src, float (&sc)[2]) FMLA_INLINE {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sc[r] = s_src[r0 + 8 * r];
        m_run[r] = m_src[r0 + 8 * r];
      }
    };

    // One pair of pages: A = block blk in buffer 0, B = block blk + 1 in buffer 1 (kHasB: B exists). On entry
    // S_A (WG0) and S_B (WG1, if B exists) are computed; on exit the next pair's are, and nothing is in
    // flight.
    auto pair = [&](int blk, auto has_b_c) FMLA_INLINE {
      constexpr bool kHasB = decltype(has_b_c)::value;
      const bool next_a = kHasB && blk + 2 < w.blk_end;
      const bool next_b = kHasB && blk + 3 < w.blk_end;
      // The refilling threads (thread 0 of each warpgroup) look the next page ids up now, so they are in a
      // register when the buffers free.
      int page_a = -1, page_b = -1;
      if (wtid == 0) {
        if (next_a) page_a = block_page(p, req, blk + 2, w.seqlen_safe, bad);
        if (next_b) page_b = block_page(p, req, blk + 3, w.seqlen_safe, bad);
      }
      // Rows past seqlen of a page hold stale data or NaN: zero their V part before any P V reads it (WG0 for
      // A, WG1 for B; both Q K^T are done). The lengths depend on w.seqlen_safe only, never on the lookup
      // thread's `bad` flag, so the test is CTA-uniform and the barrier after it is reached by every thread.
      const int valid_a = block_tokens(w.seqlen_safe, blk);
      const int valid_b = kHasB ? block_tokens(w.seqlen_safe, blk + 1) : kPageSize;
      if (valid_a < kPageSize || valid_b < kPageSize) {
        if (wg == 0 && valid_a < kPageSize) zero_v_tail(sK0, valid_a, wtid);
        if (wg == 1 && valid_b < kPageSize) zero_v_tail(sK1, valid_b, wtid);
        fence_async_proxy();
        named_barrier_sync(kBarZero, kThreads);
      }
      float sc[2], sum[2];
      FMLA_PAIR_STAMP(0);
      if (wg == 0) {
        softmax(blk, m_run, sc, sum);
        publish_stats(smem.m_a, smem.s_a, sc);
        rescale_o(sc[0], sc[1]);
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * sc[r] + sum[r];
        // P_A goes out with the max: WG1 starts its P_A V_A[R] right after the barrier, under its own
        // softmax, instead of after both softmaxes.
        p_to_regs();
        store_p_regs(0);
        fence_async_proxy();
        FMLA_PAIR_STAMP(1);
        named_barrier_sync(kBarAReady, kThreads);
        FMLA_PAIR_STAMP(2);
        issue_pv_rs(0);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        FMLA_PAIR_STAMP(3);
        // V_A[L] is consumed: boxes 0-3 of buffer 0 take the next A while WG1 still runs its softmax.
        if (wtid == 0 && next_a) issue_group(p, smem.k[0], &smem.kbar[0][0], 0, 0, h_k, page_a);
        if constexpr (kHasB) {
          named_barrier_sync(kBarBReady, kThreads);
          FMLA_PAIR_STAMP(4);
          float sb[2];
          take_stats(smem.m_b, smem.s_b, sb);
          // O_L and the denominator to the max after B, then P_B (against that max) V_B[L].
          rescale_o(sb[0], sb[1]);
#pragma unroll
          for (int r = 0; r < 2; ++r) l_run[r] *= sb[r];
          wait_group(1, 1);
          FMLA_PAIR_STAMP(5);
          issue_pv_ss(1);
          if (next_a) {
            // Q K^T of the next A starts on its first boxes (refilled above) while P_B V_B[L] runs.
            wait_group(0, 0);
            FMLA_PAIR_STAMP(6);
            issue_qk(0, Int<0>{}, Int<4>{}, std::true_type{});
            warpgroup_wait<1>();
            warpgroup_fence_operand(tOrO);
            FMLA_PAIR_STAMP(7);
            // V_B[L] and P_B are consumed: boxes 0-3 and 8 of buffer 1 take the next B.
            if (wtid == 0 && next_b) issue_group(p, smem.k[1], &smem.kbar[1][1], 1, 1, h_k, page_b);
            wait_group(0, 1);
            FMLA_PAIR_STAMP(8);
            issue_qk(0, Int<4>{}, Int<5>{}, std::false_type{});
            warpgroup_wait<0>();
            warpgroup_fence_operand(tSrS);
            FMLA_PAIR_STAMP(9);
          } else {
            warpgroup_wait<0>();
            warpgroup_fence_operand(tOrO);
          }
        }
      } else {
        named_barrier_sync(kBarAReady, kThreads);
        FMLA_PAIR_STAMP(1);
        float sa[2];
        take_stats(smem.m_a, smem.s_a, sa);
        // O_R and the denominator to the max after A, then P_A (against that max) V_A[R].
        rescale_o(sa[0], sa[1]);
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[r] *= sa[r];
        wait_group(0, 1);
        FMLA_PAIR_STAMP(2);
        issue_pv_ss(0);
        if constexpr (kHasB) {
          // The softmax of B runs on the CUDA cores while P_A V_A[R] is on the tensor cores (it touches S and
          // the P registers only, not O).
          softmax(blk + 1, m_run, sc, sum);
          publish_stats(smem.m_b, smem.s_b, sc);
          p_to_regs();
          store_p_regs(1);
          fence_async_proxy();
          FMLA_PAIR_STAMP(3);
          named_barrier_sync(kBarBReady, kThreads);
          FMLA_PAIR_STAMP(4);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          FMLA_PAIR_STAMP(5);
          // V_A[R] and P_A are consumed: boxes 4-8 of buffer 0 take the next A.
          if (wtid == 0 && next_a) issue_group(p, smem.k[0], &smem.kbar[0][1], 0, 1, h_k, page_a);
          rescale_o(sc[0], sc[1]);
#pragma unroll
          for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * sc[r] + sum[r];
          issue_pv_rs(1);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          FMLA_PAIR_STAMP(6);
          // V_B[R] is consumed: boxes 4-7 of buffer 1 take the next B.
          if (wtid == 0 && next_b) issue_group(p, smem.k[1], &smem.kbar[1][0], 1, 0, h_k, page_b);
          if (next_b) qk_page(1);
        } else {
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
        }
      }
      FMLA_PAIR_NEXT();
    };
    for (int blk = w.blk_begin; blk < w.blk_end; blk += 2) {
      if (blk + 1 < w.blk_end) {
        pair(blk, std::true_type{});
      } else {
        pair(blk, std::false_type{});
      }
    }
    // The refilling threads may have flagged an invalid page id while looking pages up: share the flag.
    FMLA_TRACE_STAMP(seg, kStampLoopEnd);
    bad = __syncthreads_or(bad ? 1 : 0) != 0;
    FMLA_TRACE_STAMP(seg, kStampJoined);
    RequestWork w_next = w;
    int req_next = req;
    const bool more = next_segment(p, pw, req, w, req_next, w_next);
    if (more) start_segment(req_next, w_next);

    // ---- epilogue: both warpgroups end with the same running max; add their denominators through smem.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (lane % 4 == 0) smem.row_sum[wg][r0 + 8 * r] = l;
    }
    __syncthreads();

    float l_row[2], m_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_row[r] = smem.row_sum[0][r0 + 8 * r] + smem.row_sum[1][r0 + 8 * r];
      m_row[r] = m_run[r];
    }
    write_rows<T>(p, tOrO, w, req, h_k, m_block, r0, wg, quad_col, lane, l_row, m_row, bad);
    // No barrier here: the next segment's opening __syncthreads orders these reads of the statistics before
    // anything rewrites them (its Q and pages were issued before this epilogue, into buffers it does not
    // read).
    FMLA_TRACE_STAMP(seg, kStampSegEnd);
    if (!more) break;
    req = req_next;
    w = w_next;
  }
  FMLA_TRACE_EXIT();
}

}  // namespace flashmla::sm90
