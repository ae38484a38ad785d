// LM head GEMV with the final RMSNorm fused in: logits = RMSNorm(x) @ W^T, W [V, H] bf16/fp16/fp32.
//
// The head is the largest single read of a decode step (V*H*2 bytes at bf16), so it is a plain streaming
// GEMV: a persistent grid, each block normalizes x into shared memory once, then every warp walks whole
// rows with 16-byte loads and fp32 accumulation.
#include <algorithm>
#include <cmath>

#include "decode/common.cuh"
#include "common/pdl.cuh"

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

// Explicit fma / rounding: the multi-row instances must give each row exactly the one-row result.
template <typename W>
__device__ __forceinline__ float dot16(const uint4& raw, const float* x) {
  float s = 0.f;
  const W* w = reinterpret_cast<const W*>(&raw);
#pragma unroll
  for (int j = 0; j < Vec<W>::N; ++j) s = __fmaf_rn(dec::to_f<W>(w[j]), x[j], s);
  return s;
}

// MAXT: rows of x per launch (nt <= MAXT at run time); RPW: W rows a warp walks at once, so every x value
// read from shared memory serves RPW rows (with many x rows, shared-memory reads would bound the kernel).
template <typename W, bool VEC, int MAXT, int RPW>
__global__ void __launch_bounds__(kHeadThreads) lm_head_kernel(const float* __restrict__ x,
                                                               const float* __restrict__ norm_w, float eps,
                                                               const W* __restrict__ Wt, int V, int H, int nt,
                                                               float* __restrict__ logits) {
  extern __shared__ float xs[];  // [nt][H]
  __shared__ float scratch[32];
  pdl::launch_dependents();  // the next kernel may start its prologue
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)
  for (int t = 0; t < nt; ++t) {
    const float* xt = x + (size_t)t * H;
    float r = 1.f;
    if (norm_w != nullptr) {
      float ss = 0.f;
      for (int h = threadIdx.x; h < H; h += blockDim.x) ss = __fmaf_rn(xt[h], xt[h], ss);
      ss = dec::block_sum(ss, scratch);
      r = rsqrtf(__fadd_rn(__fdiv_rn(ss, (float)H), eps));
    }
    for (int h = threadIdx.x; h < H; h += blockDim.x)
      xs[t * H + h] = norm_w != nullptr ? __fmul_rn(__fmul_rn(xt[h], r), norm_w[h]) : xt[h];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int row0 = (blockIdx.x * nwarps + warp) * RPW; row0 < V; row0 += gridDim.x * nwarps * RPW) {
    float s[MAXT][RPW];
#pragma unroll
    for (int t = 0; t < MAXT; ++t)
#pragma unroll
      for (int u = 0; u < RPW; ++u) s[t][u] = 0.f;
    if (VEC) {
      constexpr int N = Vec<W>::N;
      const int nvec = H / N;
#pragma unroll 2
      for (int i = lane; i < nvec; i += 32) {
        uint4 raw[RPW];
#pragma unroll
        for (int u = 0; u < RPW; ++u) {
          const int row = min(row0 + u, V - 1);  // rows past V repeat the last one; never stored
          raw[u] = __ldcs(reinterpret_cast<const uint4*>(Wt + (size_t)row * H) + i);  // streamed once per pass
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
          if (t < nt) {
#pragma unroll
            for (int u = 0; u < RPW; ++u) s[t][u] = __fadd_rn(s[t][u], dot16<W>(raw[u], xs + t * H + i * N));
          }
        }
      }
    } else {
      for (int h = lane; h < H; h += 32) {
#pragma unroll
        for (int u = 0; u < RPW; ++u) {
          const float wv = dec::to_f<W>(Wt[(size_t)min(row0 + u, V - 1) * H + h]);
#pragma unroll
          for (int t = 0; t < MAXT; ++t)
            if (t < nt) s[t][u] = __fmaf_rn(wv, xs[t * H + h], s[t][u]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t < nt) {
#pragma unroll
        for (int u = 0; u < RPW; ++u) {
          const float v = dec::warp_sum(s[t][u]);
          if (lane == 0 && row0 + u < V) logits[(size_t)t * V + row0 + u] = v;
        }
      }
    }
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

constexpr size_t kHeadSmemLimit = 200 * 1024;

template <typename W, int MAXT, int RPW>
void launch_rows(const float* x, const float* norm_w, float eps, const void* Wt, int nt, int V, int H, float* logits,
                 cudaStream_t stream) {
  const size_t smem = sizeof(float) * (size_t)H * nt;
  const bool vec = (H % Vec<W>::N == 0) && (reinterpret_cast<uintptr_t>(Wt) % 16 == 0);
  auto kern = vec ? lm_head_kernel<W, true, MAXT, RPW> : lm_head_kernel<W, false, MAXT, RPW>;
  if (smem > 48 * 1024) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const int rows_per_block = (kHeadThreads / 32) * RPW;
  int grid = (V + rows_per_block - 1) / rows_per_block;
  // persistent: each block normalizes x once; multi-row blocks hold nt rows of x, so as many as fit per SM
  const int cap = sm_count() * (MAXT == 1 ? 8 : (smem > 100 * 1024 ? 1 : 2));
  if (grid > cap) grid = cap;
  QS_CUDA_CHECK(pdl::launch(kern, dim3(grid), dim3(kHeadThreads), smem, stream, x, norm_w, eps, (const W*)Wt, V, H,
                            nt, logits));
  QS_LAUNCH_CHECK("lm_head_kernel");
}

template <typename W>
void launch(const float* x, const float* norm_w, float eps, const void* Wt, int T, int V, int H, float* logits,
            cudaStream_t stream) {
  if (T == 1 || (size_t)H * sizeof(float) * 2 > kHeadSmemLimit) {  // one row per pass
    for (int t = 0; t < T; ++t)
      launch_rows<W, 1, 1>(x + (size_t)t * H, norm_w, eps, Wt, 1, V, H, logits + (size_t)t * V, stream);
    return;
  }
  const int per = (int)std::min<size_t>(16, kHeadSmemLimit / ((size_t)H * sizeof(float)));
  for (int t0 = 0; t0 < T; t0 += per) {
    const int nt = std::min(per, T - t0);
    launch_rows<W, 16, 4>(x + (size_t)t0 * H, norm_w, eps, Wt, nt, V, H, logits + (size_t)t0 * V, stream);
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
