// Embedding gather, RMSNorm and RoPE + KV-cache append.
#include <cmath>

#include "decode/common.cuh"
#include "common/pdl.cuh"
#include "decode/rope.cuh"

namespace qsparse {
namespace {

template <typename T>
__global__ void embedding_kernel(const T* __restrict__ table, const int32_t* __restrict__ ids, int H, int V,
                                 float* __restrict__ out) {
  pdl::launch_dependents();  // the next kernel may start its prologue
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)
  const int t = blockIdx.y;
  const int id = ids[t];
  const bool ok = id >= 0 && id < V;
  for (int h = blockIdx.x * blockDim.x + threadIdx.x; h < H; h += gridDim.x * blockDim.x) {
    out[(size_t)t * H + h] = ok ? dec::to_f<T>(table[(size_t)id * H + h]) : NAN;
  }
}

__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w, float* out, int H,
                               float eps) {
  __shared__ float scratch[32];
  const float* xr = x + (size_t)blockIdx.x * H;
  float ss = 0.f;
  for (int h = threadIdx.x; h < H; h += blockDim.x) ss += xr[h] * xr[h];
  ss = dec::block_sum(ss, scratch);
  const float r = rsqrtf(ss / (float)H + eps);
  float* o = out + (size_t)blockIdx.x * H;
  for (int h = threadIdx.x; h < H; h += blockDim.x) o[h] = xr[h] * r * w[h];
}

// One block per (token, head); threads over the half dimension. Heads [0, nq) are queries (rotated in
// place), [nq, nq + nkv) keys (rotated into the cache), [nq + nkv, nq + 2 nkv) values (copied to the cache).
template <typename C>
__global__ void rope_append_kernel(float* qkv, int stride, int nq, int nkv, int hd, const float* __restrict__ cos_t,
                                   const float* __restrict__ sin_t, const int32_t* __restrict__ start,
                                   C* __restrict__ kc, C* __restrict__ vc, int max_len) {
  const int t = blockIdx.y, half = hd / 2;
  const int pos = *start + t;
  if (pos >= max_len) return;  // the host never lets this happen; stay in bounds regardless
  dec::rope_append_head<C>(qkv + (size_t)t * stride, blockIdx.x, nq, nkv, hd, cos_t + (size_t)pos * half,
                           sin_t + (size_t)pos * half, kc, vc, max_len, pos);
}

}  // namespace

void embedding_gather(const void* table, int dtype, const int32_t* ids, int T, int H, int V, float* out,
                      cudaStream_t stream) {
  if (T <= 0 || H <= 0) return;
  dim3 grid((H + 255) / 256 < 8 ? (H + 255) / 256 : 8, T);
  switch (dtype) {
    case kDF32:
      QS_CUDA_CHECK(pdl::launch(embedding_kernel<float>, grid, dim3(256), 0, stream, (const float*)table, ids, H, V, out));
      break;
    case kDBF16:
      QS_CUDA_CHECK(pdl::launch(embedding_kernel<__nv_bfloat16>, grid, dim3(256), 0, stream,
                                (const __nv_bfloat16*)table, ids, H, V, out));
      break;
    case kDF16:
      QS_CUDA_CHECK(pdl::launch(embedding_kernel<__half>, grid, dim3(256), 0, stream, (const __half*)table, ids, H, V, out));
      break;
    default: throw std::invalid_argument("embedding_gather: unsupported table dtype code");
  }
  QS_LAUNCH_CHECK("embedding_kernel");
}

void rmsnorm(const float* x, const float* w, float* out, int T, int H, float eps, cudaStream_t stream) {
  if (T <= 0) return;
  rmsnorm_kernel<<<T, 256, 0, stream>>>(x, w, out, H, eps);
  QS_LAUNCH_CHECK("rmsnorm_kernel");
}

void rope_append(float* qkv, int stride, int T, int nq, int nkv, int hd, const float* cos_t, const float* sin_t,
                 const int32_t* start, void* kcache, void* vcache, int cache_dtype, int max_len,
                 cudaStream_t stream) {
  if (T <= 0) return;
  if (hd % 2) throw std::invalid_argument("rope_append: head_dim must be even");
  dim3 grid(nq + 2 * nkv, T);
  const int threads = hd / 2 < 32 ? 32 : (hd / 2 > 128 ? 128 : hd / 2);
  if (cache_dtype == kDBF16) {
    rope_append_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(
        qkv, stride, nq, nkv, hd, cos_t, sin_t, start, (__nv_bfloat16*)kcache, (__nv_bfloat16*)vcache, max_len);
  } else if (cache_dtype == kDF32) {
    rope_append_kernel<float><<<grid, threads, 0, stream>>>(qkv, stride, nq, nkv, hd, cos_t, sin_t, start,
                                                            (float*)kcache, (float*)vcache, max_len);
  } else {
    throw std::invalid_argument("rope_append: KV cache must be float32 or bfloat16");
  }
  QS_LAUNCH_CHECK("rope_append_kernel");
}

}  // namespace qsparse
