// Instantiation of the sm_90a decode kernels for bf16 (one translation unit per dtype keeps compiles short).
#include "kernels/sm90/decode_dispatch.cuh"

namespace flashmla {

cudaError_t launch_decode_sm90_bf16(const DecodeParams& params, cudaStream_t stream) {
  return sm90::launch_decode<cutlass::bfloat16_t>(params, stream);
}

}  // namespace flashmla
