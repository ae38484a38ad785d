// LM head GEMV with the final RMSNorm fused in: logits = RMSNorm(x) @ W^T, W [V, H] bf16/fp16/fp32.
//
// The head is the largest single read of a decode step (V*H*2 bytes at bf16), so it is a plain streaming
// GEMV: a persistent grid, each block normalizes x into shared memory once, then every warp walks whole
// rows with 16-byte loads and fp32 accumulation.
#include <cmath>

#include "decode_common.cuh"

namespace qsparse {
namespace {

constexpr int kHeadThreads = 256;

template <typename W>
struct Vec;  // 16 bytes of W
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
};
template <>
struct Vec<__half> {
  static constexpr int N = 8;
};
template <>
struct Vec<float> {
  static constexpr int N = 4;
};

template <typename W>
__device__ __forceinline__ float dot16(const uint4& raw, const float* x) {
  float s = 0.f;
  const W* w = reinterpret_cast<const W*>(&raw);
#pragma unroll
  for (int j = 0; j < Vec<W>::N; ++j) s += dec::to_f<W>(w[j]) * x[j];
  return s;
}

template <typename W, bool VEC>
__global__ void __launch_bounds__(kHeadThreads) lm_head_kernel(const float* __restrict__ x,
                                                               const float* __restrict__ norm_w, float eps,
                                                               const W* __restrict__ Wt, int V, int H,
                                                               float* __restrict__ logits) {
  extern __shared__ float xs[];  // [H]
  __shared__ float scratch[32];
  float r = 1.f;
  if (norm_w != nullptr) {
    float ss = 0.f;
    for (int h = threadIdx.x; h < H; h += blockDim.x) ss += x[h] * x[h];
    ss = dec::block_sum(ss, scratch);
    r = rsqrtf(ss / (float)H + eps);
  }
  for (int h = threadIdx.x; h < H; h += blockDim.x) xs[h] = norm_w != nullptr ? x[h] * r * norm_w[h] : x[h];
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int row = blockIdx.x * nwarps + warp; row < V; row += gridDim.x * nwarps) {
    const W* wr = Wt + (size_t)row * H;
    float s = 0.f;
    if (VEC) {
      constexpr int N = Vec<W>::N;
      const uint4* w4 = reinterpret_cast<const uint4*>(wr);
      const int nvec = H / N;
#pragma unroll 4
      for (int i = lane; i < nvec; i += 32) {
        const uint4 raw = __ldcs(w4 + i);  // streamed once per token: do not keep it in L1/L2
        s += dot16<W>(raw, xs + i * N);
      }
    } else {
      for (int h = lane; h < H; h += 32) s += dec::to_f<W>(wr[h]) * xs[h];
    }
    s = dec::warp_sum(s);
    if (lane == 0) logits[row] = s;
  }
}

int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    QS_CUDA_CHECK(cudaGetDevice(&dev));
    QS_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  }
  return n;
}

template <typename W>
void launch(const float* x, const float* norm_w, float eps, const void* Wt, int T, int V, int H, float* logits,
            cudaStream_t stream) {
  const size_t smem = sizeof(float) * (size_t)H;
  const bool vec = (H % Vec<W>::N == 0) && (reinterpret_cast<uintptr_t>(Wt) % 16 == 0);
  auto kern = vec ? lm_head_kernel<W, true> : lm_head_kernel<W, false>;
  if (smem > 48 * 1024) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const int rows_per_block = kHeadThreads / 32;
  int grid = (V + rows_per_block - 1) / rows_per_block;
  const int cap = sm_count() * 8;  // persistent: each block normalizes x once, then streams many rows
  if (grid > cap) grid = cap;
  for (int t = 0; t < T; ++t) {
    kern<<<grid, kHeadThreads, smem, stream>>>(x + (size_t)t * H, norm_w, eps, (const W*)Wt, V, H,
                                               logits + (size_t)t * V);
    QS_LAUNCH_CHECK("lm_head_kernel");
  }
}

}  // namespace

void lm_head(const float* x, const float* norm_w, float eps, const void* W, int wdtype, int T, int V, int H,
             float* logits, cudaStream_t stream) {
  if (T <= 0) return;
  switch (wdtype) {
    case kDBF16: launch<__nv_bfloat16>(x, norm_w, eps, W, T, V, H, logits, stream); break;
    case kDF16: launch<__half>(x, norm_w, eps, W, T, V, H, logits, stream); break;
    case kDF32: launch<float>(x, norm_w, eps, W, T, V, H, logits, stream); break;
    default: throw std::invalid_argument("lm_head: unsupported weight dtype code");
  }
}

}  // namespace qsparse
