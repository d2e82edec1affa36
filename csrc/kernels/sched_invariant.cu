// Batch-invariant tile scheduler (flashmla_ops/reference.py: get_mla_metadata_batch_invariant_reference is
// the specification; this kernel must agree bit for bit).
//
// Every request is cut at the chunk boundaries of invariant_chunk_blocks (kernels/params.h), which depend
// only on its own block count and the head geometry. The chunks, in (request, chunk) order, each cost
// kFixedOverhead plus their blocks; chunk i goes to part floor(start_i / W) of the first num_work_parts
// parts (start_i: its offset in that cost space, W = ceil(total / num_work_parts)). So the batch decides
// which part runs a chunk, never where a request is cut: a part holds whole chunks only, and every part's
// first chunk (the first whose start is >= p * W) is found independently by a binary search over the
// requests' cost prefix sums. The remaining parts, up to num_sm_parts, are empty: they only size the
// split-partials workspace (2 * num_sm_parts pieces) for the batch's chunks.
#include <cub/block/block_scan.cuh>

#include "kernels/launch.h"
#include "kernels/smem_opt_in.h"

namespace flashmla {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ int request_blocks(const int32_t* seqlens, int i) {
  // A zero-length request still gets one (empty) block so that it is visited and its output written.
  const int64_t s = seqlens[i] > 0 ? seqlens[i] : 0;
  const int64_t n = (s + kPageSize - 1) / kPageSize;
  return static_cast<int>(n > 0 ? n : 1);
}

// A chunk: request `req`, chunk index `k`; {b, 0} past the last one.
struct Item {
  int req, k;
};

struct Space {
  const int64_t* ends;  // [b]: inclusive prefix sums of the request costs
  const int32_t* seqlens;
  int b, ctas;
  // The first chunk whose cost-space start is >= target.
  __device__ Item first_item(int64_t target) const {
    int lo = 0, hi = b;  // smallest r with ends[r] > target, in [0, b]
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (ends[mid] > target) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    if (lo >= b) return {b, 0};
    const int r = lo;
    const int64_t start = r > 0 ? ends[r - 1] : 0;
    if (target <= start) return {r, 0};
    const int nblk = request_blocks(seqlens, r);
    const int c = invariant_chunk_blocks(nblk, ctas);
    const int n = (nblk + c - 1) / c;
    const int64_t k = (target - start + c + kFixedOverhead - 1) / (c + kFixedOverhead);
    return k < n ? Item{r, static_cast<int>(k)} : Item{r + 1, 0};
  }
};

__global__ void __launch_bounds__(kThreads) sched_invariant_kernel(const SchedParams p) {
  using Scan64 = cub::BlockScan<int64_t, kThreads>;
  using Scan32 = cub::BlockScan<int32_t, kThreads>;
  __shared__ union {
    typename Scan64::TempStorage scan64;
    typename Scan32::TempStorage scan32;
  } tmp;
  extern __shared__ int64_t s_dyn[];  // ends [b] when b <= kSchedSmemRequests, else p.scratch holds them
  __shared__ int64_t s_carry;
  __shared__ int32_t s_split_carry;

  const int tid = threadIdx.x;
  const int b = p.b;
  int64_t* ends = b <= kSchedSmemRequests ? s_dyn : p.scratch;
  if (tid == 0) {
    s_carry = 0;
    s_split_carry = 0;
    p.num_splits[0] = 0;
  }
  __syncthreads();

  // Costs (blocks plus one overhead per chunk) and piece counts (n chunks if n > 1, else 0), both as
  // prefix sums, kThreads requests at a time.
  for (int base = 0; base < b; base += kThreads) {
    const int i = base + tid;
    int64_t cost = 0;
    int32_t pieces = 0;
    if (i < b) {
      const int nblk = request_blocks(p.seqlens, i);
      const int c = invariant_chunk_blocks(nblk, p.ctas_per_part);
      const int n = (nblk + c - 1) / c;
      cost = nblk + static_cast<int64_t>(n) * kFixedOverhead;
      pieces = n > 1 ? n : 0;
    }
    int64_t incl;
    Scan64(tmp.scan64).InclusiveSum(cost, incl);
    __syncthreads();
    int32_t pincl;
    Scan32(tmp.scan32).InclusiveSum(pieces, pincl);
    if (i < b) {
      ends[i] = s_carry + incl;
      p.num_splits[i + 1] = s_split_carry + pincl;
    }
    __syncthreads();  // every thread has read the carries and used the temp storage
    if (tid == kThreads - 1) {
      s_carry += incl;
      s_split_carry += pincl;
    }
    __syncthreads();
  }

  const int64_t total = s_carry;
  const int64_t width = (total + p.num_work_parts - 1) / p.num_work_parts;
  const Space sp{ends, p.seqlens, b, p.ctas_per_part};
  for (int part = tid; part < p.num_sm_parts; part += kThreads) {
    int4* rec = reinterpret_cast<int4*>(p.meta + static_cast<int64_t>(part) * kMetaSize);
    Item first{b, 0}, next{b, 0};
    if (part < p.num_work_parts) {
      first = sp.first_item(part * width);
      if (part + 1 < p.num_work_parts) next = sp.first_item((part + 1) * width);
    }
    const bool empty = first.req > next.req || (first.req == next.req && first.k >= next.k);
    if (empty) {
      rec[0] = int4{0, 0, -1, 0};
      rec[1] = int4{0, 0, 0, kMetaFlagBatchInvariant};
      continue;
    }
    const int c_first = invariant_chunk_blocks(request_blocks(p.seqlens, first.req), p.ctas_per_part);
    int end_req, end_blk;
    if (next.k > 0) {  // the next part starts inside request next.req
      end_req = next.req;
      end_blk = next.k * invariant_chunk_blocks(request_blocks(p.seqlens, end_req), p.ctas_per_part);
    } else {
      end_req = next.req - 1;
      end_blk = request_blocks(p.seqlens, end_req);
    }
    const int nblk_first = request_blocks(p.seqlens, first.req);
    const int nblk_end = request_blocks(p.seqlens, end_req);
    const int c_end = invariant_chunk_blocks(nblk_end, p.ctas_per_part);
    rec[0] = int4{first.req, first.k * c_first, end_req, end_blk};
    rec[1] = int4{first.k, c_first < nblk_first ? 1 : 0, c_end < nblk_end ? 1 : 0, kMetaFlagBatchInvariant};
  }
}

}  // namespace

cudaError_t launch_sched_invariant(const SchedParams& params, cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> configured[kMaxDevices];
  const cudaError_t err = configure_smem_once(sched_invariant_kernel, kSchedSmemRequests * sizeof(int64_t),
                                              configured, kMaxDevices);
  if (err != cudaSuccess) return err;
  const int staged = params.b <= kSchedSmemRequests ? params.b : 0;
  sched_invariant_kernel<<<1, kThreads, staged * sizeof(int64_t), stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flashmla
