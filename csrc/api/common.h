// Helpers shared by the host launchers: error checks with the same messages as the Python validation
// (flashmla_ops/_validation.py), the current CUDA stream, and cached device properties. Launchers read
// tensor metadata only (sizes, strides, dtypes, devices, data pointers), never tensor values.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

namespace flashmla::api {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream oss;
  oss << "flashmla: ";
  ((oss << args), ...);
  throw std::runtime_error(oss.str());
}
#define FLASHMLA_CHECK(cond, ...)             \
  do {                                        \
    if (!(cond)) ::flashmla::api::fail(__VA_ARGS__); \
  } while (0)

const char* dtype_name(ScalarType t);
std::string shape_str(const Tensor& t);
std::string device_str(const Tensor& t);

// The current CUDA stream of `device_index` (the one torch, CUDA graphs and torch.compile use).
cudaStream_t current_stream(int device_index);

// Raises unless the device is an sm_90 (Hopper) GPU. Cached per device: no driver call per launch.
void check_sm90(int device_index);

void check_cuda(cudaError_t err, const char* what);

}  // namespace flashmla::api
