// RoPE + KV append for one head of one token row, shared by rope_append (consecutive positions of one
// sequence) and rope_append_batch (one row per sequence, each at its own position and cache slot), so the
// two stay bit-identical.
#pragma once
#include "decode/common.cuh"

namespace qsparse {
namespace dec {

// row: the token's qkv row; head in [0, nq + 2 nkv): [0, nq) queries (rotated in place), [nq, nq + nkv)
// keys (rotated into kc), the rest values (copied into vc). kc/vc: the sequence's caches [nkv, max_len, hd].
// c/s: the cos/sin rows of pos. Threads of the block stride over the head's dimensions.
template <typename C>
__device__ __forceinline__ void rope_append_head(float* row, int head, int nq, int nkv, int hd, const float* c,
                                                 const float* s, C* kc, C* vc, int max_len, int pos) {
  const int half = hd / 2;
  float* x = row + (size_t)head * hd;
  if (head < nq + nkv) {
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      const float x0 = x[i], x1 = x[i + half];
      // Exactly the reference's x*cos + rotate_half(x)*sin, two products then a sum, no FMA contraction.
      const float y0 = __fadd_rn(__fmul_rn(x0, c[i]), __fmul_rn(-x1, s[i]));
      const float y1 = __fadd_rn(__fmul_rn(x1, c[i]), __fmul_rn(x0, s[i]));
      if (head < nq) {
        x[i] = y0;
        x[i + half] = y1;
      } else {
        C* dst = kc + ((size_t)(head - nq) * max_len + pos) * hd;
        dst[i] = from_f<C>(y0);
        dst[i + half] = from_f<C>(y1);
      }
    }
  } else {
    C* dst = vc + ((size_t)(head - nq - nkv) * max_len + pos) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = from_f<C>(x[i]);
  }
}

}  // namespace dec
}  // namespace qsparse
