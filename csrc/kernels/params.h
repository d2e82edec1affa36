// Torch-free parameter structs shared by the host launchers (csrc/api) and the kernels (csrc/kernels).
// The kernels never include a torch header: everything they need arrives here, as raw pointers, element
// strides (64-bit, so b * s_q * h_q * 512 may exceed 2^31) and sizes. The launcher fills these from tensor
// shapes/dtypes only; it never reads tensor values (no host sync on the decode path).
#pragma once

#include <cuda.h>  // CUtensorMap (a plain 128-byte descriptor; no driver call in the kernels)

#include <cstdint>

namespace flashmla {

// Fixed geometry of DeepSeek V2/V3 absorbed MLA.
constexpr int kHeadDimK = 576;  // q / k width: 512 latent ("NoPE") + 64 RoPE
constexpr int kHeadDimV = 512;  // v = the first 512 columns of the same cache rows
constexpr int kPageSize = 64;   // tokens per page; also the kernel's N tile, so a tile is one page
constexpr int kBlockM = 64;     // query rows per CTA (one wgmma M); rows = (MTP token, head) pairs

// ---- Scheduler contract ------------------------------------------------------------------------------
// tile_scheduler_metadata is int32 [num_sm_parts, kMetaSize]; one record per SM part:
constexpr int kMetaSize = 8;
enum MetaField : int {
  kMetaBeginReq = 0,    // first request of the part (inclusive)
  kMetaBeginBlock = 1,  // first 64-token block of begin_req handled by this part
  kMetaEndReq = 2,      // last request of the part (inclusive); end_req < begin_req means "no work"
  kMetaEndBlock = 3,    // one past the last block of end_req handled by this part
  kMetaBeginSplit = 4,  // split index of begin_req's piece in this part (other requests: split 0)
  kMetaFirstSplit = 5,  // 1 if begin_req is split over several parts
  kMetaLastSplit = 6,   // 1 if end_req is split over several parts
  kMetaFlags = 7,       // 0, or kMetaFlagBatchInvariant in every record of a batch-invariant schedule
};
// Batch-invariant schedule (get_mla_metadata_batch_invariant): every request is cut at the chunk boundaries
// of invariant_chunk_blocks, which depend only on its own block count and the head geometry; the main
// loops end a segment at every chunk boundary inside a part, and chunk k of a request with n > 1 chunks is
// its partial k (num_splits counts n for it), so the combine merges the same pieces in the same order
// whatever the batch. Field 4 holds the chunk index of the part's first chunk.
constexpr int kMetaFlagBatchInvariant = 1;
// num_splits is int32 [b + 1]: an exclusive prefix sum over requests of
//   n_i = (number of parts request i is split over) if that is > 1, else 0.
// So n_i = num_splits[i+1] - num_splits[i] is the number of fp32 partial results request i leaves in the
// split accumulators (rows num_splits[i] .. num_splits[i+1]-1), and n_i == 0 means one part wrote the final
// output directly and the combine kernel skips the request. num_splits[b] <= 2 * (num_sm_parts - 1), so the
// accumulators are sized by the part count, never by the batch size.
// Cost model: request i has nblk_i = max(1, ceil(seqlen_i / 64)) blocks; a piece of a request costs
// kFixedOverhead "block units" (its prologue/epilogue) plus its blocks. Parts are filled greedily in request
// order up to cap = ceil(total / num_sm_parts) + kFixedOverhead units (total = sum of nblk_i +
// kFixedOverhead): a piece that fits is taken whole, the first that does not is cut to (room left -
// kFixedOverhead) blocks when that is >= 1, and the next part starts where this one stopped (sched_meta.cu
// has the details).
// 5 blocks: a smaller overhead splits uniform batches to fill the few parts that 5 leaves idle (with 2,
// b = 128 x 8192 tokens spreads over 131 of 132 parts instead of 128), but in the memory-bound regime those
// SMs add no bandwidth while the split adds fp32 partials and a combine (b128 h64 8192 +5.7 % with 2;
// benchmarks/NOTES.md, v9.1). flashmla_ops/reference.py (FIXED_OVERHEAD) must use the same value.
constexpr int kFixedOverhead = 5;

// Batch-invariant chunk rule (flashmla_ops/_invariant.py must agree): a request of nblk blocks gets
//   n = min(max(1, kInvariantCtaTarget / ctas_per_part), ceil(nblk^3 / kInvariantChunkCube))
// target chunks, so up to 128 blocks (8,192 tokens) it is never cut, and a long request is cut into about
// as many chunks as fill 128 CTAs (ctas_per_part = query tiles per kv head times kv heads). The cube keeps
// requests of a few thousand tokens whole (their chunks would be partials to write and merge); the target
// reaches 64 at 510 blocks and 128 at 644. Every chunk but the last has ceil(nblk / n) blocks, so the
// realised count ceil(nblk / chunk) can be below n (and is not monotone in nblk); n itself is, and bounds it.
constexpr int64_t kInvariantChunkCube = int64_t{1} << 21;
constexpr int kInvariantCtaTarget = 128;
__host__ __device__ inline int invariant_chunk_blocks(int nblk, int ctas_per_part) {
  const int per = ctas_per_part > 0 ? ctas_per_part : 1;
  const int n_max = kInvariantCtaTarget / per > 1 ? kInvariantCtaTarget / per : 1;
  int n = n_max;
  if (nblk <= 4096) {
    const int64_t b = nblk;
    const int64_t want = (b * b * b + kInvariantChunkCube - 1) / kInvariantChunkCube;
    n = want < 1 ? 1 : (want < n_max ? static_cast<int>(want) : n_max);
  }
  return (nblk + n - 1) / n;
}

// The scheduler keeps its per-request arrays (prefix sums of the costs, the transition from each request's
// start; 16 bytes per request) in shared memory up to this many requests, beyond in `scratch`, a global
// buffer the launcher allocates only then.
constexpr int kSchedSmemRequests = 12288;  // 192 KB
constexpr int kSchedScratchBytesPerRequest = 16;

struct SchedParams {
  const int32_t* seqlens;  // [b]
  int32_t* meta;           // [num_sm_parts, kMetaSize]
  int32_t* num_splits;     // [b + 1]
  int64_t* scratch;        // [2 * b] when b > kSchedSmemRequests, else unused (may be null)
  int b;
  int num_sm_parts;
  // Batch-invariant schedule only: work goes to parts [0, num_work_parts); ctas_per_part as in
  // invariant_chunk_blocks.
  int num_work_parts;
  int ctas_per_part;
};

// ---- Decode ------------------------------------------------------------------------------------------
// How k_cache stores a token (one kv head): q's dtype, 576 values (kKvNative); float8_e4m3fn, 576 values
// times the per-tensor k_scale (kKvFp8Tensor); or DeepSeek V3.2's 656 bytes, 512 e4m3 values, 4 float32
// scales (one per 128 values), 64 bf16 RoPE values (kKvFp8V32).
enum KvFormat : int { kKvNative = 0, kKvFp8Tensor = 1, kKvFp8V32 = 2 };
constexpr int kV32BytesPerToken = 656;
// FP8 caches with at most this many query rows per kv head run the kernel with the tokens as the wgmma M
// dimension (kernels/sm90/mainloop_pingpong_fp8.cuh), which reads the e4m3 boxes 128B-swizzled; the host
// builds the TMA map to match.
constexpr int kFp8TokensAsMRows = 32;
__host__ __device__ constexpr bool fp8_tokens_as_m(int q_seq_per_hk) {
  return q_seq_per_hk <= kFp8TokensAsMRows;
}
constexpr int kV32ScaleOffset = 512;  // bytes from the token's start to its 4 float32 scales
constexpr int kV32RopeOffset = 528;   // ... and to its 64 bf16 RoPE values

struct DecodeParams {
  // TMA descriptor of k_cache viewed as a 4-D tensor (576 dims, 64 tokens, h_kv, num_pages) with a
  // 64 x 64 box and 128-byte swizzle: one box is one 8 KB column tile of a page, nine make the page.
  // First member: the struct is a __grid_constant__ kernel parameter and TMA needs the map 64-byte aligned.
  CUtensorMap tma_k;  // 64-byte aligned by its own declaration
  // FP8 caches only (kv_format != kKvNative): the RoPE values (bf16, 64 x 64 box, 128-byte swizzle) and the
  // four float32 scales of each token (4 x 64 box) of the DeepSeek V3.2 format; tma_k then covers the e4m3
  // values as bytes (128 x 64 box, no swizzle; kernels/sm90/dequant_fp8.cuh).
  CUtensorMap tma_rope;
  CUtensorMap tma_scale;

  // sizes
  int b, s_q, h_q, h_kv;
  int q_heads_per_hk;  // h_q / h_kv
  int q_seq_per_hk;    // s_q * h_q / h_kv: GEMM rows per (request, kv head)
  int num_m_blocks;    // ceil(q_seq_per_hk / kBlockM)
  int num_sm_parts;
  int num_pages;           // k_cache.size(0)
  int max_blocks_per_seq;  // block_table.size(1)
  bool causal;
  float scale_log2;  // softmax_scale * log2(e): the kernels work in the log2 domain
  int kv_format;     // KvFormat of k_cache
  // Per-tensor FP8: the float32 [1] device tensor k_scale (dequantised value = stored * k_scale), read by the
  // kernel so that a captured CUDA graph sees a new value. Null otherwise.
  const float* k_scale;

  // q [b, s_q, h_q, 576], last dim contiguous
  const void* q;
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  // k_cache [num_pages, 64, h_kv, 576], last dim contiguous; v = k[..., :512]
  const void* k;
  int64_t k_page_stride, k_row_stride, k_head_stride;
  // block_table [b, max_blocks_per_seq] int32, last dim contiguous
  const int32_t* block_table;
  int64_t block_table_batch_stride;
  const int32_t* seqlens;  // [b]

  // out [b, s_q, h_q, 512] (q's dtype), last dim contiguous; lse fp32 [b, h_q, s_q] (natural log)
  void* out;
  int64_t o_batch_stride, o_seq_stride, o_head_stride;
  float* lse;
  int64_t lse_batch_stride, lse_head_stride, lse_seq_stride;

  const int32_t* meta;        // [num_sm_parts, kMetaSize]
  const int32_t* num_splits;  // [b + 1]
  // Split accumulators, contiguous: o_accum [slots, h_kv, q_seq_per_hk, 512] fp32 holds each piece's
  // normalised partial output; lse_accum [slots, h_kv, q_seq_per_hk] its log2-domain LSE (-inf if empty).
  float* o_accum;
  float* lse_accum;
};

}  // namespace flashmla
