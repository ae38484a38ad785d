// Tensor-core ternary GEMM for decode widths (GEMM variant 2: batched decode and short prefill chunks, 1-64
// tokens). Variant 1 (linear_gemm.cu) unpacks weights byte by byte into shared memory for one 64-token tile
// with no split-K: at 16 rows a BitNet-2B4T projection took 60-300 us there (bench/NOTES-batched.md). Here
// the weights go from global memory straight into mma B fragments, and the k dimension is split over a
// thread-block cluster so every projection fills the GPU:
//  - a warp owns 128 packed columns (32 bytes of each weight row). Lane (g, tg) loads the word at byte 4g of
//    rows tg*4 + j and 16 + tg*4 + j (j < 4) of a 32-row k step; a byte transpose then puts, for each of its
//    16 columns, 4 consecutive rows' codes in one register: an m16n8k32 B fragment whose column "g" in
//    n-tile nt is packed column 16g + nt. mma column labels are free; the shared-memory reduction puts
//    every sum back under its real column.
//  - codes (t + 1 in {0, 1, 2}) enter the mma unsigned (s8 x u8); each token's sum of x over the same rows
//    (dp4a on the A fragments) is subtracted after the k loop. int32 throughout: exact.
//  - 16 tokens per CTA (mma M; grid.z covers more), 4 warps take every 4th k step of the CTA's range, and
//    `splits` CTAs of one cluster cover the k range. Each CTA sums its warps in shared memory; then every CTA
//    of the cluster reduces a share of the tile by reading the others' shared memory and runs the shared
//    epilogue on it. (Pushing every CTA's sums into one leader with distributed-shared-memory atomics, the
//    first version, left 7 x 2048 remote atomics to one CTA: ~half the kernel's time at 16 tokens.)
//  - each warp keeps the weight words and activations of its next kPF k steps in flight; the weight words of
//    the first kPF are issued before griddepcontrol.wait (weights are constant), so they overlap the
//    previous kernel's tail.
#include <cooperative_groups.h>

#include <algorithm>

#include "common/common.cuh"
#include "linear/device.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace {

namespace cg = cooperative_groups;

constexpr int kCols = 128;  // packed columns per CTA (32 bytes of a weight row)
constexpr int kTok = 16;    // tokens per CTA: the mma's M
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPF = 4;      // k steps in flight per warp
// Sums of a token are kept at tok * kRedLd + col + col / 32: lanes (g, tg) of one atomicAdd then hit 32
// distinct banks (4g + tg), and the padding words stay zero.
constexpr int kRedLd = kCols + kCols / 32;

struct SkinnyArgs {
  GemmArgs g;
  int splits;          // CTAs per cluster along k (grid.y)
  int steps_per_cta;   // 32-row k steps per CTA
};

__device__ __forceinline__ int red_at(int tok, int col) { return tok * kRedLd + col + (col >> 5); }

__device__ __forceinline__ void mma_s8u8(int (&c)[4], const int (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Step {
  unsigned w[8];  // rows tg*4 + j (w[j]) and 16 + tg*4 + j (w[4 + j]), this lane's 16 columns
  int a[4];       // the A fragment: tokens g, g + 8 at k = tg*4.. and 16 + tg*4..
};

__global__ void __launch_bounds__(kThreads, 3) gemm_skinny_kernel(SkinnyArgs s) {
  const GemmArgs& a = s.g;
  __shared__ int red[kTok * kRedLd];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tg = lane & 3;
  const int col0 = blockIdx.x * kCols, m0 = blockIdx.z * kTok;
  const int npad = a.RB * 4;
  const int st0 = blockIdx.y * s.steps_per_cta;
  const int st_end = min((a.D + 31) / 32, st0 + s.steps_per_cta);
  const int nmine = st_end - st0 > warp ? (st_end - st0 - warp + kWarps - 1) / kWarps : 0;
  pdl::launch_dependents();

  for (int i = tid; i < kTok * kRedLd; i += kThreads) red[i] = 0;
  __syncthreads();

  const bool cols_ok = col0 + 16 * g < npad;  // RB is a multiple of 16 bytes: a lane's 16 columns are all in or out
  const uint8_t* wcol = a.packed + col0 / 4 + 4 * g;
  auto load_w = [&](int st, Step& x) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = st * 32 + (j >> 2) * 16 + tg * 4 + (j & 3);
      x.w[j] = (cols_ok && r < a.D) ? lin::ld_stream_u32(wcol + static_cast<size_t>(r) * a.RB) : 0u;
    }
  };
  const int r_lo = m0 + g, r_hi = m0 + g + 8;
  const int8_t* q_lo = a.qdense + static_cast<size_t>(r_lo) * a.ldq + tg * 4;
  const int8_t* q_hi = a.qdense + static_cast<size_t>(r_hi) * a.ldq + tg * 4;
  auto load_a = [&](int st, Step& x) {  // qdense is zero from D up to ldq >= 32 * steps: no k guard needed
    const int k = st * 32;
    x.a[0] = r_lo < a.T ? *reinterpret_cast<const int*>(q_lo + k) : 0;
    x.a[1] = r_hi < a.T ? *reinterpret_cast<const int*>(q_hi + k) : 0;
    x.a[2] = r_lo < a.T ? *reinterpret_cast<const int*>(q_lo + k + 16) : 0;
    x.a[3] = r_hi < a.T ? *reinterpret_cast<const int*>(q_hi + k + 16) : 0;
  };

  Step ring[kPF];
#pragma unroll
  for (int u = 0; u < kPF; ++u)
    if (u < nmine) load_w(st0 + warp + u * kWarps, ring[u]);
  pdl::wait();  // qdense, gamma and the residual are written by earlier kernels
#pragma unroll
  for (int u = 0; u < kPF; ++u)
    if (u < nmine) load_a(st0 + warp + u * kWarps, ring[u]);

  int c[16][4];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0;
  int sum_lo = 0, sum_hi = 0;  // sum of x over this lane's k for tokens g and g + 8
  for (int i0 = 0; i0 < nmine; i0 += kPF) {
#pragma unroll
    for (int u = 0; u < kPF; ++u) {
      const int i = i0 + u;
      if (i < nmine) {
        unsigned t_lo[4], t_hi[4];
        lin::transpose_rows4(ring[u].w[0], ring[u].w[1], ring[u].w[2], ring[u].w[3], t_lo);
        lin::transpose_rows4(ring[u].w[4], ring[u].w[5], ring[u].w[6], ring[u].w[7], t_hi);
        const int af[4] = {ring[u].a[0], ring[u].a[1], ring[u].a[2], ring[u].a[3]};
        if (i + kPF < nmine) {
          const int st = st0 + warp + (i + kPF) * kWarps;
          load_w(st, ring[u]);
          load_a(st, ring[u]);
        }
        sum_lo = __dp4a(af[2], 0x01010101, __dp4a(af[0], 0x01010101, sum_lo));
        sum_hi = __dp4a(af[3], 0x01010101, __dp4a(af[1], 0x01010101, sum_hi));
#pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
          const int sh = 2 * (nt & 3);
          mma_s8u8(c[nt], af, (t_lo[nt >> 2] >> sh) & 0x03030303u, (t_hi[nt >> 2] >> sh) & 0x03030303u);
        }
      }
    }
  }
  // The 4 lanes of a group cover the step's 32 rows between them.
  sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, 1);
  sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, 2);
  sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, 1);
  sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, 2);
  if (nmine > 0) {
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const int col = 32 * tg + nt;  // label 2tg (+1) of n-tile nt = packed column 16 * label + nt
      atomicAdd(&red[red_at(g, col)], c[nt][0] - sum_lo);
      atomicAdd(&red[red_at(g, col + 16)], c[nt][1] - sum_lo);
      atomicAdd(&red[red_at(g + 8, col)], c[nt][2] - sum_hi);
      atomicAdd(&red[red_at(g + 8, col + 16)], c[nt][3] - sum_hi);
    }
  }
  __syncthreads();
  // Reduction over the cluster, spread over its CTAs: a unit is 32 columns of one token; CTA r's warps take
  // units r*4 + w, then every (splits*4)th, sum that unit's words in every CTA's shared memory (coalesced
  // distributed-shared-memory loads) and run the epilogue. An interleaved gate column's up partner is 16
  // columns on, in the same unit: one shuffle away.
  int nsrc = 1, rank = 0;
  const int* src[8] = {red, red, red, red, red, red, red, red};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (s.splits > 1) {
    cluster.sync();  // every CTA's sums are complete and visible
    nsrc = s.splits;
    rank = static_cast<int>(cluster.block_rank());
#pragma unroll
    for (int r = 0; r < 8; ++r)
      if (r < nsrc) src[r] = cluster.map_shared_rank(red, r);
  }
#endif
  const int units = min(kTok, a.T - m0) * (kCols / 32);
  for (int u = rank * kWarps + warp; u < units; u += nsrc * kWarps) {
    const int tok = u / (kCols / 32), cc = (u % (kCols / 32)) * 32 + lane;
    int acc = 0;
#pragma unroll
    for (int r = 0; r < 8; ++r)
      if (r < nsrc) acc += src[r][red_at(tok, cc)];
    const int acc16 = __shfl_down_sync(0xffffffffu, acc, 16);
    const int m = m0 + tok, col = col0 + cc;
    if (col < npad) {
      if (a.ep.raw) a.ep.raw[static_cast<size_t>(m) * npad + col] = acc;
      lin::epilogue_one(a.ep, m, col, acc, lane < 16 ? acc16 : 0, a.gamma[m]);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (s.splits > 1) cluster.sync();  // this CTA's shared memory stays until every CTA has read it
#endif
}

}  // namespace

int gemm_skinny_max_splits() { return 8; }  // the portable cluster size

void launch_gemm_skinny(const GemmArgs& a, int splits, cudaStream_t stream) {
  int dev = 0, major = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  QS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const int steps = (a.D + 31) / 32;
  splits = major >= 9 ? std::max(1, std::min({splits, gemm_skinny_max_splits(), steps})) : 1;
  SkinnyArgs s{a, splits, (steps + splits - 1) / splits};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((a.RB * 4 + kCols - 1) / kCols, splits, (a.T + kTok - 1) / kTok);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  cfg.numAttrs = pdl::add_attr(attr, add_cluster_y_attr(attr, 0, splits, major));
  cfg.attrs = attr;
  QS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemm_skinny_kernel, s));
}

}  // namespace qsparse
