// Shared host helper of the kernels' launchers (torch-free): the dynamic shared-memory opt-in.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace flashmla {

// The dynamic shared-memory opt-in is a per-device attribute of a kernel function: set it once per device
// and kernel, not on every decode call (it is host work on the latency-critical small-batch path).
template <class Kernel>
cudaError_t configure_smem_once(Kernel kernel, int smem_bytes, std::atomic<bool>* configured,
                                int max_devices) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= max_devices || !configured[device].load(std::memory_order_acquire)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    if (device >= 0 && device < max_devices) configured[device].store(true, std::memory_order_release);
  }
  return cudaSuccess;
}

}  // namespace flashmla
