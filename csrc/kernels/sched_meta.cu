// Tile scheduler: splits the (request, 64-token block) work of one decode step over `num_sm_parts` parts.
//
// Contract (params.h; flashmla_ops/reference.py implements the same rule on the CPU and must agree bit for
// bit). Each part is filled greedily, in request order, up to a capacity of cap = ceil(total / P) +
// kFixedOverhead cost units, where a request costs kFixedOverhead + (its blocks) and a piece of a request
// that continues from the previous part pays the overhead again. A request that fits in the room left is
// taken whole; one that does not is cut, and the part takes (room - kFixedOverhead) of its blocks, if that is
// at least one. The slack of one overhead per part is what lets uniform batches run unsplit (b = 128 requests
// of 4096 tokens on 66 parts: two whole requests per part, no partials and no combine work), which a
// fixed-width cut of the cost space cannot do. Every part but the last consumes at least ceil(total / P)
// units, so P parts always suffice.
//
// The walk is sequential over parts, so its latency per part is what counts. The CTA first writes the
// inclusive prefix sums of the request costs (`ends`) to shared memory (up to 24k requests; a global
// scratch beyond); then one warp walks the parts, testing 32 candidate requests per step against the room
// left with one load, a ballot and a shuffle. The other passes (prefix sums, num_splits) use the whole CTA.
#include <cub/block/block_scan.cuh>

#include "kernels/launch.h"
#include "kernels/smem_opt_in.h"

namespace flashmla {
namespace {

constexpr int kSchedThreads = 512;  // 1024 would cap registers at 64 and spill in the walk

__device__ __forceinline__ int64_t request_cost(const int32_t* seqlens, int i) {
  // A zero-length request still gets one (empty) block so that it is visited and its output written.
  const int32_t seqlen = seqlens[i];
  const int64_t s = seqlen > 0 ? seqlen : 0;
  const int64_t n = (s + kPageSize - 1) / kPageSize;
  return (n > 0 ? n : 1) + kFixedOverhead;
}

// Run by all 32 lanes of one warp with uniform control flow; lane 0 stores. `ends[i]` is the cost of requests
// 0..i. Writes the records of the parts that get work and returns their count; scatters, for every request
// split over n > 1 parts, n into num_splits[i + 1] (which the caller zeroed and later prefix-sums).
__device__ int walk_parts(const SchedParams& p, const int64_t* ends, int64_t cap, int lane) {
  const int b = p.b;
  const auto end_before = [&](int i) -> int64_t { return i > 0 ? ends[i - 1] : 0; };
  const auto nblk_of = [&](int i) -> int64_t { return ends[i] - end_before(i) - kFixedOverhead; };
  int r = 0;          // next piece: request r ...
  int64_t k = 0;      // ... from block k ...
  int32_t split = 0;  // ... which is piece number `split` of request r
  int part = 0;
  for (; part < p.num_sm_parts && r < b; ++part) {
    const int begin_req = r;
    const int64_t begin_block = k;
    const int32_t begin_split = split;
    const int64_t nblk_begin = nblk_of(r);
    int64_t room = cap;
    int end_req;
    int64_t end_block;
    const int64_t first_cost = kFixedOverhead + nblk_begin - k;
    if (first_cost > room) {
      // Even the first piece does not fit: cut it (room - overhead >= ceil(total / P) >= 1 blocks).
      end_req = r;
      end_block = k + room - kFixedOverhead;
      k = end_block;
      ++split;
    } else {
      room -= first_cost;
      int last_whole = r;
      int64_t last_end = ends[r];
      for (;;) {  // whole requests after r, 32 candidates per step
        const int i = last_whole + 1 + lane;
        // Past the batch end a candidate never fits.
        const int64_t end_i = i < b ? ends[i] : last_end + room + 1;
        // Costs are positive, so the candidates that fit are a prefix of the lanes.
        const int n_fit = __popc(__ballot_sync(0xffffffffu, end_i - last_end <= room));
        if (n_fit > 0) {
          const int64_t new_end = __shfl_sync(0xffffffffu, end_i, n_fit - 1);
          room -= new_end - last_end;
          last_end = new_end;
          last_whole += n_fit;
        }
        if (n_fit < 32) break;
      }
      if (last_whole + 1 < b && room > kFixedOverhead) {
        // The next request does not fit whole (the loop stopped on it) but some of its blocks do.
        end_req = last_whole + 1;
        end_block = room - kFixedOverhead;
        r = end_req;
        k = end_block;
        split = 1;
      } else {
        end_req = last_whole;
        end_block = last_whole == begin_req ? nblk_begin : nblk_of(last_whole);
        r = last_whole + 1;
        k = 0;
        split = 0;
      }
    }
    // Only a part's first piece can continue a request, and only its last piece can be cut, so whether
    // begin_req / end_req are split is decided by this record alone.
    const bool same = end_req == begin_req;
    const int64_t nblk_end = same ? nblk_begin : nblk_of(end_req);
    const bool begin_is_split = begin_block > 0 || (same && end_block < nblk_begin);
    const bool end_is_split = end_block < nblk_end || (same && begin_block > 0);
    if (lane == 0) {
      int32_t* rec = p.meta + static_cast<int64_t>(part) * kMetaSize;
      rec[kMetaBeginReq] = begin_req;
      rec[kMetaBeginBlock] = static_cast<int32_t>(begin_block);
      rec[kMetaEndReq] = end_req;
      rec[kMetaEndBlock] = static_cast<int32_t>(end_block);
      rec[kMetaBeginSplit] = begin_split;
      rec[kMetaFirstSplit] = begin_is_split ? 1 : 0;
      rec[kMetaLastSplit] = end_is_split ? 1 : 0;
      rec[kMetaReserved] = 0;
      // A continued request ends in the part that holds its last block: it has begin_split + 1 pieces.
      if (begin_block > 0 && (!same || end_block == nblk_begin))
        p.num_splits[begin_req + 1] = begin_split + 1;
    }
  }
  return part;
}

__global__ void __launch_bounds__(kSchedThreads) sched_meta_kernel(const SchedParams p) {
  using Scan64 = cub::BlockScan<int64_t, kSchedThreads>;
  using Scan32 = cub::BlockScan<int32_t, kSchedThreads>;
  __shared__ union {
    typename Scan64::TempStorage scan64;
    typename Scan32::TempStorage scan32;
  } tmp;
  extern __shared__ int64_t s_ends[];  // [min(b, kSchedSmemRequests)]
  __shared__ int64_t s_carry;
  __shared__ int32_t s_split_carry;

  const int tid = threadIdx.x;
  const int b = p.b;
  const int P = p.num_sm_parts;
  int64_t* ends = b <= kSchedSmemRequests ? s_ends : p.cost_ends;

  // Pass 0: num_splits starts at 0 (the walk scatters the piece counts of split requests into it).
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

  // Pass 2: the greedy walk (warp 0), then "no work" records for the parts it did not reach.
  if (tid < 32) {
    const int used = walk_parts(p, ends, (s_carry + P - 1) / P + kFixedOverhead, tid);
    for (int part = used + tid; part < P; part += 32) {
      int32_t* rec = p.meta + static_cast<int64_t>(part) * kMetaSize;
      rec[kMetaBeginReq] = 0;
      rec[kMetaBeginBlock] = 0;
      rec[kMetaEndReq] = -1;  // end_req < begin_req
      rec[kMetaEndBlock] = 0;
      rec[kMetaBeginSplit] = 0;
      rec[kMetaFirstSplit] = 0;
      rec[kMetaLastSplit] = 0;
      rec[kMetaReserved] = 0;
    }
  }
  __syncthreads();  // the scatter is visible to the whole CTA

  // Pass 3: num_splits[1..b] in place from piece counts to their inclusive prefix sum, kSchedThreads at a
  // time.
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
  static std::atomic<bool> configured[kMaxDevices];
  const int max_smem = kSchedSmemRequests * static_cast<int>(sizeof(int64_t));
  const cudaError_t err = configure_smem_once(sched_meta_kernel, max_smem, configured, kMaxDevices);
  if (err != cudaSuccess) return err;
  const int staged = params.b < kSchedSmemRequests ? params.b : kSchedSmemRequests;
  sched_meta_kernel<<<1, kSchedThreads, staged * sizeof(int64_t), stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flashmla
