// Shared helpers for every kernel family: error checking and the "is there a GPU" guard.
// Framework-free: kernels take raw device pointers and a cudaStream_t; no torch, no pybind11 here.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace qsparse {

// Thrown for any CUDA failure; bindings.cpp maps it to a Python RuntimeError.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw CudaError(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                    "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

}  // namespace qsparse

// Wrap every runtime call.
#define QS_CUDA_CHECK(call) ::qsparse::cuda_check((call), #call, __FILE__, __LINE__)
// After every launch: catches bad configurations immediately (asynchronous faults surface at the next sync).
#define QS_LAUNCH_CHECK(name) ::qsparse::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)

namespace qsparse {

// Raises a clear error when no usable GPU is present. Without a driver, cudaGetDeviceCount reports
// cudaErrorInsufficientDriver ("driver version is insufficient"): that means "no GPU" here.
void require_gpu();
// Number of visible GPUs, 0 when there is no driver or no device (never throws).
int gpu_count();

// Appends a thread-block-cluster shape of (1, size, 1) to attrs[n] and returns the new count (sm_90+ only:
// the caller passes the device's compute-capability major and gets n back unchanged below 9).
inline int add_cluster_y_attr(cudaLaunchAttribute* attrs, int n, int size, int cc_major) {
  if (cc_major < 9) return n;
  attrs[n].id = cudaLaunchAttributeClusterDimension;
  attrs[n].val.clusterDim.x = 1;
  attrs[n].val.clusterDim.y = size;
  attrs[n].val.clusterDim.z = 1;
  return n + 1;
}

template <typename T>
inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace qsparse
