// Device discovery, kept separate so that importing _C never touches the driver.
#include "common/common.cuh"

namespace qsparse {

int gpu_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls report their own
    return 0;
  }
  return n;
}

void require_gpu() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice || (err == cudaSuccess && n == 0)) {
    cudaGetLastError();
    throw CudaError(std::string("no CUDA GPU available (") + cudaGetErrorString(err) +
                    "); use device=\"cpu\" for the reference path");
  }
  QS_CUDA_CHECK(err);
}

}  // namespace qsparse
