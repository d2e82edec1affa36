// Torch-free entry points of the kernels. Host launchers in csrc/api fill the params structs from tensor
// metadata and call these; each returns the launch's cudaError_t (cudaGetLastError right after the launch).
#pragma once

#include <cuda_runtime.h>

#include "kernels/params.h"

namespace flashmla {

enum class DType { kBF16, kFP16 };

// csrc/kernels/sched_meta.cu: one CTA computes tile_scheduler_metadata and num_splits on the device.
cudaError_t launch_sched_meta(const SchedParams& params, cudaStream_t stream);
// csrc/kernels/sched_invariant.cu: the batch-invariant schedule (num_work_parts, ctas_per_part set).
cudaError_t launch_sched_invariant(const SchedParams& params, cudaStream_t stream);

// csrc/kernels/sm90/decode_{bf16,fp16}.cu: the split-KV main kernel (wgmma, sm_90a).
cudaError_t launch_decode_sm90_bf16(const DecodeParams& params, cudaStream_t stream);
cudaError_t launch_decode_sm90_fp16(const DecodeParams& params, cudaStream_t stream);
// csrc/kernels/sm90/decode_fp8.cu: the same for an FP8 cache (params.kv_format), dequantised in the kernel;
// `dtype` is q's (and out's) dtype. The DeepSeek V3.2 format takes bf16 q only.
cudaError_t launch_decode_sm90_fp8(const DecodeParams& params, DType dtype, cudaStream_t stream);

// csrc/kernels/combine.cu: merges the fp32 partials of split requests through their LSEs.
cudaError_t launch_combine(const DecodeParams& params, DType dtype, cudaStream_t stream);

}  // namespace flashmla
