// Helpers shared by the host launchers: error checks with the same messages as the Python validation
// (flashmla_ops/_validation.py), the current CUDA stream, and cached device properties. Launchers read
// tensor metadata only (sizes, strides, dtypes, devices, data pointers), never tensor values.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

namespace flashmla::api {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Messages are built with std::string and std::to_string only: with torch 2.11, a message formatted through
// std::ostringstream with integer or std::string pieces crashed the process when the exception crossed the
// stable-ABI boundary, while plain strings did not.
inline std::string to_msg(const char* s) {
  return s;
}
inline std::string to_msg(const std::string& s) {
  return s;
}
inline std::string to_msg(int64_t v) {
  return std::to_string(v);
}
inline std::string to_msg(int v) {
  return std::to_string(v);
}

template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::string msg = "flashmla: ";
  ((msg += to_msg(args)), ...);
  throw std::runtime_error(msg);
}
#define FLASHMLA_CHECK(cond, ...)                    \
  do {                                               \
    if (!(cond)) ::flashmla::api::fail(__VA_ARGS__); \
  } while (0)

const char* dtype_name(ScalarType t);
std::string shape_str(const Tensor& t);
std::string strides_str(const Tensor& t);
std::string device_str(const Tensor& t);  // "cuda:0", "cpu", as torch prints them

// The current CUDA stream of `device_index` (the one torch, CUDA graphs and torch.compile use).
cudaStream_t current_stream(int device_index);

// Raises unless the device is an sm_90 (Hopper) GPU. Cached per device: no driver call per launch.
void check_sm90(int device_index);

void check_cuda(cudaError_t err, const char* what);

}  // namespace flashmla::api
