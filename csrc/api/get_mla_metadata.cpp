// Host launcher of flashmla::get_mla_metadata on CUDA: validates metadata, allocates the two outputs on the
// input's device, launches the one-CTA scheduler kernel on the current stream. No host sync, so one call per
// decode step can sit inside a CUDA graph and serve every layer.
#include <algorithm>
#include <optional>
#include <tuple>

#include "api/common.h"
#include "kernels/launch.h"

namespace flashmla::api {

namespace {

// Same checks, order and messages as flashmla_ops/_validation.py::check_get_mla_metadata.
void check_sched_args(const Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k, int64_t num_heads_k,
                      int64_t num_sm_parts) {
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
}

// Device limits of the scheduler kernels (int32 request indices and part counts; the decode grid's z), after
// the checks Python makes too, so that both report the same first error.
void check_cuda_limits(const Tensor& cache_seqlens, int64_t num_sm_parts) {
  FLASHMLA_CHECK(cache_seqlens.size(0) <= (int64_t{1} << 30), "batch size ", cache_seqlens.size(0),
                 " is too large for the CUDA scheduler (at most 2^30)");
  FLASHMLA_CHECK(num_sm_parts <= 65535, "num_sm_parts must be at most 65535 on CUDA, got ", num_sm_parts);
}

// The two outputs and, past kSchedSmemRequests requests, the scheduler's global scratch; launches `launch`.
std::tuple<Tensor, Tensor> run_scheduler(const Tensor& cache_seqlens, int64_t num_sm_parts, SchedParams p,
                                         cudaError_t (*launch)(const SchedParams&, cudaStream_t)) {
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

  p.seqlens = static_cast<const int32_t*>(cache_seqlens.data_ptr());
  p.meta = static_cast<int32_t*>(meta.data_ptr());
  p.num_splits = static_cast<int32_t*>(num_splits.data_ptr());
  p.scratch = scratch ? static_cast<int64_t*>(scratch->data_ptr()) : nullptr;
  p.b = static_cast<int>(b);
  p.num_sm_parts = static_cast<int>(num_sm_parts);
  check_cuda(launch(p, current_stream(device)), "scheduler kernel launch");
  return {meta, num_splits};
}

}  // namespace

std::tuple<Tensor, Tensor> get_mla_metadata_cuda(Tensor cache_seqlens, int64_t num_q_tokens_per_head_k,
                                                 int64_t num_heads_k, int64_t num_sm_parts) {
  check_sched_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  check_cuda_limits(cache_seqlens, num_sm_parts);
  return run_scheduler(cache_seqlens, num_sm_parts, SchedParams{}, launch_sched_meta);
}

std::tuple<Tensor, Tensor> get_mla_metadata_batch_invariant_cuda(Tensor cache_seqlens,
                                                                 int64_t num_q_tokens_per_head_k,
                                                                 int64_t num_heads_k, int64_t num_sm_parts,
                                                                 int64_t num_work_parts) {
  // Same checks, order and messages as flashmla_ops/_validation.py::check_get_mla_metadata_batch_invariant.
  check_sched_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  FLASHMLA_CHECK(num_work_parts >= 1, "num_work_parts must be >= 1, got ", num_work_parts);
  FLASHMLA_CHECK(num_work_parts <= num_sm_parts, "num_work_parts (", num_work_parts,
                 ") must be at most num_sm_parts (", num_sm_parts, ")");
  check_cuda_limits(cache_seqlens, num_sm_parts);
  SchedParams p{};
  p.num_work_parts = static_cast<int>(num_work_parts);
  // The CTAs of one part: query tiles per kv head (ceil(rows / 64)) times kv heads. Past kInvariantCtaTarget
  // the chunk rule no longer looks at the value, so it is clamped there; the tile count is formed without
  // q + 63 and the product only when both factors are below the cap, so no int64 argument overflows.
  const int64_t tiles = num_q_tokens_per_head_k / kBlockM + (num_q_tokens_per_head_k % kBlockM > 0 ? 1 : 0);
  const int64_t cap = kInvariantCtaTarget;
  p.ctas_per_part =
      static_cast<int>(tiles >= cap || num_heads_k >= cap ? cap : std::min(tiles * num_heads_k, cap));
  return run_scheduler(cache_seqlens, num_sm_parts, p, launch_sched_invariant);
}

}  // namespace flashmla::api

STABLE_TORCH_LIBRARY_IMPL(flashmla, CUDA, m) {
  m.impl("get_mla_metadata", TORCH_BOX(&flashmla::api::get_mla_metadata_cuda));
  m.impl("get_mla_metadata_batch_invariant",
         TORCH_BOX(&flashmla::api::get_mla_metadata_batch_invariant_cuda));
}
