// Tile scheduler: splits the (request, 64-token block) work of one decode step over `num_sm_parts` parts.
//
// Contract (params.h; flashmla_ops/reference.py implements the same rule on the CPU and must agree bit for
// bit). Each part is filled greedily, in request order, up to a capacity of cap = ceil(total / P) +
// kFixedOverhead cost units, where a request costs kFixedOverhead + (its blocks) and a piece of a request
// that continues from the previous part pays the overhead again. A request that fits in the room left is
// taken whole; one that does not is cut, and the part takes (room - kFixedOverhead) of its blocks, if that is
// at least one. The slack of one overhead per part is what lets uniform batches run unsplit (b = 128 requests
// of 4096 tokens on 66 parts: two whole requests per part, no partials and no combine work), which a
// fixed-width cut of the cost space cannot do. A part that ends with a cut is charged cap units (and its
// continuation pays one overhead again), any other part but the last at least cap - kFixedOverhead, so the
// m parts before the last cover at least m * ceil(total / P) units of the batch's cost: P parts suffice.
//
// Only the chain of part starts is sequential, so it is kept short. A part that starts at the beginning of a
// request r ends where the same rule says, whatever came before: that transition is computed for every r in
// parallel first (a search over the prefix sums of the request costs). One thread then follows the chain,
// one load per such part (shared memory; the global scratch past kSchedSmemRequests requests); a part that
// starts inside a cut request computes its transition on the spot (a closed form when it is cut again, else
// a galloping search). Records, split flags and num_splits follow in parallel from consecutive part starts.
#include <cub/block/block_scan.cuh>

#include "kernels/launch.h"
#include "kernels/smem_opt_in.h"

namespace flashmla {
namespace {

constexpr int kSchedThreads = 512;

// Where the walk goes from a part start: request `req` from block `blk` (blk > 0: a cut request continues).
struct PartStart {
  int32_t req;
  int32_t blk;
};

__device__ __forceinline__ int64_t request_cost(const int32_t* seqlens, int i) {
  // A zero-length request still gets one (empty) block so that it is visited and its output written.
  const int32_t seqlen = seqlens[i];
  const int64_t s = seqlen > 0 ? seqlen : 0;
  const int64_t n = (s + kPageSize - 1) / kPageSize;
  return (n > 0 ? n : 1) + kFixedOverhead;
}

// Cost-space view of the batch: ends[i] = cost of requests 0..i.
struct CostSpace {
  const int64_t* ends;
  int b;
  __device__ __forceinline__ int64_t end_before(int i) const { return i > 0 ? ends[i - 1] : 0; }
  __device__ __forceinline__ int32_t nblk(int i) const {
    return static_cast<int32_t>(ends[i] - end_before(i) - kFixedOverhead);
  }
  // With `room` units left after request r, whole requests r+1.. are taken while they fit; then the next one
  // is cut if more than the overhead is left. Returns where the next part starts.
  __device__ __forceinline__ PartStart after_whole(int r, int64_t room) const {
    // Largest j with ends[j] - ends[r] <= room (each request costs > kFixedOverhead, so j - r <= room / 6).
    // Galloping from r: a part usually holds a few requests, so the answer is near and a search over the
    // whole bound would cost more dependent loads than the bracket.
    const int64_t limit = ends[r] + room;
    const int bound = static_cast<int>(min(static_cast<int64_t>(b - 1), r + room / (kFixedOverhead + 1)));
    int lo = r, hi = bound;  // ends[lo] <= limit; the answer is in [lo, hi]
    for (int d = 1; lo < hi; d *= 2) {
      const int probe = min(lo + d, hi);
      if (ends[probe] > limit) {
        hi = probe - 1;
        break;
      }
      lo = probe;
    }
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (ends[mid] <= limit) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    room -= ends[lo] - ends[r];
    if (lo + 1 < b && room > kFixedOverhead) return {lo + 1, static_cast<int32_t>(room - kFixedOverhead)};
    return {lo + 1, 0};
  }
  // The part starting at (r, blk) with capacity cap: where the next part starts.
  __device__ __forceinline__ PartStart next_start(PartStart s, int64_t cap) const {
    const int64_t first_cost = kFixedOverhead + nblk(s.req) - s.blk;
    if (first_cost > cap) return {s.req, static_cast<int32_t>(s.blk + cap - kFixedOverhead)};  // cut again
    return after_whole(s.req, cap - first_cost);
  }
};

__global__ void __launch_bounds__(kSchedThreads) sched_meta_kernel(const SchedParams p) {
  using Scan64 = cub::BlockScan<int64_t, kSchedThreads>;
  using Scan32 = cub::BlockScan<int32_t, kSchedThreads>;
  __shared__ union {
    typename Scan64::TempStorage scan64;
    typename Scan32::TempStorage scan32;
  } tmp;
  // Dynamic, when b <= kSchedSmemRequests: ends [b], then the transitions from each request's start [b]
  // (otherwise both live in p.scratch and no dynamic shared memory is launched).
  extern __shared__ int64_t s_dyn[];
  __shared__ int64_t s_carry;
  __shared__ int32_t s_split_carry;
  __shared__ int32_t s_used;

  const int tid = threadIdx.x;
  const int b = p.b;
  const int P = p.num_sm_parts;
  const bool staged = b <= kSchedSmemRequests;
  int64_t* ends = staged ? s_dyn : p.scratch;
  PartStart* from_start = reinterpret_cast<PartStart*>(ends + b);  // [b]: next part start from (r, 0)

  // Pass 0: num_splits starts at 0 (pass 4 scatters the piece counts of split requests into it).
  for (int i = tid; i <= b; i += kSchedThreads) p.num_splits[i] = 0;
  if (tid == 0) {
    s_carry = 0;
    s_split_carry = 0;
  }
  __syncthreads();

  // Pass 1: ends = inclusive prefix sums of the request costs, kSchedThreads requests at a time.
  for (int chunk = 0; chunk < b; chunk += kSchedThreads) {
    const int i = chunk + tid;
    const int64_t cost = i < b ? request_cost(p.seqlens, i) : 0;
    int64_t incl;
    Scan64(tmp.scan64).InclusiveSum(cost, incl);
    if (i < b) ends[i] = s_carry + incl;
    __syncthreads();  // every thread has read the carry and used the temp storage
    if (tid == kSchedThreads - 1) s_carry += incl;
    __syncthreads();
  }
  const int64_t cap = (s_carry + P - 1) / P + kFixedOverhead;
  const CostSpace cs{ends, b};

  // Pass 2: the transition from the start of every request, in parallel.
  for (int r = tid; r < b; r += kSchedThreads) from_start[r] = cs.next_start({r, 0}, cap);
  __syncthreads();

  // Pass 3: the walk (thread 0): part starts into fields 0, 1, 4 of the records. begin_split counts the cuts
  // of the request so far.
  if (tid == 0) {
    PartStart s{0, 0};
    int32_t split = 0;
    int part = 0;
    for (; part < P && s.req < b; ++part) {
      int32_t* rec = p.meta + static_cast<int64_t>(part) * kMetaSize;
      rec[kMetaBeginReq] = s.req;
      rec[kMetaBeginBlock] = s.blk;
      rec[kMetaBeginSplit] = split;
      const PartStart next = s.blk == 0 ? from_start[s.req] : cs.next_start(s, cap);
      split = next.req == s.req ? split + 1 : (next.blk > 0 ? 1 : 0);
      s = next;
    }
    s_used = part;
  }
  __syncthreads();

  // Pass 4: each used part's end is where the next one starts; split flags and piece counts follow. A chunk
  // of parts reads its starts (and the next chunk's first) before any record of the chunk is rewritten.
  const int used = s_used;
  for (int chunk = 0; chunk < P; chunk += kSchedThreads) {
    const int part = chunk + tid;
    int32_t* rec = p.meta + static_cast<int64_t>(part) * kMetaSize;
    int begin_req = 0, begin_blk = 0, begin_split = 0, next_req = b, next_blk = 0;
    if (part < used) {
      begin_req = rec[kMetaBeginReq];
      begin_blk = rec[kMetaBeginBlock];
      begin_split = rec[kMetaBeginSplit];
      if (part + 1 < used) {
        next_req = rec[kMetaSize + kMetaBeginReq];
        next_blk = rec[kMetaSize + kMetaBeginBlock];
      }
    }
    __syncthreads();
    if (part >= P) continue;
    if (part >= used) {  // no work: end_req < begin_req
      reinterpret_cast<int4*>(rec)[0] = int4{0, 0, -1, 0};
      reinterpret_cast<int4*>(rec)[1] = int4{0, 0, 0, 0};
      continue;
    }
    // The next part starts inside request next_req (blk > 0) or at its beginning.
    const int end_req = next_blk > 0 ? next_req : next_req - 1;
    const int end_blk = next_blk > 0 ? next_blk : cs.nblk(end_req);
    const bool same = end_req == begin_req;
    const int nblk_begin = cs.nblk(begin_req);
    const bool begin_is_split = begin_blk > 0 || (same && end_blk < nblk_begin);
    const bool end_is_split = end_blk < cs.nblk(end_req) || (same && begin_blk > 0);
    reinterpret_cast<int4*>(rec)[0] = int4{begin_req, begin_blk, end_req, end_blk};
    reinterpret_cast<int4*>(rec)[1] = int4{begin_split, begin_is_split ? 1 : 0, end_is_split ? 1 : 0, 0};
    // A continued request ends in the part that holds its last block: it has begin_split + 1 pieces.
    if (begin_blk > 0 && (!same || end_blk == nblk_begin)) p.num_splits[begin_req + 1] = begin_split + 1;
  }
  __syncthreads();  // the scatter is visible to the whole CTA

  // Pass 5: num_splits[1..b] in place from piece counts to their inclusive prefix sum.
  for (int chunk = 0; chunk < b; chunk += kSchedThreads) {
    const int i = chunk + tid;
    const int32_t n = i < b ? p.num_splits[i + 1] : 0;
    int32_t n_incl;
    Scan32(tmp.scan32).InclusiveSum(n, n_incl);
    if (i < b) p.num_splits[i + 1] = s_split_carry + n_incl;
    __syncthreads();  // every thread has read the carry and used the temp storage
    if (tid == kSchedThreads - 1) s_split_carry += n_incl;
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_sched_meta(const SchedParams& params, cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  constexpr int kBytesPerRequest = kSchedScratchBytesPerRequest;
  static_assert(kBytesPerRequest == sizeof(int64_t) + sizeof(PartStart));
  static std::atomic<bool> configured[kMaxDevices];
  const cudaError_t err =
      configure_smem_once(sched_meta_kernel, kSchedSmemRequests * kBytesPerRequest, configured, kMaxDevices);
  if (err != cudaSuccess) return err;
  const int staged = params.b <= kSchedSmemRequests ? params.b : 0;
  sched_meta_kernel<<<1, kSchedThreads, staged * kBytesPerRequest, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flashmla
