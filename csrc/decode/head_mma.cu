// LM head on tensor cores for batched decode (bf16 weights, 1-64 rows): logits = xn @ W^T with the final
// RMSNorm fused, xn = RMSNorm(x) * norm_w (or x).
//
// The CUDA-core head (decode_head.cu) keeps up to 16 rows of x in shared memory and does 16 fp32 FMAs per
// weight: at 16 rows it ran 1.15 ms per step and at 64 rows 4.6 ms on an H200, 7-28x its bytes floor
// (bench/NOTES-batched.md). Here the weights feed mma.sync m16n8k16 bf16 -> fp32 directly from global memory:
//  - head_prep_kernel writes xn split into two bf16 terms, hi = bf16(xn) and lo = bf16(xn - hi), so hi + lo
//    carries 16 significant bits of xn (the products with bf16 weights are exact in fp32; the two mmas per
//    k step keep the result within ~1e-5 relative of an fp32 dot product);
//  - a warp owns 16 vocabulary rows (2 n-tiles of 8) and walks all of H, 128 h per step: lane (g, tg) loads
//    4 x 16 bytes (32 consecutive h) of row g of each n-tile; each 16 bytes serve as the B fragments of two
//    k16 mmas, and the same relabelling of k is applied to the A fragments (mma k labels are free), so there is
//    no shuffle and no shared memory;
//  - a CTA applies each weight chunk to up to 4 groups of 16 rows of x (64 rows: the largest decode batch)
//    while it is in registers, so the head is read from memory once per step; more rows are more CTAs along
//    grid.x. (One group per CTA, sharing the weights between CTAs through L2, took 1.09 ms at 64 rows.)
//  - weight loads for the next kPF k steps are in flight; the first are issued before griddepcontrol.wait.
// A row's logits do not depend on how many rows share the launch: each output is its own mma dot product over
// the same k order.
#include <stdexcept>

#include "decode/common.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace {

constexpr int kPrepThreads = 256;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTiles = 2;   // n-tiles of 8 vocabulary rows per warp
constexpr int kChunks = 4;  // 16-byte chunks per lane per row and k step: a step is 128 h, 256 B of a row
constexpr int kStepH = 32 * kChunks;
constexpr int kPF = 2;      // k steps of weights in flight per warp
constexpr int kRowsPerCta = kWarps * kTiles * 8;

__global__ void __launch_bounds__(kPrepThreads) head_prep_kernel(const float* __restrict__ x,
                                                                 const float* __restrict__ norm_w, float eps, int H,
                                                                 __nv_bfloat16* __restrict__ xh,
                                                                 __nv_bfloat16* __restrict__ xl) {
  __shared__ float scratch[32];
  pdl::launch_dependents();
  pdl::wait();
  const int t = blockIdx.x;
  const float* xt = x + static_cast<size_t>(t) * H;
  float r = 1.f;
  if (norm_w != nullptr) {
    float ss = 0.f;
    for (int h = threadIdx.x; h < H; h += kPrepThreads) ss = __fmaf_rn(xt[h], xt[h], ss);
    ss = dec::block_sum(ss, scratch);
    r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(H)), eps));
  }
  for (int h = threadIdx.x; h < H; h += kPrepThreads) {
    const float v = norm_w != nullptr ? __fmul_rn(__fmul_rn(xt[h], r), norm_w[h]) : xt[h];
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    xh[static_cast<size_t>(t) * H + h] = hi;
    xl[static_cast<size_t>(t) * H + h] = __float2bfloat16_rn(__fsub_rn(v, __bfloat162float(hi)));
  }
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ld_weights(const __nv_bfloat16* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Two k16 mmas over 8 consecutive h per lane: labels (2tg, 2tg+1) -> h + 0, 1 and (2tg+8, 2tg+9) -> h + 2, 3 for
// the first, h + 4..7 for the second, in A (x rows g and g + 8) and B (weights) alike.
__device__ __forceinline__ void mma_8h(float (&c)[4], const uint4& lo_row, const uint4& hi_row, const uint4& w) {
  mma_bf16(c, lo_row.x, hi_row.x, lo_row.y, hi_row.y, w.x, w.y);
  mma_bf16(c, lo_row.z, hi_row.z, lo_row.w, hi_row.w, w.z, w.w);
}

// kGroups: groups of 16 rows of x a CTA serves from one read of its weights (1, 2 or 4: the registers of the
// accumulators grow with it, so a launch takes the smallest that covers its rows, up to 64 per CTA).
template <int kGroups>
__global__ void __launch_bounds__(kThreads, 2) head_mma_kernel(const __nv_bfloat16* __restrict__ xh,
                                                            const __nv_bfloat16* __restrict__ xl,
                                                            const __nv_bfloat16* __restrict__ W, int T, int V, int H,
                                                            float* __restrict__ logits) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tg = lane & 3;
  const int m_first = blockIdx.x * 16 * kGroups;  // this CTA's rows: kGroups groups of 16 from here
  const int v0 = (blockIdx.y * kWarps + warp) * kTiles * 8;
  pdl::launch_dependents();
  // Lane (g, tg) covers h = k0 + tg * kStepH / 4 + [0, kStepH / 4) of row g of each n-tile: 4 lanes read 256
  // contiguous bytes of a row per step, a DRAM-friendly run (with 64-byte runs this kernel reached only 57%
  // of the streaming ceiling).
  const __nv_bfloat16* wrow[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt)
    wrow[nt] = W + static_cast<size_t>(min(v0 + nt * 8 + g, V - 1)) * H + tg * (kStepH / 4);
  const int steps = H / kStepH;
  uint4 ring[kPF][kTiles][kChunks];
#pragma unroll
  for (int u = 0; u < kPF; ++u)
    if (u < steps)
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
        for (int j = 0; j < kChunks; ++j) ring[u][nt][j] = ld_weights(wrow[nt] + u * kStepH + 8 * j);
  pdl::wait();  // xh / xl come from head_prep_kernel
  const size_t xo = static_cast<size_t>(tg) * (kStepH / 4);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // Per group: rows g and g + 8 of x (hi and lo terms); rows past T read zeros and are never stored.
  const uint4* xp[kGroups][4];
  bool ok[kGroups][2];
#pragma unroll
  for (int q = 0; q < kGroups; ++q) {
    const int m_lo = m_first + 16 * q + g, m_hi = m_lo + 8;
    ok[q][0] = m_lo < T;
    ok[q][1] = m_hi < T;
    xp[q][0] = reinterpret_cast<const uint4*>(xh + static_cast<size_t>(ok[q][0] ? m_lo : 0) * H + xo);
    xp[q][1] = reinterpret_cast<const uint4*>(xh + static_cast<size_t>(ok[q][1] ? m_hi : 0) * H + xo);
    xp[q][2] = reinterpret_cast<const uint4*>(xl + static_cast<size_t>(ok[q][0] ? m_lo : 0) * H + xo);
    xp[q][3] = reinterpret_cast<const uint4*>(xl + static_cast<size_t>(ok[q][1] ? m_hi : 0) * H + xo);
  }
  float c[kGroups][kTiles][4];
#pragma unroll
  for (int q = 0; q < kGroups; ++q)
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) c[q][nt][0] = c[q][nt][1] = c[q][nt][2] = c[q][nt][3] = 0.f;
  for (int s0 = 0; s0 < steps; s0 += kPF) {
#pragma unroll
    for (int u = 0; u < kPF; ++u) {
      const int s = s0 + u;
      if (s < steps) {
        uint4 w[kTiles][kChunks];
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
          for (int j = 0; j < kChunks; ++j) w[nt][j] = ring[u][nt][j];
        if (s + kPF < steps)
#pragma unroll
          for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
            for (int j = 0; j < kChunks; ++j) ring[u][nt][j] = ld_weights(wrow[nt] + (s + kPF) * kStepH + 8 * j);
#pragma unroll
        for (int q = 0; q < kGroups; ++q) {
          if (m_first + 16 * q >= T) break;  // uniform over the CTA
#pragma unroll
          for (int j = 0; j < kChunks; ++j) {
            const int o = s * (kStepH / 8) + j;  // uint4 offset of this chunk in a row of x
            const uint4 ah_lo = ok[q][0] ? xp[q][0][o] : zero, ah_hi = ok[q][1] ? xp[q][1][o] : zero;
            const uint4 al_lo = ok[q][0] ? xp[q][2][o] : zero, al_hi = ok[q][1] ? xp[q][3][o] : zero;
#pragma unroll
            for (int nt = 0; nt < kTiles; ++nt) {
              mma_8h(c[q][nt], ah_lo, ah_hi, w[nt][j]);
              mma_8h(c[q][nt], al_lo, al_hi, w[nt][j]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kGroups; ++q) {
    const int m_lo = m_first + 16 * q + g, m_hi = m_lo + 8;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      const int v = v0 + nt * 8 + tg * 2;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (v + e >= V) continue;
        if (m_lo < T) logits[static_cast<size_t>(m_lo) * V + v + e] = c[q][nt][e];
        if (m_hi < T) logits[static_cast<size_t>(m_hi) * V + v + e] = c[q][nt][2 + e];
      }
    }
  }
}

}  // namespace

bool lm_head_mma_supported(int H) { return H > 0 && H % kStepH == 0; }

void lm_head_mma(const float* x, const float* norm_w, float eps, const void* W, int T, int V, int H,
                 float* logits, void* ws, cudaStream_t stream) {
  if (T <= 0) return;
  if (!lm_head_mma_supported(H)) throw std::invalid_argument("lm_head_mma: H must be a positive multiple of 128");
  if (reinterpret_cast<uintptr_t>(W) % 16 != 0 || reinterpret_cast<uintptr_t>(ws) % 16 != 0)
    throw std::invalid_argument("lm_head_mma: W and ws must be 16-byte aligned");
  auto* xh = static_cast<__nv_bfloat16*>(ws);
  auto* xl = xh + static_cast<size_t>(T) * H;
  QS_CUDA_CHECK(pdl::launch(head_prep_kernel, dim3(T), dim3(kPrepThreads), 0, stream, x, norm_w, eps, H, xh, xl));
  const int groups = T <= 16 ? 1 : (T <= 32 ? 2 : 4);
  auto kernel = groups == 1 ? head_mma_kernel<1> : (groups == 2 ? head_mma_kernel<2> : head_mma_kernel<4>);
  const dim3 grid((T + 16 * groups - 1) / (16 * groups), (V + kRowsPerCta - 1) / kRowsPerCta);
  QS_CUDA_CHECK(pdl::launch(kernel, grid, dim3(kThreads), 0, stream, (const __nv_bfloat16*)xh,
                            (const __nv_bfloat16*)xl, static_cast<const __nv_bfloat16*>(W), T, V, H, logits));
}

}  // namespace qsparse
