// Host-side entry point of the full-precision (bf16 weights) linear family: the one-token top-K gather-GEMV.
// Raw device pointers and a stream only; the Python wrapper (qsparse_infer/kernels/dense.py) validates
// shapes, dtypes and devices before anything reaches this function.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "linear/api.cuh"

namespace qsparse {

// Epilogues of the dense family (shared with kernels/dense.py: DENSE_EPI_*).
enum DenseEpilogue : int { kDenseEpiPlain = 0, kDenseEpiResidual = 1, kDenseEpiSiluGlu = 2 };

// y = (x' ⊙ M) · W (+ bias | + residual), x' = RMSNorm(x) * norm_w when norm_w is given, M the top-K mask of
// |x'| (ties: the lower index), W bf16 [D, ld] row-major: row k = input channel k, so a kept channel reads
// one contiguous run of its row. One token.
//
// Segments: nseg = 1 (plain / residual: columns [0, N)), or 2 (silu-glu: segment 0 = gate = columns
// [0, N), segment 1 = up = columns [col1, col1 + N); each its own K (K[0], K[1]); out[n] = silu(g) * u).
// rescale: the L2 re-scale after the top-K (quant.sparsify_topk): each segment's sum times
// ||x'|| / ||x' ⊙ M||.
//
// ws: float [2, splits, N_blocks * 512] workspace; counters: uint32 [N_blocks], zero between calls (the last
// CTA of each column block resets its counter), N_blocks = ceil(N / 512).
struct DenseGemvArgs {
  SelectArgs sel;                 // x, x_bf16, norm_w, eps, D (T = 1); sel.K is unused (see K below)
  int K[2] = {0, 0};
  int nseg = 1;
  const uint16_t* w = nullptr;    // bf16 bits [D, ld]
  int ld = 0;
  int N = 0;                      // output columns (per segment)
  int col1 = 0;                   // first column of segment 1
  int rescale = 0;
  int epi = kDenseEpiPlain;
  const float* bias = nullptr;    // [N] or nullptr
  const float* residual = nullptr;  // [N] (may alias out)
  float* out = nullptr;           // [N] fp32
  int splits = 1;                 // CTAs along the selected rows, per column block and segment
  float* ws = nullptr;
  uint32_t* counters = nullptr;
};

void launch_dense_gemv(const DenseGemvArgs& a, cudaStream_t stream);
// Dynamic shared memory the kernel needs at (D, max K, fused norm or not); 0 when it cannot run (too large).
size_t dense_gemv_smem_bytes(int D, int Kmax, bool norm);
int dense_gemv_max_d();

}  // namespace qsparse
