// Host-side launch of the sm_90a decode main kernel for one dtype: picks the main loop by the number of
// 64-row tiles per kv head (a shape property, so the choice never depends on tensor values).
#pragma once

#include "kernels/sm90/mainloop_serial.cuh"
#include "kernels/sm90/mainloop_seesaw.cuh"
#include "kernels/sm90/mainloop_transposed.cuh"

namespace flashmla::sm90 {

template <typename T>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  const dim3 grid(p.num_m_blocks, p.h_kv, p.num_sm_parts);
  if (p.num_m_blocks >= 2) {
    // Two or more tiles per kv head (h_q * s_q / h_kv > 64): tensor-bound, the seesaw loop keeps the tensor
    // cores busy while a warpgroup runs its softmax.
    constexpr int smem_bytes = static_cast<int>(sizeof(SeesawStorage<T>));
    static std::atomic<bool> configured[kMaxDevices];
    const cudaError_t err = configure_smem_once(decode_seesaw_kernel<T>, smem_bytes, configured, kMaxDevices);
    if (err != cudaSuccess) return err;
    decode_seesaw_kernel<T><<<grid, kThreads, smem_bytes, stream>>>(p);
#ifdef FMLA_TRACE
    trace_dump(grid, stream, "seesaw");
#endif
  } else {
    // One tile: memory-bound, the serial loop's deeper page prefetch wins.
    constexpr int smem_bytes = static_cast<int>(sizeof(SerialStorage<T>));
    static std::atomic<bool> configured[kMaxDevices];
    const cudaError_t err = configure_smem_once(decode_serial_kernel<T>, smem_bytes, configured, kMaxDevices);
    if (err != cudaSuccess) return err;
    decode_serial_kernel<T><<<grid, kThreads, smem_bytes, stream>>>(p);
#ifdef FMLA_TRACE
    trace_dump(grid, stream, "serial");
#endif
  }
  return cudaGetLastError();
}

template <typename T, int kFmt, int kN>
cudaError_t launch_decode_transposed(const DecodeParams& p, cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  const dim3 grid(1, p.h_kv, p.num_sm_parts);
  constexpr int smem_bytes =
      static_cast<int>(sizeof(TransposedStorage<T, kFmt, kN, transposed_slots<T, kFmt, kN>()>));
  static_assert(smem_bytes <= kSmemLimit, "more shared memory than an sm_90 CTA can have");
  static std::atomic<bool> configured[kMaxDevices];
  const cudaError_t err =
      configure_smem_once(decode_transposed_kernel<T, kFmt, kN>, smem_bytes, configured, kMaxDevices);
  if (err != cudaSuccess) return err;
  decode_transposed_kernel<T, kFmt, kN><<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// FP8 caches. Up to 32 query rows per kv head (the memory-bound shapes): the transposed kernel, tokens as
// the wgmma M dimension and a ring of FP8 staging pages (mainloop_transposed.cuh). More rows: the serial
// loop, its warpgroup 1 expanding each page in place while the other page's P V runs (the seesaw loop has
// no idle warpgroup to do it).
template <typename T, int kFmt>
cudaError_t launch_decode_fp8(const DecodeParams& p, cudaStream_t stream) {
  if (p.q_seq_per_hk <= 16) return launch_decode_transposed<T, kFmt, 16>(p, stream);
  if (p.q_seq_per_hk <= 32) return launch_decode_transposed<T, kFmt, 32>(p, stream);
  constexpr int kMaxDevices = 64;
  const dim3 grid(p.num_m_blocks, p.h_kv, p.num_sm_parts);
  constexpr int smem_bytes = static_cast<int>(sizeof(SerialStorage<T, kFmt>));
  static_assert(smem_bytes <= 227 * 1024, "more shared memory than an sm_90 CTA can have");
  static std::atomic<bool> configured[kMaxDevices];
  const cudaError_t err =
      configure_smem_once(decode_serial_kernel<T, kFmt>, smem_bytes, configured, kMaxDevices);
  if (err != cudaSuccess) return err;
  decode_serial_kernel<T, kFmt><<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashmla::sm90
