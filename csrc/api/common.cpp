#include "api/common.h"

#include <dlfcn.h>

#include <array>
#include <mutex>

// aoti_torch_get_current_cuda_stream lives in libtorch_cuda, which a CPU-only torch does not have. The
// reference is weak so that a build made against a CPU-only torch (CI's compile check) still loads; with a
// CUDA torch it resolves at load time, or else through the already loaded libtorch_cuda below.
#pragma weak aoti_torch_get_current_cuda_stream

namespace flashmla::api {

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Short: return "int16";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Bool: return "bool";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    default: return "another dtype";
  }
}

std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

std::string strides_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.stride(i));
  return s + "]";
}

std::string device_str(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return t.is_cpu() ? "cpu" : "another device";
}

namespace {
using GetStreamFn = AOTITorchError (*)(int32_t, void**);

GetStreamFn resolve_stream_getter() {
  if (&aoti_torch_get_current_cuda_stream != nullptr) return &aoti_torch_get_current_cuda_stream;
  for (const char* lib : {"libtorch_cuda.so", "libtorch.so"}) {
    if (void* h = dlopen(lib, RTLD_NOLOAD | RTLD_LAZY)) {
      if (void* f = dlsym(h, "aoti_torch_get_current_cuda_stream")) return reinterpret_cast<GetStreamFn>(f);
    }
  }
  return nullptr;
}
}  // namespace

cudaStream_t current_stream(int device_index) {
  static const GetStreamFn getter = resolve_stream_getter();
  FLASHMLA_CHECK(getter != nullptr, "this torch build has no CUDA stream support (is it a CPU-only build?)");
  void* stream = nullptr;
  FLASHMLA_CHECK(getter(device_index, &stream) == AOTI_TORCH_SUCCESS,
                 "could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

void check_sm90(int device_index) {
  constexpr int kMaxDevices = 64;
  static std::array<int, kMaxDevices> cc{};  // 0 = not queried yet
  static std::mutex mu;
  FLASHMLA_CHECK(device_index >= 0 && device_index < kMaxDevices, "unsupported device index ", device_index);
  int v;
  {
    std::lock_guard<std::mutex> lock(mu);
    v = cc[device_index];
    if (v == 0) {
      int major = 0, minor = 0;
      check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_index),
                 "cudaDeviceGetAttribute");
      check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_index),
                 "cudaDeviceGetAttribute");
      v = cc[device_index] = major * 10 + minor;
    }
  }
  FLASHMLA_CHECK(v == 90, "the CUDA kernels need a Hopper GPU (sm_90); cuda:", device_index, " is sm_", v);
}

void check_cuda(cudaError_t err, const char* what) {
  FLASHMLA_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace flashmla::api
