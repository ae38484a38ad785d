// Host-side entry points of the ternary-linear kernel family (packing, quantize + top-K, GEMV, GEMM).
// Raw device pointers and a stream only; the Python wrapper (qsparse_infer/kernels/linear.py) validates
// shapes, dtypes and devices before anything reaches these functions.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace qsparse {

// Epilogue kinds, shared with the Python wrapper (linear_kernels.EPI_*).
enum LinearEpilogue : int { kEpiPlain = 0, kEpiResidual = 1, kEpiRelu2 = 2, kEpiSilu = 3 };

// colinfo[c] for packed column c: -1 for padding, else (segment << 24) | logical_output_index.
// It replaces the column map of quant.column_map and names each column's beta.

// int8 [N, D] (concatenated segments) -> packed uint8 [D, RB]; err[0] is set to 1 on a non-ternary value.
void launch_pack(const int8_t* w, const int32_t* colinfo, uint8_t* packed, int32_t* err, int N, int D, int RB,
                 cudaStream_t stream);
// packed uint8 [D, RB] -> int8 [N, D]; err[0] is set to 1 on the invalid code 3.
void launch_unpack(const uint8_t* packed, const int32_t* colinfo, int8_t* w, int32_t* err, int D, int RB,
                   cudaStream_t stream);

// Per-token absmax int8 + top-K (optionally RMSNorm-fused) for T tokens of x [T, D] (fp32 or bf16).
// Writes idx int32 [T, ld] (ascending) and q int8 [T, ld]; entries K..ld-1 are padded with (0, 0);
// gamma float [T]. When qdense is given, also the masked dense int8 row qdense [T, ldd] (zeros past D).
struct SelectArgs {
  const void* x = nullptr;
  int x_bf16 = 0;
  const float* norm_w = nullptr;  // nullptr: no fused norm
  float eps = 1e-5f;
  int T = 0, D = 0, K = 0;
  int32_t* idx = nullptr;
  int8_t* q = nullptr;
  int ld = 0;
  float* gamma = nullptr;
  int8_t* qdense = nullptr;
  int ldd = 0;
};
// threads: the CTA size per token, 0 = by T (1024 up to 2 tokens per SM, else 256); both give the same bits.
void launch_select(const SelectArgs& a, cudaStream_t stream, int threads = 0);

// The epilogue every ternary product shares.
struct EpilogueArgs {
  const int32_t* colinfo = nullptr;  // [Npad]
  const float* scales = nullptr;     // beta per segment
  int epi = kEpiPlain;
  const float* residual = nullptr;   // [T, out_ld] fp32 (may alias out)
  float* out = nullptr;              // [T, out_ld] fp32
  int out_ld = 0;
  int32_t* raw = nullptr;            // optional [T, Npad] raw int32 accumulators (tests)
};

// Gather-GEMV for T <= 8 tokens. fused=1: every CTA quantizes + selects from x itself (one launch);
// fused=0: reads idx/q/gamma written by launch_select (ld = padded K, a multiple of 4).
struct GemvArgs {
  int fused = 1;
  SelectArgs sel;                    // x, norm, T, D, K (and for fused=0: idx, q, ld, gamma)
  const uint8_t* packed = nullptr;   // [D, RB]
  int RB = 0;                        // bytes per packed row (Npad / 4, a multiple of 16)
  EpilogueArgs ep;
  int chunks_per_tile = 8;           // 16-byte chunks (64 columns) per CTA column tile: 1,2,4,8
  int splits = 1;                    // CTAs along the selected rows (split-K)
  int32_t* ws = nullptr;             // split-K workspace [8, Npad] int32, all zero between calls
  uint32_t* counters = nullptr;      // [8, ntiles] arrival counters, all zero between calls
};
void launch_gemv(const GemvArgs& a, cudaStream_t stream);
// One-token gather-GEMV (variant 2, linear_gemv_t1.cu): selection fused, R CTAs per 512-column block
// reduced through a thread-block cluster (R = 1 below sm_90). 1 <= K <= D <= gemv_t1_max_d().
// threads: CTA size, 0 = the default for D (kernel lab: 128, 256 or 512 where D fits).
// variant 2 (linear_gemv_t1.cu) or 3 (linear_gemv_t1p.cu: weight rows prefetched into shared memory; needs
// gemv_t1p_smem_bytes(D, R, threads) <= gemv_t1p_max_smem_bytes() and D <= 8192).
void launch_gemv_t1(const SelectArgs& sel, const uint8_t* packed, int RB, const EpilogueArgs& ep, int nseg, int R,
                    cudaStream_t stream, int threads = 0, int variant = 2);
size_t gemv_t1p_smem_bytes(int D, int R, int threads);
size_t gemv_t1p_max_smem_bytes();
int gemv_t1_max_d();
// Dynamic shared memory the fused GEMV needs (0 when it cannot run fused at this D, K).
size_t gemv_fused_smem_bytes(int D, int K, int chunks_per_tile);

// Tensor-core GEMM for many tokens (variant 1, linear_gemm.cu: 64-token tiles, prefill): qdense int8 [T, ldq] (masked, zero past D, ldq multiple of 64)
// times the packed ternary matrix, int32 accumulation, then the epilogue with gamma [T].
struct GemmArgs {
  const int8_t* qdense = nullptr;
  int ldq = 0;
  const float* gamma = nullptr;
  int T = 0, D = 0;
  const uint8_t* packed = nullptr;
  int RB = 0;
  EpilogueArgs ep;
};
void launch_gemm(const GemmArgs& a, cudaStream_t stream);
// GEMM variant 2 (linear_gemm_skinny.cu) for decode widths (1-64 tokens; any T works): weights straight into
// mma fragments, 16 tokens per CTA, the k range split over `splits` CTAs of one cluster (clamped to
// 1..gemm_skinny_max_splits(); 1 below sm_90).
void launch_gemm_skinny(const GemmArgs& a, int splits, cudaStream_t stream);
int gemm_skinny_max_splits();
// GEMM variant 3 (gemm_prefill.cu) for prefill widths: tile_tokens (64 or 128) tokens x 128 columns per
// CTA, both operands through a cp.async pipeline, no split-K. ldq must be a multiple of 64.
void launch_gemm_prefill(const GemmArgs& a, int tile_tokens, cudaStream_t stream);

}  // namespace qsparse
