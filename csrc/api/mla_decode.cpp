// Host launcher of flashmla::mla_decode / mla_decode_out on CUDA. It validates shapes, dtypes, devices and
// strides (the same rules and messages as flashmla_ops/_validation.py), fills the torch-free DecodeParams,
// and launches the main kernel and, for split requests, the combine kernel on the current stream. It reads no
// tensor values and never syncs with the host.
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstring>

#include "api/common.h"
#include "kernels/launch.h"

namespace flashmla::api {
namespace {

// cuTensorMapEncodeTiled is a driver API function; fetch it through the runtime so the extension needs no
// link against libcuda. Encoding is a host-only computation (no GPU work, no sync).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
    return e == cudaSuccess && q == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
               : nullptr;
  }();
  return fn;
}

// k_cache as a 4-D TMA tensor (576 dims, 64 tokens, h_kv, num_pages), box 64 x 64 x 1 x 1, 128B swizzle: the
// smem image of one box is exactly one 64x64 column tile of the kernel's K-major SW128 layout.
void make_k_tensor_map(const Tensor& k_cache, DType dtype, CUtensorMap* map) {
  std::memset(map, 0, sizeof(*map));
  if (k_cache.numel() == 0) return;  // no page can be valid, so the kernel never issues a copy
  const auto encode = tensor_map_encoder();
  FLASHMLA_CHECK(encode != nullptr, "cuTensorMapEncodeTiled is not available from the CUDA driver");
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(kHeadDimK), static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(k_cache.size(2)),
                              static_cast<cuuint64_t>(k_cache.size(0))};
  // A dim of size 1 is only read at index 0: any stride TMA accepts (a multiple of 16 bytes) will do.
  auto stride = [&](int d) {
    return static_cast<cuuint64_t>(k_cache.size(d) == 1 ? 16 : k_cache.stride(d) * 2);
  };
  const cuuint64_t strides[3] = {stride(1), stride(2), stride(0)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(kPageSize), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(
      map, dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      k_cache.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FLASHMLA_CHECK(r == CUDA_SUCCESS, "could not build the TMA descriptor of k_cache (CUresult ",
                 static_cast<int>(r), ")");
}

// One 4-D TMA map (inner dim, 64 tokens, h_kv, num_pages) over k_cache's bytes from `offset`, with
// k_cache's strides (in bytes) and a (box_inner x 64) box.
void make_fp8_map(const Tensor& k_cache, CUtensorMapDataType type, int64_t offset, int64_t inner,
                  int box_inner, CUtensorMapSwizzle swizzle, CUtensorMap* map) {
  const auto encode = tensor_map_encoder();
  FLASHMLA_CHECK(encode != nullptr, "cuTensorMapEncodeTiled is not available from the CUDA driver");
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(k_cache.size(2)),
                              static_cast<cuuint64_t>(k_cache.size(0))};
  // TMA wants every stride a multiple of 16 bytes; a dim of size 1 is only read at index 0, so its stride
  // (which the checks let be anything) can be any such value.
  auto stride = [&](int d) { return static_cast<cuuint64_t>(k_cache.size(d) == 1 ? 16 : k_cache.stride(d)); };
  const cuuint64_t strides[3] = {stride(1), stride(2), stride(0)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_inner), static_cast<cuuint32_t>(kPageSize), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, type, 4, static_cast<char*>(k_cache.data_ptr()) + offset, dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FLASHMLA_CHECK(r == CUDA_SUCCESS, "could not build the TMA descriptor of k_cache (CUresult ",
                 static_cast<int>(r), ")");
}

// FP8 caches (kernels/sm90/dequant_fp8.cuh, mainloop_pingpong_fp8.cuh): the e4m3 values as bytes in
// 128-column boxes (the serial loop reads the per-tensor format's RoPE through this map too, a last box
// running past column 576 that TMA fills with zeros), the RoPE values in one 64 x 64 box (per-tensor: e4m3
// bytes; DeepSeek V3.2: bf16, 128B swizzle) and V3.2's four float32 scales per token (a 4 x 64 box). With the
// tokens as the wgmma M dimension (fp8_tokens_as_m), the kernel reads the value boxes with 16-byte loads and
// ldmatrix across token rows: they land 128B-swizzled so that those reads have no bank conflict; the serial
// loop expands its boxes in place and wants them plain.
void make_fp8_tensor_maps(const Tensor& k_cache, int kv_format, DecodeParams* p) {
  std::memset(&p->tma_k, 0, sizeof(p->tma_k));
  std::memset(&p->tma_rope, 0, sizeof(p->tma_rope));
  std::memset(&p->tma_scale, 0, sizeof(p->tma_scale));
  if (k_cache.numel() == 0) return;
  const CUtensorMapSwizzle k_swizzle =
      fp8_tokens_as_m(p->q_seq_per_hk) ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE;
  if (kv_format == kKvFp8Tensor) {
    // The serial loop reads the RoPE through this map too (a last box past column 576, zero-filled).
    make_fp8_map(k_cache, CU_TENSOR_MAP_DATA_TYPE_UINT8, 0, kHeadDimK, 128, k_swizzle, &p->tma_k);
    make_fp8_map(k_cache, CU_TENSOR_MAP_DATA_TYPE_UINT8, kHeadDimV, kHeadDimK - kHeadDimV, 64,
                 CU_TENSOR_MAP_SWIZZLE_NONE, &p->tma_rope);
    return;
  }
  make_fp8_map(k_cache, CU_TENSOR_MAP_DATA_TYPE_UINT8, 0, kHeadDimV, 128, k_swizzle, &p->tma_k);
  make_fp8_map(k_cache, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, kV32RopeOffset, kHeadDimK - kHeadDimV, 64,
               CU_TENSOR_MAP_SWIZZLE_128B, &p->tma_rope);
  make_fp8_map(k_cache, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, kV32ScaleOffset, 4, 4, CU_TENSOR_MAP_SWIZZLE_NONE,
               &p->tma_scale);
}

// The checks and their order mirror flashmla_ops/_validation.py (check_mla_decode, check_mla_decode_out),
// with the same message text, so a bad input reads the same on every device.
void check_int32(const Tensor& t, const char* name) {
  FLASHMLA_CHECK(t.scalar_type() == ScalarType::Int, name, " must be int32, got ",
                 dtype_name(t.scalar_type()));
}
void check_ndim(const Tensor& t, const char* name, int64_t ndim, const char* layout) {
  FLASHMLA_CHECK(t.dim() == ndim, name, " must be a ", ndim, "-D tensor ", layout, ", got shape ",
                 shape_str(t));
}
void check_device(const Tensor& t, const char* name, const Tensor& q) {
  FLASHMLA_CHECK(device_str(t) == device_str(q), name, " must be on the same device as q (", device_str(q),
                 "), got ", device_str(t));
}
void check_last_dim_contiguous(const Tensor& t, const char* name) {
  FLASHMLA_CHECK(t.stride(t.dim() - 1) == 1, name, " must have a contiguous last dimension, got strides ",
                 strides_str(t));
}
void check_contiguous(const Tensor& t, const char* name) {
  FLASHMLA_CHECK(t.is_contiguous(), name, " must be contiguous, got shape ", shape_str(t), " and strides ",
                 strides_str(t));
}
// CUDA-only: the kernels move 16-byte vectors (cp.async, TMA, vector stores).
void check_aligned(const Tensor& t, const char* name) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  FLASHMLA_CHECK(ok, name,
                 " must be 16-byte aligned with strides that are multiples of 8 elements, got strides ",
                 strides_str(t));
}

// An FP8 k_cache's dtype (MSG_KV_FP8_DTYPE in flashmla_ops/_validation.py).
void check_kv_fp8_dtype(const Tensor& k_cache) {
  const ScalarType kt = k_cache.scalar_type();
  FLASHMLA_CHECK(
      kt == ScalarType::Float8_e4m3fn || kt == ScalarType::Byte,
      "an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or uint8 "
      "(DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got ",
      dtype_name(kt));
}

// The FP8 format of k_cache, its dtype already checked (check_kv_fp8_format in flashmla_ops/_validation.py).
int check_kv_fp8_format(const Tensor& k_cache) {
  if (k_cache.scalar_type() == ScalarType::Float8_e4m3fn) {
    FLASHMLA_CHECK(k_cache.size(-1) == kHeadDimK,
                   "a float8_e4m3fn k_cache (per-tensor FP8) must have head dim (size(-1)) 576, got ",
                   k_cache.size(-1), "; a DeepSeek V3.2 cache (656 bytes per token) must be uint8");
    return kKvFp8Tensor;
  }
  FLASHMLA_CHECK(k_cache.size(-1) == kV32BytesPerToken,
                 "a uint8 k_cache (DeepSeek V3.2 FP8) must have 656 bytes per token (size(-1)), got ",
                 k_cache.size(-1), "; a per-tensor FP8 cache (576 values per token) must be float8_e4m3fn");
  return kKvFp8V32;
}

// k_scale (check_k_scale in flashmla_ops/_validation.py).
void check_k_scale(int kv_format, const std::optional<Tensor>& k_scale, const Tensor& q) {
  if (kv_format == kKvFp8V32) {
    FLASHMLA_CHECK(
        !k_scale.has_value(),
        "k_scale must be None for a uint8 k_cache (DeepSeek V3.2 FP8 keeps its scales in the cache)");
    return;
  }
  FLASHMLA_CHECK(k_scale.has_value(),
                 "a float8_e4m3fn k_cache (per-tensor FP8) needs k_scale, a float32 tensor of shape [1]");
  FLASHMLA_CHECK(k_scale->scalar_type() == ScalarType::Float, "k_scale must be float32, got ",
                 dtype_name(k_scale->scalar_type()));
  FLASHMLA_CHECK(k_scale->dim() == 1 && k_scale->size(0) == 1, "k_scale must have shape [1], got ",
                 shape_str(*k_scale));
  check_device(*k_scale, "k_scale", q);
}

// Checks everything the kernels rely on. Returns the dtype. `kv_format`: null for the dense ops; for the FP8
// ops it receives the cache format (kKvFp8Tensor or kKvFp8V32).
DType check_inputs(const Tensor& q, const Tensor& k_cache, const Tensor& block_table,
                   const Tensor& cache_seqlens, int64_t head_dim_v, const Tensor& meta,
                   const Tensor& num_splits, int* kv_format = nullptr) {
  const ScalarType qt = q.scalar_type();
  const bool fp8 = kv_format != nullptr;
  FLASHMLA_CHECK(qt == ScalarType::BFloat16 || qt == ScalarType::Half, "q must be bfloat16 or float16, got ",
                 dtype_name(qt));
  if (fp8) {
    check_kv_fp8_dtype(k_cache);
  } else {
    FLASHMLA_CHECK(k_cache.scalar_type() == qt, "k_cache must have the same dtype as q (", dtype_name(qt),
                   "), got ", dtype_name(k_cache.scalar_type()));
  }
  check_int32(block_table, "block_table");
  check_int32(cache_seqlens, "cache_seqlens");
  check_int32(meta, "tile_scheduler_metadata");
  check_int32(num_splits, "num_splits");

  check_ndim(q, "q", 4, "[b, s_q, h_q, 576]");
  const bool v32 = fp8 && k_cache.scalar_type() == ScalarType::Byte;
  check_ndim(k_cache, "k_cache", 4, v32 ? "[num_pages, 64, h_kv, 656]" : "[num_pages, 64, h_kv, 576]");
  FLASHMLA_CHECK(q.size(3) == kHeadDimK, "q must have head dim (size(-1)) 576, got ", q.size(3));
  if (fp8) {
    *kv_format = check_kv_fp8_format(k_cache);
  } else {
    FLASHMLA_CHECK(k_cache.size(3) == kHeadDimK, "k_cache must have head dim (size(-1)) 576, got ",
                   k_cache.size(3));
  }
  FLASHMLA_CHECK(head_dim_v == kHeadDimV, "head_dim_v must be 512, got ", head_dim_v);
  FLASHMLA_CHECK(k_cache.size(1) == kPageSize, "k_cache page size (size(1)) must be 64, got ",
                 k_cache.size(1));
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2), h_kv = k_cache.size(2);
  FLASHMLA_CHECK(h_kv >= 1 && h_q >= 1 && h_q % h_kv == 0, "the number of query heads (", h_q,
                 ") must be a positive multiple of h_kv (", h_kv, ")");
  FLASHMLA_CHECK(s_q >= 1, "q must have at least one query token per request (s_q >= 1), got shape ",
                 shape_str(q));
  FLASHMLA_CHECK(b > 0, "batch size must be positive, got ", b);

  check_ndim(block_table, "block_table", 2, "[b, max_blocks_per_seq]");
  FLASHMLA_CHECK(block_table.size(0) == b, "block_table has batch size ", block_table.size(0),
                 ", but q has batch size ", b);
  FLASHMLA_CHECK(block_table.size(1) >= 1, "block_table must have at least one column, got shape ",
                 shape_str(block_table));
  check_ndim(cache_seqlens, "cache_seqlens", 1, "[b]");
  FLASHMLA_CHECK(cache_seqlens.size(0) == b, "cache_seqlens has batch size ", cache_seqlens.size(0),
                 ", but q has batch size ", b);
  check_contiguous(cache_seqlens, "cache_seqlens");

  FLASHMLA_CHECK(meta.dim() == 2 && meta.size(0) >= 1 && meta.size(1) == kMetaSize,
                 "tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8], got ", shape_str(meta));
  // A 1-D num_splits of the wrong length is almost always metadata computed for another decode step's batch.
  if (num_splits.dim() == 1) {
    FLASHMLA_CHECK(num_splits.size(0) == b + 1, "num_splits has ", num_splits.size(0),
                   " entries: the metadata was computed for batch size ", num_splits.size(0) - 1,
                   ", but q has batch size ", b, "; call get_mla_metadata with this batch's cache_seqlens");
  }
  FLASHMLA_CHECK(num_splits.dim() == 1 && num_splits.size(0) == b + 1, "num_splits must have shape [", b + 1,
                 "], got ", shape_str(num_splits));

  check_device(k_cache, "k_cache", q);
  check_device(block_table, "block_table", q);
  check_device(cache_seqlens, "cache_seqlens", q);
  check_device(meta, "tile_scheduler_metadata", q);
  check_device(num_splits, "num_splits", q);

  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(block_table, "block_table");
  check_contiguous(meta, "tile_scheduler_metadata");
  check_contiguous(num_splits, "num_splits");

  check_aligned(q, "q");
  if (fp8) {
    // CUDA-only: TMA reads the FP8 cache with 16-byte aligned rows.
    bool ok = reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0;
    for (int64_t i = 0; i + 1 < k_cache.dim(); ++i)
      ok = ok && (k_cache.size(i) == 1 || k_cache.stride(i) % 16 == 0);
    FLASHMLA_CHECK(
        ok, "k_cache must be 16-byte aligned with strides that are multiples of 16 bytes, got strides ",
        strides_str(k_cache));
    // CUDA-only: the V3.2 kernel dequantises into bf16 (its scales make fp16 inexact).
    FLASHMLA_CHECK(!v32 || qt == ScalarType::BFloat16,
                   "the DeepSeek V3.2 FP8 cache (uint8, 656 bytes per token) takes bfloat16 q on CUDA, got ",
                   dtype_name(qt));
  } else {
    check_aligned(k_cache, "k_cache");
  }
  return qt == ScalarType::BFloat16 ? DType::kBF16 : DType::kFP16;
}

void check_outputs(const Tensor& q, const Tensor& out, const Tensor& lse) {
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  FLASHMLA_CHECK(out.scalar_type() == q.scalar_type(), "out must have the same dtype as q (",
                 dtype_name(q.scalar_type()), "), got ", dtype_name(out.scalar_type()));
  FLASHMLA_CHECK(out.dim() == 4 && out.size(0) == b && out.size(1) == s_q && out.size(2) == h_q &&
                     out.size(3) == kHeadDimV,
                 "out must have shape [", b, ", ", s_q, ", ", h_q, ", 512], got ", shape_str(out));
  FLASHMLA_CHECK(lse.scalar_type() == ScalarType::Float, "lse must be float32, got ",
                 dtype_name(lse.scalar_type()));
  FLASHMLA_CHECK(lse.dim() == 3 && lse.size(0) == b && lse.size(1) == h_q && lse.size(2) == s_q,
                 "lse must have shape [", b, ", ", h_q, ", ", s_q, "], got ", shape_str(lse));
  check_device(out, "out", q);
  check_device(lse, "lse", q);
  check_last_dim_contiguous(out, "out");
  check_aligned(out, "out");
}

// float32 elements of the split-partials workspace: 2 * num_sm_parts slots (at most 2 * (num_sm_parts - 1)
// pieces exist: each part boundary inside a request adds one piece and can create at most one split request),
// each of h_kv * q_seq_per_hk rows of 512 O partials + 1 LSE. Bounded by the part count, not the batch size.
// Mirrors workspace_numel in flashmla_ops/_validation.py.
int64_t workspace_numel(int64_t num_sm_parts, int64_t h_kv, int64_t q_seq_per_hk) {
  return 2 * num_sm_parts * h_kv * q_seq_per_hk * (kHeadDimV + 1);
}

void check_workspace(const Tensor& q, const Tensor& k_cache, const Tensor& meta, const Tensor& workspace) {
  FLASHMLA_CHECK(workspace.scalar_type() == ScalarType::Float, "workspace must be float32, got ",
                 dtype_name(workspace.scalar_type()));
  const int64_t h_kv = k_cache.size(2), q_seq_per_hk = q.size(1) * (q.size(2) / h_kv);
  const int64_t need = workspace_numel(meta.size(0), h_kv, q_seq_per_hk);
  FLASHMLA_CHECK(workspace.numel() >= need, "workspace must have at least ", need,
                 " elements (2 * num_sm_parts * h_kv * s_q * (h_q / h_kv) * 513), got ", workspace.numel());
  check_device(workspace, "workspace", q);
  check_contiguous(workspace, "workspace");
  // The main kernel stores partials as float2 and the combine reads them as float4: a contiguous slice at an
  // odd offset (e.g. a carved-up scratch pool) would fault with a misaligned address, which kills the
  // context.
  FLASHMLA_CHECK(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0,
                 "workspace must be 16-byte aligned (its data pointer), got an offset of ",
                 static_cast<int64_t>(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16), " bytes");
}

}  // namespace

namespace {

// Launches the kernels on already validated inputs and outputs, with q's device current. Both entry points
// below validate exactly once and then come here, so the functional op does not check its inputs twice.
void run_decode(const Tensor& q, const Tensor& k_cache, const Tensor& block_table,
                const Tensor& cache_seqlens, const Tensor& meta, const Tensor& num_splits,
                double softmax_scale, bool causal, DType dtype, const Tensor& out, const Tensor& lse,
                const std::optional<Tensor>& workspace, int kv_format = kKvNative,
                const std::optional<Tensor>& k_scale = std::nullopt) {
  const int device = q.get_device_index();
  check_sm90(device);

  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2), h_kv = k_cache.size(2);
  const int64_t q_seq_per_hk = s_q * (h_q / h_kv);
  const int64_t num_sm_parts = meta.size(0);
  // CUDA grid limits (checked before anything is launched, so a refused call writes nothing): the main
  // kernel's grid is (m-blocks, h_kv, num_sm_parts), the combine's (min(b, 2 * num_sm_parts), at most
  // ceil(h_kv * rows / 8), 4 or 8), or (b, h_kv * rows, 4) for a few requests split into many pieces, which
  // the launcher only picks when h_kv * rows <= 65535.
  constexpr int64_t kMaxGridYZ = 65535;
  FLASHMLA_CHECK(num_sm_parts <= kMaxGridYZ, "tile_scheduler_metadata has ", num_sm_parts,
                 " parts; the CUDA kernels support at most 65535");
  FLASHMLA_CHECK(b < (int64_t{1} << 31) - 1, "batch size ", b, " is too large for the CUDA kernels");
  FLASHMLA_CHECK((h_kv * q_seq_per_hk + 7) / 8 <= kMaxGridYZ, "s_q * h_q = ", s_q * h_q,
                 " query rows per request exceed the CUDA kernels' limit of 524280");

  DecodeParams p{};
  p.b = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.q_heads_per_hk = static_cast<int>(h_q / h_kv);
  p.q_seq_per_hk = static_cast<int>(q_seq_per_hk);
  p.num_m_blocks = static_cast<int>((q_seq_per_hk + kBlockM - 1) / kBlockM);
  p.num_sm_parts = static_cast<int>(num_sm_parts);
  p.num_pages = static_cast<int>(k_cache.size(0) < INT32_MAX ? k_cache.size(0) : INT32_MAX);
  p.max_blocks_per_seq = static_cast<int>(block_table.size(1) < INT32_MAX ? block_table.size(1) : INT32_MAX);
  // MTP with one query token has nothing to mask; matches FlashMLA, which forces causal off for s_q == 1.
  p.causal = causal && s_q > 1;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);

  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k = k_cache.data_ptr();
  p.kv_format = kv_format;
  p.k_scale = k_scale.has_value() ? static_cast<const float*>(k_scale->data_ptr()) : nullptr;
  if (kv_format == kKvNative) {
    make_k_tensor_map(k_cache, dtype, &p.tma_k);
  } else {
    make_fp8_tensor_maps(k_cache, kv_format, &p);
  }
  p.k_page_stride = k_cache.stride(0);
  p.k_row_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.block_table = static_cast<const int32_t*>(block_table.data_ptr());
  p.block_table_batch_stride = block_table.stride(0);
  p.seqlens = static_cast<const int32_t*>(cache_seqlens.data_ptr());
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0);
  p.o_seq_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.lse = static_cast<float*>(lse.data_ptr());
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.lse_seq_stride = lse.stride(2);
  p.meta = static_cast<const int32_t*>(meta.data_ptr());
  p.num_splits = static_cast<const int32_t*>(num_splits.data_ptr());

  // Split accumulators (see workspace_numel): O partials, then LSE partials. The caller's workspace (already
  // validated) when given, so that the call allocates nothing; otherwise one from the caching allocator,
  // released to it (stream-ordered) when this function returns.
  const int64_t rows = 2 * num_sm_parts * h_kv * q_seq_per_hk;
  std::optional<Tensor> own_workspace;
  if (!workspace.has_value()) {
    own_workspace =
        torch::stable::new_empty(q, {workspace_numel(num_sm_parts, h_kv, q_seq_per_hk)}, ScalarType::Float);
  }
  const Tensor& ws = workspace.has_value() ? *workspace : *own_workspace;
  p.o_accum = static_cast<float*>(ws.data_ptr());
  p.lse_accum = p.o_accum + rows * kHeadDimV;

  const cudaStream_t stream = current_stream(device);
  if (kv_format != kKvNative) {
    check_cuda(launch_decode_sm90_fp8(p, dtype, stream), "decode kernel launch");
  } else {
    check_cuda(
        dtype == DType::kBF16 ? launch_decode_sm90_bf16(p, stream) : launch_decode_sm90_fp16(p, stream),
        "decode kernel launch");
  }
  check_cuda(launch_combine(p, dtype, stream), "combine kernel launch");
}

}  // namespace

void mla_decode_out_cuda(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens,
                         int64_t head_dim_v, Tensor meta, Tensor num_splits, double softmax_scale,
                         bool causal, Tensor out, Tensor lse, std::optional<Tensor> workspace) {
  const DType dtype = check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits);
  check_outputs(q, out, lse);
  if (workspace.has_value()) check_workspace(q, k_cache, meta, *workspace);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  run_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal, dtype, out, lse,
             workspace);
}

std::tuple<Tensor, Tensor> mla_decode_cuda(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens,
                                           int64_t head_dim_v, Tensor meta, Tensor num_splits,
                                           double softmax_scale, bool causal) {
  // Validate before allocating so that a bad input reports its own error, not an allocation one. The fresh
  // outputs have the right shapes, dtypes and strides by construction: no output check is needed.
  const DType dtype = check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits);
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  Tensor out = torch::stable::new_empty(q, {b, s_q, h_q, kHeadDimV});
  Tensor lse = torch::stable::new_empty(q, {b, h_q, s_q}, ScalarType::Float);
  run_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal, dtype, out, lse,
             std::nullopt);
  return {out, lse};
}

void mla_decode_fp8_out_cuda(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens,
                             int64_t head_dim_v, Tensor meta, Tensor num_splits, double softmax_scale,
                             bool causal, std::optional<Tensor> k_scale, Tensor out, Tensor lse,
                             std::optional<Tensor> workspace) {
  int kv_format = kKvNative;
  const DType dtype =
      check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits, &kv_format);
  check_k_scale(kv_format, k_scale, q);
  check_outputs(q, out, lse);
  if (workspace.has_value()) check_workspace(q, k_cache, meta, *workspace);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  run_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal, dtype, out, lse,
             workspace, kv_format, k_scale);
}

std::tuple<Tensor, Tensor> mla_decode_fp8_cuda(Tensor q, Tensor k_cache, Tensor block_table,
                                               Tensor cache_seqlens, int64_t head_dim_v, Tensor meta,
                                               Tensor num_splits, double softmax_scale, bool causal,
                                               std::optional<Tensor> k_scale) {
  int kv_format = kKvNative;
  const DType dtype =
      check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits, &kv_format);
  check_k_scale(kv_format, k_scale, q);
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  Tensor out = torch::stable::new_empty(q, {b, s_q, h_q, kHeadDimV});
  Tensor lse = torch::stable::new_empty(q, {b, h_q, s_q}, ScalarType::Float);
  run_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, softmax_scale, causal, dtype, out, lse,
             std::nullopt, kv_format, k_scale);
  return {out, lse};
}

}  // namespace flashmla::api

STABLE_TORCH_LIBRARY_IMPL(flashmla, CUDA, m) {
  m.impl("mla_decode", TORCH_BOX(&flashmla::api::mla_decode_cuda));
  m.impl("mla_decode_out", TORCH_BOX(&flashmla::api::mla_decode_out_cuda));
  m.impl("mla_decode_fp8", TORCH_BOX(&flashmla::api::mla_decode_fp8_cuda));
  m.impl("mla_decode_fp8_out", TORCH_BOX(&flashmla::api::mla_decode_fp8_out_cuda));
}
