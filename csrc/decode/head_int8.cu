// int8 LM head GEMV with the final RMSNorm fused in: logits[v] = scale[v] * sum_h Q[v, h] * xn[h], Q [V, H]
// int8 (per-row absmax, see qsparse_infer/model/head_int8.py), xn = RMSNorm(x) * norm_w in fp32, fp32 accumulation.
//
// At 2B4T shape the head is 328 MB of int8 (half the bf16 head), so this is a pure streaming kernel:
// - each warp owns kRows rows at a time; lanes walk the columns with 16-byte streaming loads (kRows loads in
//   flight per lane per step, twice that with the unroll), so a resident grid keeps enough bytes in flight;
// - x lives in shared memory; one float4 read of x serves all kRows rows (4x less shared traffic per byte
//   of weights), and each lane starts its 4 float4 reads of a 16-column chunk at a different quarter
//   ((lane / 2) mod 4), which spreads the 8 lanes of a shared-memory phase over all 32 banks;
// - int8 -> fp32 without I2F (I2F runs at a quarter rate on sm_90 and would cap the kernel below the
//   memory ceiling): PRMT puts the biased byte under the exponent of 2^23, one FADD removes the bias
//   (exact), then FFMA.
#include <cmath>

#include "decode/common.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;  // rows per warp step

__device__ __forceinline__ uint32_t pick_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Sum over the 4 signed bytes of w of byte_j * x_j, exactly converting each byte to fp32.
__device__ __forceinline__ float dot4_s8(uint32_t w, const float4& x, float acc) {
  const uint32_t b = w ^ 0x80808080u;  // signed byte s -> unsigned s + 128
  constexpr float kBias = 8388608.f + 128.f;  // 2^23 + 128
  // __byte_perm(b, 0x4B000000, 0x754j): bytes (b_j, 0, 0, 0x4B) = the float 2^23 + b_j
  acc = fmaf(__int_as_float(__byte_perm(b, 0x4B000000u, 0x7540)) - kBias, x.x, acc);
  acc = fmaf(__int_as_float(__byte_perm(b, 0x4B000000u, 0x7541)) - kBias, x.y, acc);
  acc = fmaf(__int_as_float(__byte_perm(b, 0x4B000000u, 0x7542)) - kBias, x.z, acc);
  acc = fmaf(__int_as_float(__byte_perm(b, 0x4B000000u, 0x7543)) - kBias, x.w, acc);
  return acc;
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) lm_head_int8_kernel(const float* __restrict__ x,
                                                                const float* __restrict__ norm_w, float eps,
                                                                const int8_t* __restrict__ Q,
                                                                const float* __restrict__ scales, int V, int H,
                                                                float* __restrict__ logits) {
  extern __shared__ __align__(16) float xs[];  // [H]
  __shared__ float scratch[32];
  pdl::launch_dependents();  // the next kernel may start its prologue
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)
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
  const int rot = (lane >> 1) & 3;
  const long long step = (long long)gridDim.x * nwarps * kRows;
  for (long long row0 = ((long long)blockIdx.x * nwarps + warp) * kRows; row0 < V; row0 += step) {
    float acc[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[j] = 0.f;
    if (VEC) {
      const int nvec = H / 16;
      const uint4* q4 = reinterpret_cast<const uint4*>(Q) + row0 * nvec;
#pragma unroll 2
      for (int i = lane; i < nvec; i += 32) {
        uint4 raw[kRows];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          // rows past V read nothing and contribute zeros (their sums are never written)
          raw[j] = row0 + j < V ? __ldcs(q4 + (long long)j * nvec + i) : make_uint4(0u, 0u, 0u, 0u);
        }
        const float* xv = xs + i * 16;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int part = (c + rot) & 3;  // which 4 of the 16 columns
          const float4 x4 = *reinterpret_cast<const float4*>(xv + part * 4);
#pragma unroll
          for (int j = 0; j < kRows; ++j) acc[j] = dot4_s8(pick_word(raw[j], part), x4, acc[j]);
        }
      }
    } else {
      for (int h = lane; h < H; h += 32) {
        const float xh = xs[h];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (row0 + j < V) acc[j] = fmaf((float)Q[(row0 + j) * H + h], xh, acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const float s = dec::warp_sum(acc[j]);
      if (lane == 0 && row0 + j < V) logits[row0 + j] = s * scales[row0 + j];
    }
  }
}

}  // namespace

void lm_head_int8(const float* x, const float* norm_w, float eps, const int8_t* Q, const float* scales, int T, int V,
                  int H, float* logits, cudaStream_t stream) {
  if (T <= 0 || V <= 0) return;
  if (H <= 0) throw std::invalid_argument("lm_head_int8: H must be positive");
  const size_t smem = sizeof(float) * (size_t)H;
  const bool vec = (H % 16 == 0) && (reinterpret_cast<uintptr_t>(Q) % 16 == 0);
  auto kern = vec ? lm_head_int8_kernel<true> : lm_head_int8_kernel<false>;
  if (smem > 48 * 1024) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  // Resident blocks per SM, cached per (device, variant, smem): queried on the first (eager) call, so calls
  // during CUDA-graph capture make no runtime queries beyond cudaGetDevice.
  struct Occ {
    size_t smem = 0;
    int sms = 0, per_sm = 0;
  };
  static Occ cache[64][2];
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  Occ& occ = cache[dev & 63][vec ? 1 : 0];
  if (occ.sms == 0 || occ.smem != smem) {
    QS_CUDA_CHECK(cudaDeviceGetAttribute(&occ.sms, cudaDevAttrMultiProcessorCount, dev));
    QS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ.per_sm, kern, kThreads, smem));
    if (occ.per_sm < 1) occ.per_sm = 1;
    occ.smem = smem;
  }
  const int sms = occ.sms, per_sm = occ.per_sm;
  // A resident persistent grid, sized so every warp gets the same number of row groups (no half-empty
  // last wave): rounds = ceil(groups / resident warps), then just enough warps for that many rounds.
  const int warps_per_block = kThreads / 32;
  const long long groups = ((long long)V + kRows - 1) / kRows;
  const long long resident = (long long)sms * per_sm * warps_per_block;
  const long long rounds = (groups + resident - 1) / resident;
  const long long warps = (groups + rounds - 1) / rounds;
  const int grid = (int)((warps + warps_per_block - 1) / warps_per_block);
  for (int t = 0; t < T; ++t) {
    QS_CUDA_CHECK(pdl::launch(kern, dim3(grid), dim3(kThreads), smem, stream, x + (size_t)t * H, norm_w, eps, Q,
                              scales, V, H, logits + (size_t)t * V));
    QS_LAUNCH_CHECK("lm_head_int8_kernel");
  }
}

}  // namespace qsparse
