// Ternary pack / unpack on the GPU, bit-exact with quant.pack_ternary / unpack_ternary (format v1):
// packed [D, RB] uint8, byte [k, b] holds packed columns 4b..4b+3 at bits 2j as code t + 1.
// Not on any hot path: one thread per packed byte, simple and obviously right.
#include "common/common.cuh"
#include "linear/api.cuh"

namespace qsparse {
namespace {

__global__ void pack_kernel(const int8_t* __restrict__ w, const int32_t* __restrict__ colinfo,
                            uint8_t* __restrict__ packed, int32_t* err, int D, int RB) {
  const size_t total = static_cast<size_t>(D) * RB;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int k = static_cast<int>(i / RB), b = static_cast<int>(i % RB);
    unsigned byte = 0;
    for (int j = 0; j < 4; ++j) {
      const int info = colinfo[4 * b + j];
      int code = 1;  // padding columns hold weight 0
      if (info >= 0) {
        const int v = w[static_cast<size_t>(info & 0xffffff) * D + k];
        if (v < -1 || v > 1) atomicExch(err, 1);
        code = v + 1;
      }
      byte |= static_cast<unsigned>(code & 3) << (2 * j);
    }
    packed[i] = static_cast<uint8_t>(byte);
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, const int32_t* __restrict__ colinfo,
                              int8_t* __restrict__ w, int32_t* err, int D, int RB) {
  const size_t total = static_cast<size_t>(D) * RB;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int k = static_cast<int>(i / RB), b = static_cast<int>(i % RB);
    const unsigned byte = packed[i];
    for (int j = 0; j < 4; ++j) {
      const int code = (byte >> (2 * j)) & 3;
      if (code == 3) atomicExch(err, 1);
      const int info = colinfo[4 * b + j];
      if (info >= 0) w[static_cast<size_t>(info & 0xffffff) * D + k] = static_cast<int8_t>(code - 1);
    }
  }
}

int grid_for(size_t n) {
  const size_t blocks = (n + 255) / 256;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

void launch_pack(const int8_t* w, const int32_t* colinfo, uint8_t* packed, int32_t* err, int N, int D, int RB,
                 cudaStream_t stream) {
  (void)N;
  pack_kernel<<<grid_for(static_cast<size_t>(D) * RB), 256, 0, stream>>>(w, colinfo, packed, err, D, RB);
  QS_LAUNCH_CHECK("pack_kernel");
}

void launch_unpack(const uint8_t* packed, const int32_t* colinfo, int8_t* w, int32_t* err, int D, int RB,
                   cudaStream_t stream) {
  unpack_kernel<<<grid_for(static_cast<size_t>(D) * RB), 256, 0, stream>>>(packed, colinfo, w, err, D, RB);
  QS_LAUNCH_CHECK("unpack_kernel");
}

}  // namespace qsparse
