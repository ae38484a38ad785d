// Tensor-core ternary GEMM for many tokens (prefill, batch): int8 activations (already masked to the
// token's top-K by the select kernel, so "sparsity" is zeros here) times ternary weights unpacked to
// int8 in shared memory, mma.sync m16n8k32 s8 x s8 -> s32. Then the shared epilogue.
//
// CTA tile: 64 tokens x 64 packed columns, K step 64; 4 warps, each 16 tokens x 64 columns (8 mmas
// per 32-deep k step). Simple and correct; prefill is not the decode hot path.
#include "common/common.cuh"
#include "linear/device.cuh"

namespace qsparse {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 64, kThreads = 128;
constexpr int kLds = kBK + 16;  // padded row stride (bytes) of the int8 tiles: fewer bank conflicts

__device__ __forceinline__ void mma_s8(int (&c)[4], int a0, int a1, int a2, int a3, int b0, int b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmArgs a) {
  __shared__ __align__(16) int8_t As[kBM][kLds];  // [token][k]
  __shared__ __align__(16) int8_t Bs[kBN][kLds];  // [column][k]: the mma "col" operand
  __shared__ int Cs[kBM][kBN + 1];
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tg = lane & 3;
  int c[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0;

  for (int k0 = 0; k0 < a.D; k0 += kBK) {
    for (int i = tid; i < kBM * kBK / 16; i += kThreads) {
      const int r = i >> 2, cc = (i & 3) * 16;
      int4 v = make_int4(0, 0, 0, 0);
      if (m0 + r < a.T) v = *reinterpret_cast<const int4*>(a.qdense + static_cast<size_t>(m0 + r) * a.ldq + k0 + cc);
      *reinterpret_cast<int4*>(&As[r][cc]) = v;
    }
    for (int i = tid; i < kBK * (kBN / 4); i += kThreads) {
      const int kk = i >> 4, bb = i & 15;
      const int k = k0 + kk;
      const unsigned byte = k < a.D ? a.packed[static_cast<size_t>(k) * a.RB + n0 / 4 + bb] : 0x55u;  // 0x55: zeros
#pragma unroll
      for (int j = 0; j < 4; ++j) Bs[bb * 4 + j][kk] = static_cast<int8_t>(static_cast<int>((byte >> (2 * j)) & 3u) - 1);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      const int r = warp * 16 + g;
      const int a0 = *reinterpret_cast<const int*>(&As[r][ks + tg * 4]);
      const int a1 = *reinterpret_cast<const int*>(&As[r + 8][ks + tg * 4]);
      const int a2 = *reinterpret_cast<const int*>(&As[r][ks + 16 + tg * 4]);
      const int a3 = *reinterpret_cast<const int*>(&As[r + 8][ks + 16 + tg * 4]);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int b0 = *reinterpret_cast<const int*>(&Bs[nt * 8 + g][ks + tg * 4]);
        const int b1 = *reinterpret_cast<const int*>(&Bs[nt * 8 + g][ks + 16 + tg * 4]);
        mma_s8(c[nt], a0, a1, a2, a3, b0, b1);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int r = warp * 16 + g, cc = nt * 8 + tg * 2;
    Cs[r][cc] = c[nt][0];
    Cs[r][cc + 1] = c[nt][1];
    Cs[r + 8][cc] = c[nt][2];
    Cs[r + 8][cc + 1] = c[nt][3];
  }
  __syncthreads();
  const int npad = a.RB * 4;
  for (int i = tid; i < kBM * kBN; i += kThreads) {
    const int r = i / kBN, cc = i % kBN;
    const int m = m0 + r;
    if (m >= a.T) break;
    const int col = n0 + cc;
    const int v16 = cc + 16 < kBN ? Cs[r][cc + 16] : 0;
    if (a.ep.raw) a.ep.raw[static_cast<size_t>(m) * npad + col] = Cs[r][cc];
    lin::epilogue_one(a.ep, m, col, Cs[r][cc], v16, a.gamma[m]);
  }
}

}  // namespace

void launch_gemm(const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(a.RB * 4 / kBN, (a.T + kBM - 1) / kBM);
  gemm_kernel<<<grid, kThreads, 0, stream>>>(a);
  QS_LAUNCH_CHECK("gemm_kernel");
}

}  // namespace qsparse
