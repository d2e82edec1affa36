// Tile scheduler: splits the (request, 64-token block) work of one decode step over `num_sm_parts` parts.
//
// Contract (params.h, and flashmla_ops/reference.py which implements the same spec on the CPU): requests are
// laid end to end in a "cost space", each request occupying kFixedOverhead units (its prologue/epilogue) and
// then one unit per block; part p owns the cost positions [p*W, (p+1)*W), W = ceil(total / num_sm_parts).
// Everything about part p and request i is then a closed-form function of the prefix sum C_i, so the whole
// schedule is computed in parallel by one CTA (a block-wide scan per chunk of 1024 requests), with no
// sequential walk over the batch: b = 16384 costs 16 scans, not 16384 dependent steps.
//
// Each field of a non-empty record is written by exactly one thread: the thread of the request that begins
// (fields 0, 1, 4, 5) or ends (fields 2, 3, 6) that part. Empty parts keep the initial "no work" record.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/launch.h"

namespace flashmla {
namespace {

constexpr int kSchedThreads = 1024;

__device__ __forceinline__ int64_t num_blocks_of(int32_t seqlen) {
  // A zero-length request still gets one (empty) block so that it is visited and its output written.
  const int64_t s = seqlen > 0 ? seqlen : 0;
  const int64_t n = (s + kPageSize - 1) / kPageSize;
  return n > 0 ? n : 1;
}

__global__ void __launch_bounds__(kSchedThreads) sched_meta_kernel(const SchedParams p) {
  using Scan64 = cub::BlockScan<int64_t, kSchedThreads>;
  using Scan32 = cub::BlockScan<int32_t, kSchedThreads>;
  using Reduce64 = cub::BlockReduce<int64_t, kSchedThreads>;
  __shared__ union {
    typename Scan64::TempStorage scan64;
    typename Scan32::TempStorage scan32;
    typename Reduce64::TempStorage reduce64;
  } tmp;
  __shared__ int64_t s_total;
  __shared__ int64_t s_cost_carry;
  __shared__ int32_t s_split_carry;

  const int tid = threadIdx.x;
  const int b = p.b;
  const int P = p.num_sm_parts;

  // Pass 0: every record starts as "no work" (end_req < begin_req).
  for (int part = tid; part < P; part += kSchedThreads) {
    int32_t* rec = p.meta + static_cast<int64_t>(part) * kMetaSize;
    rec[kMetaBeginReq] = 0;
    rec[kMetaBeginBlock] = 0;
    rec[kMetaEndReq] = -1;
    rec[kMetaEndBlock] = 0;
    rec[kMetaBeginSplit] = 0;
    rec[kMetaFirstSplit] = 0;
    rec[kMetaLastSplit] = 0;
    rec[kMetaReserved] = 0;
  }
  if (tid == 0) p.num_splits[0] = 0;

  // Pass 1: total cost.
  int64_t local = 0;
  for (int i = tid; i < b; i += kSchedThreads) local += num_blocks_of(p.seqlens[i]) + kFixedOverhead;
  const int64_t total = Reduce64(tmp.reduce64).Sum(local);
  if (tid == 0) {
    s_total = total;
    s_cost_carry = 0;
    s_split_carry = 0;
  }
  __syncthreads();  // also orders pass 0's record writes before pass 2's
  const int64_t W = (s_total + P - 1) / P;

  // Pass 2: chunks of kSchedThreads consecutive requests, one per thread.
  for (int chunk = 0; chunk < b; chunk += kSchedThreads) {
    const int i = chunk + tid;
    const bool active = i < b;
    const int64_t nblk = active ? num_blocks_of(p.seqlens[i]) : 0;
    const int64_t cost = active ? nblk + kFixedOverhead : 0;
    int64_t c_excl;
    Scan64(tmp.scan64).ExclusiveSum(cost, c_excl);
    const int64_t C = s_cost_carry + c_excl;
    const int64_t start = C + kFixedOverhead;
    const int64_t first_part = active ? start / W : 0;
    const int64_t last_part = active ? (start + nblk - 1) / W : 0;
    const int32_t splits = static_cast<int32_t>(last_part - first_part + 1);
    const int32_t n_accum = (active && splits > 1) ? splits : 0;
    __syncthreads();  // temp storage reuse
    int32_t n_incl;
    Scan32(tmp.scan32).InclusiveSum(n_accum, n_incl);
    if (active) p.num_splits[i + 1] = s_split_carry + n_incl;

    if (active) {
      // Neighbours' part ranges decide whether this request begins its first part / ends its last part.
      // Request i-1's last block sits at cost position C - 1 (a request's blocks follow its overhead);
      // request i+1's first block at C + cost + kFixedOverhead.
      const bool begins_first = i == 0 || (C - 1) / W < first_part;
      const bool ends_last = i + 1 >= b || (C + cost + kFixedOverhead) / W > last_part;
      const int32_t is_split = splits > 1 ? 1 : 0;
      for (int64_t part = first_part; part <= last_part; ++part) {
        int32_t* rec = p.meta + part * kMetaSize;
        const int64_t lo = part * W, hi = lo + W;
        if (part > first_part || begins_first) {
          rec[kMetaBeginReq] = i;
          rec[kMetaBeginBlock] = static_cast<int32_t>(lo > start ? lo - start : 0);
          rec[kMetaBeginSplit] = static_cast<int32_t>(part - first_part);
          rec[kMetaFirstSplit] = is_split;
        }
        if (part < last_part || ends_last) {
          rec[kMetaEndReq] = i;
          rec[kMetaEndBlock] = static_cast<int32_t>(hi - start < nblk ? hi - start : nblk);
          rec[kMetaLastSplit] = is_split;
        }
      }
    }
    __syncthreads();  // every thread has read the carries and used the temp storage
    if (tid == kSchedThreads - 1) {
      s_cost_carry = C + cost;
      s_split_carry += n_incl;
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_sched_meta(const SchedParams& params, cudaStream_t stream) {
  sched_meta_kernel<<<1, kSchedThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flashmla
