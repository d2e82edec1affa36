// Instantiation of the sm_90a decode kernels for FP8 KV caches (kernels/sm90/dequant_fp8.cuh): per-tensor
// e4m3 with bf16 or fp16 q, DeepSeek V3.2's 656-byte format with bf16 q.
#include "kernels/sm90/decode_dispatch.cuh"

namespace flashmla {

cudaError_t launch_decode_sm90_fp8(const DecodeParams& params, DType dtype, cudaStream_t stream) {
  if (params.kv_format == kKvFp8V32) {
    if (dtype != DType::kBF16)
      return cudaErrorInvalidValue;  // the launcher refuses this with a message first
    return sm90::launch_decode_fp8<cutlass::bfloat16_t, kKvFp8V32>(params, stream);
  }
  if (params.kv_format != kKvFp8Tensor) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? sm90::launch_decode_fp8<cutlass::bfloat16_t, kKvFp8Tensor>(params, stream)
                               : sm90::launch_decode_fp8<cutlass::half_t, kKvFp8Tensor>(params, stream);
}

}  // namespace flashmla
