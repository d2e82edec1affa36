// Host launcher of flashmla::get_mla_metadata on CUDA: validates metadata, allocates the two outputs on the
// input's device, launches the one-CTA scheduler kernel on the current stream. No host sync, so one call per
// decode step can sit inside a CUDA graph and serve every layer.
#include <optional>
#include <tuple>

#include "api/common.h"
#include "kernels/launch.h"

namespace flashmla::api {

std::tuple<Tensor, Tensor> get_mla_metadata_cuda(Tensor cache_seqlens, int64_t num_q_tokens_per_head_k,
                                                 int64_t num_heads_k, int64_t num_sm_parts) {
  // Same checks, order and messages as flashmla_ops/_validation.py::check_get_mla_metadata.
  FLASHMLA_CHECK(cache_seqlens.scalar_type() == ScalarType::Int, "cache_seqlens must be int32, got ",
                 dtype_name(cache_seqlens.scalar_type()));
  FLASHMLA_CHECK(cache_seqlens.dim() == 1, "cache_seqlens must be a 1-D tensor [b], got shape ",
                 shape_str(cache_seqlens));
  FLASHMLA_CHECK(cache_seqlens.size(0) > 0, "batch size must be positive, got ", cache_seqlens.size(0));
  FLASHMLA_CHECK(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous, got shape ",
                 shape_str(cache_seqlens), " and strides ", strides_str(cache_seqlens));
  FLASHMLA_CHECK(num_q_tokens_per_head_k >= 1, "num_q_tokens_per_head_k must be >= 1, got ",
                 num_q_tokens_per_head_k);
  FLASHMLA_CHECK(num_heads_k >= 1, "num_heads_k must be >= 1, got ", num_heads_k);
  FLASHMLA_CHECK(num_sm_parts >= 1, "num_sm_parts must be >= 1, got ", num_sm_parts);
  // Device limits of the scheduler kernel (int32 request indices and part counts; the decode grid's z).
  FLASHMLA_CHECK(cache_seqlens.size(0) <= (int64_t{1} << 30), "batch size ", cache_seqlens.size(0),
                 " is too large for the CUDA scheduler (at most 2^30)");
  FLASHMLA_CHECK(num_sm_parts <= 65535, "num_sm_parts must be at most 65535 on CUDA, got ", num_sm_parts);

  const int device = cache_seqlens.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t b = cache_seqlens.size(0);
  Tensor meta = torch::stable::new_empty(cache_seqlens, {num_sm_parts, kMetaSize}, ScalarType::Int);
  Tensor num_splits = torch::stable::new_empty(cache_seqlens, {b + 1}, ScalarType::Int);
  // Past kSchedSmemRequests the scheduler's per-request arrays do not fit in its shared memory.
  std::optional<Tensor> scratch;
  if (b > kSchedSmemRequests) {
    scratch =
        torch::stable::new_empty(cache_seqlens, {b * kSchedScratchBytesPerRequest / 8}, ScalarType::Long);
  }

  SchedParams p{};
  p.seqlens = static_cast<const int32_t*>(cache_seqlens.data_ptr());
  p.meta = static_cast<int32_t*>(meta.data_ptr());
  p.num_splits = static_cast<int32_t*>(num_splits.data_ptr());
  p.scratch = scratch ? static_cast<int64_t*>(scratch->data_ptr()) : nullptr;
  p.b = static_cast<int>(b);
  p.num_sm_parts = static_cast<int>(num_sm_parts);
  check_cuda(launch_sched_meta(p, current_stream(device)), "scheduler kernel launch");
  return {meta, num_splits};
}

}  // namespace flashmla::api

STABLE_TORCH_LIBRARY_IMPL(flashmla, CUDA, m) {
  m.impl("get_mla_metadata", TORCH_BOX(&flashmla::api::get_mla_metadata_cuda));
}
