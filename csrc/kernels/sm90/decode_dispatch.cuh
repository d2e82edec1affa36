// Host-side launch of the sm_90a decode main kernel for one dtype: picks the main loop by the number of
// 64-row tiles per kv head (a shape property, so the choice never depends on tensor values).
#pragma once

#include "kernels/sm90/mainloop_serial.cuh"
#include "kernels/sm90/mainloop_seesaw.cuh"
#include "kernels/sm90/mainloop_pingpong_fp8.cuh"

namespace flashmla::sm90 {

// One main-kernel instantiation launched on `grid` with kSmem bytes of dynamic shared memory; its
// shared-memory opt-in is set once per device (the flags live in this function's instantiation, one per
// kernel).
template <auto kKernel, int kSmem, int kBlockThreads = kThreads>
cudaError_t launch_main(dim3 grid, const DecodeParams& p, cudaStream_t stream) {
  static_assert(kSmem <= kSmemLimit, "more shared memory than an sm_90 CTA can have");
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> configured[kMaxDevices];
  const cudaError_t err = configure_smem_once(kKernel, kSmem, configured, kMaxDevices);
  if (err != cudaSuccess) return err;
  kKernel<<<grid, kBlockThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_m_blocks, p.h_kv, p.num_sm_parts);
  if (p.num_m_blocks >= 2) {
    // Two or more tiles per kv head (h_q * s_q / h_kv > 64): tensor-bound, the seesaw loop keeps the tensor
    // cores busy while a warpgroup runs its softmax.
    const cudaError_t err =
        launch_main<decode_seesaw_kernel<T>, static_cast<int>(sizeof(SeesawStorage<T>))>(grid, p, stream);
#ifdef FMLA_TRACE
    if (err == cudaSuccess) trace_dump(grid, stream, "seesaw");
#endif
    return err;
  }
  // One tile: memory-bound, the serial loop's deeper page prefetch wins.
  const cudaError_t err =
      launch_main<decode_serial_kernel<T>, static_cast<int>(sizeof(SerialStorage<T>))>(grid, p, stream);
#ifdef FMLA_TRACE
  if (err == cudaSuccess) trace_dump(grid, stream, "serial");
#endif
  return err;
}

// FP8 caches. Up to 32 query rows per kv head (the memory-bound shapes; fp8_tokens_as_m): tokens as the
// wgmma M dimension, the FP8 bytes converted straight into wgmma registers, the two warpgroups on different
// pages (mainloop_pingpong_fp8.cuh). More rows: the serial loop, its warpgroup 1 expanding each page in
// place while the other page's P V runs (the seesaw loop has no idle warpgroup to do it).
template <typename T, int kFmt>
cudaError_t launch_decode_fp8(const DecodeParams& p, cudaStream_t stream) {
  if (fp8_tokens_as_m(p.q_seq_per_hk)) {
    const dim3 grid(1, p.h_kv, p.num_sm_parts);
    if (p.q_seq_per_hk <= 16) {
      return launch_main<decode_pingpong_fp8_kernel<T, kFmt, 16>,
                         static_cast<int>(sizeof(PingPongStorage<T, kFmt, 16>)), kPpThreads>(grid, p, stream);
    }
    return launch_main<decode_pingpong_fp8_kernel<T, kFmt, 32>,
                       static_cast<int>(sizeof(PingPongStorage<T, kFmt, 32>)), kPpThreads>(grid, p, stream);
  }
  const dim3 grid(p.num_m_blocks, p.h_kv, p.num_sm_parts);
  return launch_main<decode_serial_kernel<T, kFmt>, static_cast<int>(sizeof(SerialStorage<T, kFmt>))>(grid, p,
                                                                                                      stream);
}

}  // namespace flashmla::sm90
