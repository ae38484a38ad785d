// Streaming-read ceiling: how fast this GPU can read a large buffer once, with nothing else to do.
// The benches divide every kernel's bytes by this (or by an eager device copy, whichever is faster).
// Grid-stride 16-byte streaming loads, the words summed as uint32 (wrapping, so the result is exact and
// checkable), one block reduction, one value written per block so the loads cannot be optimized away.
#include <cstdint>
#include <stdexcept>

#include "bench/stream.cuh"

namespace qsparse {
namespace {

constexpr int kStreamThreads = 512;

__global__ void __launch_bounds__(kStreamThreads) stream_read_kernel(const uint4* __restrict__ data, long long n16,
                                                                     uint32_t* __restrict__ out) {
  __shared__ uint32_t red[kStreamThreads / 32];
  uint32_t s0 = 0, s1 = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + stride < n16; i += 2 * stride) {  // two independent loads in flight per thread
    const uint4 a = __ldcs(data + i), b = __ldcs(data + i + stride);
    s0 += a.x + a.y + a.z + a.w;
    s1 += b.x + b.y + b.z + b.w;
  }
  if (i < n16) {
    const uint4 a = __ldcs(data + i);
    s0 += a.x + a.y + a.z + a.w;
  }
  uint32_t s = s0 + s1;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t t = 0;
    for (int w = 0; w < kStreamThreads / 32; ++w) t += red[w];
    out[blockIdx.x] = t;
  }
}

}  // namespace

int stream_read_blocks() {
  int dev = 0, sms = 0, per_sm = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  QS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  QS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stream_read_kernel, kStreamThreads, 0));
  return sms * (per_sm < 1 ? 1 : per_sm);
}

void stream_read(const void* data, long long nbytes, uint32_t* out, int blocks, cudaStream_t stream) {
  if (nbytes < 0 || nbytes % 16 != 0) throw std::invalid_argument("stream_read: nbytes must be a multiple of 16");
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) {
    throw std::invalid_argument("stream_read: data must be 16-byte aligned");
  }
  if (blocks < 1) throw std::invalid_argument("stream_read: blocks must be >= 1");
  stream_read_kernel<<<blocks, kStreamThreads, 0, stream>>>(static_cast<const uint4*>(data), nbytes / 16, out);
  QS_LAUNCH_CHECK("stream_read_kernel");
}

}  // namespace qsparse
