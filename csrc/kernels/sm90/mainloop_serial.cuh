// Split-KV MLA decode main kernel for Hopper (sm_90a), serial-softmax variant: wgmma on the tensor cores, TMA
// page pipeline. Used when the request has one 64-row tile per kv head (h_q * s_q / h_kv <= 64: the
// memory-bound shapes), where it keeps one page more in flight than the seesaw loop (mainloop_seesaw.cuh) and
// measured ~3 % faster; with two or more tiles the seesaw loop is faster (benchmarks/NOTES.md, v3.3).
//
// Work: CTA (m_block, h_k, part) processes the 64 query rows [m_block*64, m_block*64 + 64) of kv head h_k
// (rows pack MTP tokens and the query heads sharing the kv head: row = s_idx * (h_q/h_kv) + head) for every
// (request, block) range the scheduler gave `part`. One 64-token page is one N tile, so paging costs nothing
// inside a tile: the page id is looked up once per tile and becomes the 4th TMA coordinate.
//
// Roles (256 threads = 2 warpgroups, 1 CTA per SM):
//   thread 0     issues the TMA copies of a page (nine 64x64 boxes, one mbarrier per K buffer); two pages are
//                in flight, and a buffer is refilled as soon as both warpgroups finished reading it;
//   warpgroup 0  S = Q K^T (64x64x576 wgmma, both operands K-major in 128B-swizzled smem), mask, online
//                softmax in the log2 domain, writes P (bf16/fp16) and the per-row rescale factor to smem;
//   both WGs     O[:, half] = O[:, half] * scale + P V[:, half]: each warpgroup owns one 64x256 fp32 half of
//                O (128 registers per thread; the whole 64x512 O would be half the register file), and reads
//                V as an MN-major view of the same smem K tile (V = the first 512 columns of K), so the cache
//                is read from HBM once for both GEMMs.
//   Software pipelining: warpgroup 0 issues Q K^T of page j+1 right behind its P V of page j, so the tensor
//   cores run P V(j) and Q K^T(j+1) back to back; only the softmax of j+1 leaves them idle.
//
// Correctness rules this file keeps (see docs/architecture.md):
//   * V rows past seqlen (the tail of a request's last page, where stale data or NaN may sit) are zeroed in
//     smem after the copy lands: P = 0 there does not help, because 0 * NaN = NaN in the MMA. Their logits
//     are masked by index, never by value. Pages past the end are never copied and block_table entries past
//     the last page are never read;
//   * masked logits are -inf and the running max is guarded, so a row with no visible key ends with L = 0 and
//     writes out 0 / lse +inf (or an empty partial with lse -inf);
//   * shared memory written by ordinary stores (P, zero fill, cp.async'd Q) and read by wgmma (async
//     proxy) is fenced with fence.proxy.async before the barrier that publishes it;
//   * a request whose seqlen is negative, needs more pages than block_table has columns, or names a page id
//     outside the cache is never dereferenced out of bounds: its output rows become NaN instead.
#pragma once

#include "kernels/sm90/common.cuh"
#include "kernels/sm90/dequant_fp8.cuh"

namespace flashmla::sm90 {

// FP8 caches only: warpgroup 1 expands each landed FP8 page in place (dequant_fp8.cuh) and then arrives on
// the buffer's cbar; warpgroup 0 waits for that instead of the copy. V3.2's per-token scales land in
// `scales`.
template <int kFmt>
struct SerialFp8Storage {
  uint64_t cbar[2];
  alignas(128) float scales[2][kPageSize * 4];
};
template <>
struct SerialFp8Storage<kKvNative> {};

template <typename T, int kFmt = kKvNative>
struct alignas(1024) SerialStorage {
  alignas(1024) T q[kBlockM * kHeadDimK];
  alignas(1024) T k[2][kPageSize * kHeadDimK];
  alignas(1024) T p[kBlockM * kPageSize];
  float scale[kBlockM];    // per-row rescale of O for the current page (WG0 -> WG1)
  float row_max[kBlockM];  // final running max (log2 domain) per row
  float row_sum[kBlockM];  // final softmax denominator per row
  uint64_t kbar[2];        // one mbarrier per K buffer: completes when that buffer's page has landed
  SerialFp8Storage<kFmt> fp8;
};

// Thread 0: copy `page` (kv head h_k) into a K buffer with nine 64x64 TMA boxes completing on `bar`, or, for
// page < 0, just complete the barrier's phase (the consumer zero-fills the buffer's V rows instead).
__device__ __forceinline__ void issue_page(const DecodeParams& p, void* dst, uint64_t* bar, int h_k, int page,
                                           bool evict_first) {
  if (page < 0) {
    mbar_arrive(bar);
    return;
  }
  constexpr int kTileBytes = kPageSize * 64 * 2;
  mbar_arrive_expect_tx(bar, kTileBytes * (kHeadDimK / 64));
#pragma unroll
  for (int j = 0; j < kHeadDimK / 64; ++j) {
    tma_load_box(p, static_cast<char*>(dst) + j * kTileBytes, bar, j * 64, h_k, page, evict_first);
  }
}

// kFmt: the cache format (KvFormat). For an FP8 cache T is q's dtype, the dtype of the dequantised tile and
// of every wgmma; the per-tensor k_scale multiplies the logits (folded into the softmax scale) and the
// output.
template <typename T, int kFmt = kKvNative>
__global__ void __launch_bounds__(kThreads, 1) decode_serial_kernel(const __grid_constant__ DecodeParams p) {
  using Tr = Traits<T>;
  constexpr bool kFp8 = kFmt != kKvNative;
  static_assert(kFmt != kKvFp8V32 || std::is_same_v<T, cutlass::bfloat16_t>, "V3.2 FP8 takes bf16 q only");
  extern __shared__ __align__(1024) char smem_raw[];
  SerialStorage<T, kFmt>& smem = *reinterpret_cast<SerialStorage<T, kFmt>*>(smem_raw);

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
  const int r0 = (wtid / 32) * 16 + lane / 4;

  // Pages get the L2 evict-first hint only where the call leaves split partials for the combine to read
  // (tma_load_box says why); num_splits[b] counts them, written by get_mla_metadata before this kernel.
  const bool evict_first = p.num_splits[p.b] > 0;

  // The per-tensor FP8 scale: the logits and the output are linear in it.
  float scale_log2 = p.scale_log2, out_scale = 1.f;
  if constexpr (kFmt == kKvFp8Tensor) {
    out_scale = *p.k_scale;
    scale_log2 *= out_scale;
  }

  if (threadIdx.x == 0) {
    mbar_init(&smem.kbar[0], 1);
    mbar_init(&smem.kbar[1], 1);
    if constexpr (kFp8) {
      mbar_init(&smem.fp8.cbar[0], 128);
      mbar_init(&smem.fp8.cbar[1], 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_k) : "memory");
    if constexpr (kFmt == kKvFp8V32) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_rope) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(&p.tma_scale) : "memory");
    }
  }
  __syncthreads();
  // bit b: parity of the next phase of kbar[b] this thread waits for (of cbar[b] for warpgroup 0 with FP8)
  uint32_t kphase = 0;
  // Wait for buffer `buf` to be readable by wgmma: its copy landed (dense) or was expanded (FP8).
  auto wait_ready = [&](int buf) {
    uint64_t* bar = &smem.kbar[buf];
    if constexpr (kFp8) bar = &smem.fp8.cbar[buf];
    mbar_wait(bar, (kphase >> buf) & 1);
    kphase ^= 1u << buf;
  };
  // FP8, warpgroup 1: wait for the copy into buffer `buf`, expand it in place, publish it on cbar[buf].
  auto expand = [&](int buf) {
    if constexpr (kFp8) {
      mbar_wait(&smem.kbar[buf], (kphase >> buf) & 1);
      kphase ^= 1u << buf;
      convert_page_fp8<T, kFmt>(reinterpret_cast<char*>(smem.k[buf]), smem.fp8.scales[buf], wtid);
      fence_async_proxy();  // ordinary stores, read by wgmma (async proxy)
      mbar_arrive(&smem.fp8.cbar[buf]);
    }
  };
  auto issue = [&](int buf, int page) {
    if constexpr (kFp8) {
      issue_page_fp8<kFmt>(p, reinterpret_cast<char*>(smem.k[buf]), smem.fp8.scales[buf], &smem.kbar[buf],
                           h_k, page, evict_first);
    } else {
      issue_page(p, smem.k[buf], &smem.kbar[buf], h_k, page, evict_first);
    }
  };

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Tr::SmemLayoutQK{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p), typename Tr::SmemLayoutP{});
  Tensor sK0 = make_tensor(make_smem_ptr(smem.k[0]), typename Tr::SmemLayoutQK{});
  Tensor sK1 = make_tensor(make_smem_ptr(smem.k[1]), typename Tr::SmemLayoutQK{});
  const auto v_tile = Shape<Int<kHeadDimV / 2>, Int<kPageSize>>{};

  typename Tr::MmaQK mma_qk;
  typename Tr::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(wtid);
  auto thr_pv = mma_pv.get_thread_slice(wtid);
  Tensor tSsP = thr_qk.partition_C(sP);  // where this thread's S/P values live in sP
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tOrP = thr_pv.partition_fragment_A(sP);
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDimV / 2>>{});
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kPageSize>>{});

  // S = Q K^T for the page in buffer `buf` (warpgroup 0), committed as one wgmma group, not waited for.
  auto issue_qk = [&](int buf) {
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    // A runtime buffer pointer only changes the descriptors' start address: no branch around the wgmmas.
    Tensor tSrK =
        thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(smem.k[buf]), typename Tr::SmemLayoutQK{}));
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };

  // Loads of a segment's Q (cp.async, all threads) and first two pages (thread 0). Q first: thread 0's page
  // lookups are dependent loads, and its warp's share of Q would otherwise wait behind them. The next
  // segment's loads are issued as soon as this segment's page loop is done (Q and both page buffers are free
  // then), so they land while this segment's epilogue runs.
  bool lookup_bad = false;  // thread 0's page lookups of the segment being loaded found an invalid page id
  auto start_segment = [&](int req, const RequestWork& ws) {
    load_q<T>(p, sQ, req, h_k, m_block);
    cp_async_commit();
    // An empty segment (only with metadata from a call with longer lengths: a part starting past the end of
    // its first request) loads no page: its first page would complete a phase of kbar[0] that warpgroup 0
    // waits for and warpgroup 1 never does, and their parities would drift apart for the part's later
    // segments.
    if (threadIdx.x == 0 && ws.blk_begin < ws.blk_end) {
      issue(0, block_page(p, req, ws.blk_begin, ws.seqlen_safe, lookup_bad));
      if (ws.blk_begin + 1 < ws.blk_end)
        issue(1, block_page(p, req, ws.blk_begin + 1, ws.seqlen_safe, lookup_bad));
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

    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    clear(tOrO);
    if (kFp8 && wg == 1 && w.blk_begin < w.blk_end) expand(0);
    if (wg == 0 && w.blk_begin < w.blk_end) {
      wait_ready(0);
      issue_qk(0);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
    }
    FMLA_TRACE_STAMP(seg, kStampFirstS);

    for (int blk = w.blk_begin; blk < w.blk_end; ++blk) {
      const int buf = (blk - w.blk_begin) & 1;
      const bool has_next = blk + 1 < w.blk_end;
      // Thread 0 looks the page id of block blk+2 up now, so it is in a register when the buffer frees.
      int next_page = -1;
      if (threadIdx.x == 0 && blk + 2 < w.blk_end)
        next_page = block_page(p, req, blk + 2, w.seqlen_safe, bad);

      if (wg == 0) {
        const int col0 = blk * kPageSize;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int lim = limit[r] - col0;  // columns < lim are visible
          float mx = -INFINITY;
#pragma unroll
          for (int j = 0; j < kPageSize / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int idx = c + 2 * r + 4 * j;
              const float v = (8 * j + quad_col + c < lim) ? tSrS(idx) * scale_log2 : -INFINITY;
              tSrS(idx) = v;
              mx = fmaxf(mx, v);
            }
          }
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = next_running_max(m_run[r], mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep exp2 finite
          const float sc = exp2f(m_run[r] - m_use);
          m_run[r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < kPageSize / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int idx = c + 2 * r + 4 * j;
              const float e = exp2f(tSrS(idx) - m_use);
              tSrS(idx) = e;
              sum += e;
            }
          }
          l_run[r] = l_run[r] * sc + sum;
          if (lane % 4 == 0) smem.scale[r0 + 8 * r] = sc;
        }
        // Values c = 0, 1 of a pair are adjacent columns of one row (the swizzle moves whole 16-byte chunks),
        // so P goes to smem as 32-bit pairs.
#pragma unroll
        for (int i = 0; i < size(tSrS); i += 2) {
          *reinterpret_cast<typename Pack2<T>::type*>(&tSsP(i)) = Pack2<T>::make(tSrS(i), tSrS(i + 1));
        }
        // Rows past seqlen of this page hold stale data or NaN: zero their V part before P V reads it.
        // Warpgroup 0 does it, after its Q K^T of this page completed (no wgmma reads the buffer now).
        const int valid = bad ? 0 : block_tokens(w.seqlen_safe, blk);
        if (valid < kPageSize) {
          if (buf == 0) {
            zero_v_tail(sK0, valid, wtid);
          } else {
            zero_v_tail(sK1, valid, wtid);
          }
        }
        fence_async_proxy();  // P and the zero fill were written by ordinary stores and are read by wgmma
      }
      __syncthreads();  // P, the scales and this page's V are published

      {
        // Once the running max settles, most pages leave it unchanged (scale == 1): skip the 128 multiplies
        // per thread when that holds for the whole warp (a warp-uniform branch, no divergence).
        const float sc0 = smem.scale[r0], sc1 = smem.scale[r0 + 8];
        if (!__all_sync(0xffffffffu, sc0 == 1.f && sc1 == 1.f)) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float sc = r == 0 ? sc0 : sc1;
#pragma unroll
            for (int j = 0; j < kHeadDimV / 2 / 8; ++j) {
              tOrO(2 * r + 4 * j) *= sc;
              tOrO(1 + 2 * r + 4 * j) *= sc;
            }
          }
        }
      }
      if (!kFp8 && wg == 1) {
        // The copy's completion is observed by warpgroup 1 too before its wgmma reads the buffer (with FP8,
        // warpgroup 1 expanded the buffer itself).
        mbar_wait(&smem.kbar[buf], (kphase >> buf) & 1);
        kphase ^= 1u << buf;
      }
      Tensor sVt = make_tensor(make_smem_ptr(smem.k[buf]), typename Tr::SmemLayoutVt{});
      Tensor tOrV = thr_pv.partition_fragment_B(local_tile(sVt, v_tile, make_coord(wg, _0{})));
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < size<2>(tOrP); ++kb) {
        cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
      }
      warpgroup_commit_batch();
      // FP8: warpgroup 1 expands the next page while this P V runs on the tensor cores; warpgroup 0's
      // Q K^T of it waits for that below.
      if (kFp8 && wg == 1 && has_next) expand(buf ^ 1);
      // Each branch below is straight-line wgmma code ending with nothing in flight, so ptxas can see that
      // no accumulator is touched while a wgmma may still write it (otherwise it serialises them, C7515).
      if (wg == 0 && has_next) {
        // Q K^T of the next page goes to the tensor cores right behind this P V.
        wait_ready(buf ^ 1);
        issue_qk(buf ^ 1);
        warpgroup_wait<1>();  // this page's P V is done; the next Q K^T may still run
        warpgroup_fence_operand(tOrO);
        named_barrier_sync(1, kThreads);  // both P V done: sP and this K buffer may be overwritten
        if (threadIdx.x == 0 && blk + 2 < w.blk_end) issue(buf, next_page);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
      } else {
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        named_barrier_sync(1, kThreads);
        if (threadIdx.x == 0 && blk + 2 < w.blk_end) issue(buf, next_page);
      }
    }
    // Thread 0 may have flagged an invalid page id while looking pages up: share the flag.
    FMLA_TRACE_STAMP(seg, kStampLoopEnd);
    bad = __syncthreads_or(bad ? 1 : 0) != 0;
    FMLA_TRACE_STAMP(seg, kStampJoined);
    RequestWork w_next = w;
    int req_next = req;
    const bool more = next_segment(p, pw, req, w, req_next, w_next);
    if (more) start_segment(req_next, w_next);

    // ---- epilogue: WG0 owns the softmax statistics; share them with WG1 through smem.
    if (wg == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (lane % 4 == 0) {
          smem.row_sum[r0 + 8 * r] = l;
          smem.row_max[r0 + 8 * r] = m_run[r];
        }
      }
    }
    __syncthreads();

    float l_row[2], m_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_row[r] = smem.row_sum[r0 + 8 * r];
      m_row[r] = smem.row_max[r0 + 8 * r];
    }
    write_rows<T>(p, tOrO, w, req, h_k, m_block, r0, wg, quad_col, lane, l_row, m_row, bad, out_scale);
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
