// Host-side launch of the sm_90a decode main kernel for one dtype: picks the main loop by the number of
// 64-row tiles per kv head (a shape property, so the choice never depends on tensor values).
#pragma once

#ifdef FMLA_ABL_SHADOW_MC
#include <cstdio>  // the ablation launcher reports its cluster occupancy once
#endif

#include "kernels/sm90/mainloop_serial.cuh"
#include "kernels/sm90/mainloop_seesaw.cuh"

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
#ifdef FMLA_ABL_SHADOW_MC
    // Ablation build (mainloop_seesaw.cuh): clusters of FMLA_ABL_SHADOW_MC m-block CTAs.
    if (p.num_m_blocks % FMLA_ABL_SHADOW_MC != 0) return cudaErrorInvalidConfiguration;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem_bytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = FMLA_ABL_SHADOW_MC;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    static bool reported = false;
    if (!reported) {
      int clusters = 0;
      cudaOccupancyMaxActiveClusters(&clusters, decode_seesaw_kernel<T>, &cfg);
      std::fprintf(stderr, "[FMLA_ABL_SHADOW_MC] grid %u x %u x %u, max active clusters %d\n", grid.x, grid.y,
                   grid.z, clusters);
      reported = true;
    }
    const cudaError_t lerr = cudaLaunchKernelEx(&cfg, decode_seesaw_kernel<T>, p);
    if (lerr != cudaSuccess) return lerr;
#else
    decode_seesaw_kernel<T><<<grid, kThreads, smem_bytes, stream>>>(p);
#endif
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

}  // namespace flashmla::sm90
