// Causal GQA attention over the KV cache for prefill (T query tokens of one sequence). One-token decode
// uses the batched split-K kernel in decode_attention_batch.cu instead.
//
// Block = 4 warps for one (kv head, query token). The G = nq/nkv query heads sharing that kv head
// are handled together, so every K/V row is read once per block. A warp takes one position at a time:
// its lanes hold hd/32 channels of K and V, the dot product is a warp reduction, and each warp keeps an
// online softmax (max m, sum l, acc) per head. The 4 warps merge through shared memory.
#include <cmath>

#include "decode/common.cuh"

namespace qsparse {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxG = 8;
constexpr int kPosInFlight = 4;  // positions whose K/V rows a warp loads before using any

template <typename C, int EPL>
__global__ void __launch_bounds__(kWarps * 32, 4) attention_kernel(
    const float* __restrict__ qkv, int stride, int nq, int nkv, int hd, const C* __restrict__ kc,
    const C* __restrict__ vc, int max_len, const int32_t* __restrict__ start, float* __restrict__ out,
    float scale) {
  const int g = blockIdx.y, t = blockIdx.z;
  const int G = nq / nkv;
  const int p0 = 0, p1 = min(*start + t + 1, max_len);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  extern __shared__ float smem[];
  float* q_s = smem;                   // [G][hd]
  float* wm = q_s + G * hd;            // [kWarps][G]
  float* wl = wm + kWarps * G;         // [kWarps][G]
  float* wacc = wl + kWarps * G;       // [kWarps][G][hd]
  const float* qrow = qkv + (size_t)t * stride + (size_t)g * G * hd;
  for (int i = threadIdx.x; i < G * hd; i += blockDim.x) q_s[i] = qrow[i];
  __syncthreads();

  float m[kMaxG], l[kMaxG], acc[kMaxG][EPL];
#pragma unroll
  for (int h = 0; h < kMaxG; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[h][e] = 0.f;
  }
  const C* kb = kc + (size_t)g * max_len * hd;
  const C* vb = vc + (size_t)g * max_len * hd;
  // Each warp loads the K/V rows of kPosInFlight positions before using any of them: one memory round
  // trip per batch instead of one per position. Positions keep the order p0 + warp, + kWarps, ...
  for (int pb = p0 + warp; pb < p1; pb += kWarps * kPosInFlight) {
    float kv[kPosInFlight][EPL], vv[kPosInFlight][EPL];
#pragma unroll
    for (int u = 0; u < kPosInFlight; ++u) {
      const int p = pb + u * kWarps;
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = lane + 32 * e;
        const bool ok = p < p1 && d < hd;
        kv[u][e] = ok ? dec::to_f<C>(kb[(size_t)p * hd + d]) : 0.f;
        vv[u][e] = ok ? dec::to_f<C>(vb[(size_t)p * hd + d]) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kPosInFlight; ++u) {
      if (pb + u * kWarps >= p1) break;  // warp-uniform
#pragma unroll
      for (int h = 0; h < kMaxG; ++h) {
        if (h < G) {
          float s = 0.f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            const int d = lane + 32 * e;
            if (d < hd) s += q_s[h * hd + d] * kv[u][e];
          }
          s = dec::warp_sum(s) * scale;
          const float mn = fmaxf(m[h], s);
          const float corr = expf(m[h] - mn);  // m = -inf on the first key: corr = 0
          const float pe = expf(s - mn);
          l[h] = l[h] * corr + pe;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc[h][e] = acc[h][e] * corr + pe * vv[u][e];
          m[h] = mn;
        }
      }
    }
  }
#pragma unroll
  for (int h = 0; h < kMaxG; ++h) {
    if (h < G) {
      if (lane == 0) {
        wm[warp * G + h] = m[h];
        wl[warp * G + h] = l[h];
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = lane + 32 * e;
        if (d < hd) wacc[(warp * G + h) * hd + d] = acc[h][e];
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < G * hd; idx += blockDim.x) {
    const int h = idx / hd, d = idx % hd;
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wm[w * G + h]);
    float L = 0.f, A = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float mw = wm[w * G + h];
        if (mw == -INFINITY) continue;
        const float c = expf(mw - M);
        L += wl[w * G + h] * c;
        A += wacc[(w * G + h) * hd + d] * c;
      }
    }
    out[(size_t)t * nq * hd + (size_t)(g * G + h) * hd + d] = L > 0.f ? A / L : 0.f;
  }
}

template <typename C, int EPL>
void launch(const float* qkv, int stride, int T, int nq, int nkv, int hd, const void* kc, const void* vc,
            int max_len, const int32_t* start, float* out, cudaStream_t stream) {
  const int G = nq / nkv;
  const size_t smem = sizeof(float) * ((size_t)G * hd + 2 * kWarps * G + (size_t)kWarps * G * hd);
  auto kern = attention_kernel<C, EPL>;
  if (smem > 48 * 1024) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  dim3 grid(1, nkv, T);
  kern<<<grid, kWarps * 32, smem, stream>>>(qkv, stride, nq, nkv, hd, (const C*)kc, (const C*)vc, max_len, start,
                                            out, 1.0f / sqrtf((float)hd));
  QS_LAUNCH_CHECK("attention_kernel");
}

template <typename C>
void dispatch_hd(const float* qkv, int stride, int T, int nq, int nkv, int hd, const void* kc, const void* vc,
                 int max_len, const int32_t* start, float* out, cudaStream_t stream) {
  if (hd <= 32) {
    launch<C, 1>(qkv, stride, T, nq, nkv, hd, kc, vc, max_len, start, out, stream);
  } else if (hd <= 64) {
    launch<C, 2>(qkv, stride, T, nq, nkv, hd, kc, vc, max_len, start, out, stream);
  } else {
    launch<C, 4>(qkv, stride, T, nq, nkv, hd, kc, vc, max_len, start, out, stream);
  }
}

}  // namespace

void attention(const float* qkv, int stride, int T, int nq, int nkv, int hd, const void* kcache,
               const void* vcache, int cache_dtype, int max_len, const int32_t* start, float* out,
               cudaStream_t stream) {
  if (T <= 0) return;
  if (nkv <= 0 || nq % nkv) throw std::invalid_argument("attention: num_heads must be a multiple of num_kv_heads");
  if (nq / nkv > kMaxG) throw std::invalid_argument("attention: at most 8 query heads per kv head are supported");
  if (hd > 128) throw std::invalid_argument("attention: head_dim > 128 is not supported");
  if (cache_dtype == kDBF16) {
    dispatch_hd<__nv_bfloat16>(qkv, stride, T, nq, nkv, hd, kcache, vcache, max_len, start, out, stream);
  } else if (cache_dtype == kDF32) {
    dispatch_hd<float>(qkv, stride, T, nq, nkv, hd, kcache, vcache, max_len, start, out, stream);
  } else {
    throw std::invalid_argument("attention: KV cache must be float32 or bfloat16");
  }
}

}  // namespace qsparse
