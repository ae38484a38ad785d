// Device helpers of the ternary-linear family: block reductions/scans, the exact block-level
// absmax-int8 + top-K selection, and the shared epilogue. Included by the linear_*.cu files only.
//
// Exactness rules (they make the GPU bit-identical to quant.py on un-normed inputs):
//  - keys are |x| in fp32; order = (key desc, index asc), so ties go to the lower index;
//  - gamma = fmaxf(amax, 1e-5f), scale = rcp_rn(gamma) * 127.f (torch evaluates 127.0 / gamma as
//    reciprocal(gamma) * 127), q = rint(x * scale) clipped;
//  - y = float(acc) * ((gamma * beta) / 127.f), each op rounded on its own (__f*_rn: no FMA contraction).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "linear/api.cuh"

namespace qsparse {
namespace lin {

constexpr float kAbsmaxEps = 1e-5f;

// Unsigned codes (bytes of a) times signed int8 q (bytes of b), summed into c: the ternary codes are t+1
// in {0,1,2}, shifted by up to 6 bits, so they need the unsigned operand.
__device__ __forceinline__ int dp4a_us(unsigned a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Four words of four consecutive weight rows -> tr[b]: byte j of tr[b] is byte b of row j. Column c of
// byte b (bits 2c..2c+1 of each byte of tr[b]) then holds the 4 rows' codes of one packed column, the layout
// dp4a and the mma B fragment want (4 consecutive k in one register).
__device__ __forceinline__ void transpose_rows4(unsigned w0, unsigned w1, unsigned w2, unsigned w3,
                                                unsigned (&tr)[4]) {
  const unsigned lo01 = __byte_perm(w0, w1, 0x5140), hi01 = __byte_perm(w0, w1, 0x7362);
  const unsigned lo23 = __byte_perm(w2, w3, 0x5140), hi23 = __byte_perm(w2, w3, 0x7362);
  tr[0] = __byte_perm(lo01, lo23, 0x5410);
  tr[1] = __byte_perm(lo01, lo23, 0x7632);
  tr[2] = __byte_perm(hi01, hi23, 0x5410);
  tr[3] = __byte_perm(hi01, hi23, 0x7632);
}

// Streaming read of weight words that no other CTA of this kernel reads: read-only path, not kept in L1.
// Not volatile: the compiler may hoist these loads above independent arithmetic (more bytes in flight).
__device__ __forceinline__ unsigned ld_stream_u32(const uint8_t* p) {
  unsigned v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float load_x(const void* x, int bf16, size_t i) {
  if (bf16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(x)[i]);
  return reinterpret_cast<const float*>(x)[i];
}

template <int NT>
__device__ __forceinline__ float block_reduce_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // red may still be read from a previous reduction
  if (lane == 0) red[w] = v;
  __syncthreads();
  v = lane < NT / 32 ? red[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <int NT>
__device__ __forceinline__ float block_reduce_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  v = lane < NT / 32 ? red[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;  // identical in every lane (xor butterfly)
}

// Exclusive block scan of one int per thread; returns the prefix, *total gets the sum.
template <int NT>
__device__ __forceinline__ int block_exclusive_scan(int v, int* red, int* total) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    int n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) red[w] = inc;
  __syncthreads();
  int wsum = lane < NT / 32 ? red[lane] : 0;
  int winc = wsum;
  for (int o = 1; o < 32; o <<= 1) {
    int n = __shfl_up_sync(0xffffffffu, winc, o);
    if (lane >= o) winc += n;
  }
  const int before_warp = __shfl_sync(0xffffffffu, winc - wsum, w);
  *total = __shfl_sync(0xffffffffu, winc, 31);
  return before_warp + inc - v;
}

__device__ __forceinline__ int8_t quantize_one(float v, float scale) {
  float r = rintf(__fmul_rn(v, scale));
  r = fminf(fmaxf(r, -128.f), 127.f);
  return static_cast<int8_t>(static_cast<int>(r));
}

constexpr int kHistCopies = 8;  // warp w counts into copy w % 8: no cross-warp atomic contention (8 warps)

struct SelectScratch {
  unsigned hist[kHistCopies][256];
  float redf[32];
  int redi[32];
  unsigned prefix, lo, tie_key;
  int rem, tie_count, done;
};

// Load token row x (optionally RMSNorm * w) into xs[D] (fp32). The loads are vectorized (16 B) when
// the row allows it and issued in batches of 8 per thread, so a thread waits for one memory round
// trip per batch instead of one per element (a plain loop here cost ~10 us at D = 8192).
template <int NT>
__device__ __forceinline__ void load_row_raw(const SelectArgs& a, int t, float* xs) {
  const size_t base = static_cast<size_t>(t) * a.D;
  constexpr int B = 8;
  if (!a.x_bf16 && (a.D & 3) == 0 && (reinterpret_cast<uintptr_t>(a.x) & 15) == 0) {
    const float4* src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(a.x) + base);
    float4* dst = reinterpret_cast<float4*>(xs);
    const int n = a.D >> 2;
    for (int i0 = threadIdx.x; i0 < n; i0 += B * NT) {
      float4 v[B];
#pragma unroll
      for (int u = 0; u < B; ++u) if (i0 + u * NT < n) v[u] = __ldg(src + i0 + u * NT);
#pragma unroll
      for (int u = 0; u < B; ++u) if (i0 + u * NT < n) dst[i0 + u * NT] = v[u];
    }
  } else if (a.x_bf16 && (a.D & 7) == 0 && (reinterpret_cast<uintptr_t>(a.x) & 15) == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(a.x) + base);
    const int n = a.D >> 3;
    for (int i0 = threadIdx.x; i0 < n; i0 += B * NT) {
      uint4 v[B];
#pragma unroll
      for (int u = 0; u < B; ++u) if (i0 + u * NT < n) v[u] = __ldg(src + i0 + u * NT);
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int i = i0 + u * NT;
        if (i < n) {
          const unsigned w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
          for (int h = 0; h < 4; ++h) {  // bf16 -> fp32 is a 16-bit shift: exact
            xs[8 * i + 2 * h] = __uint_as_float(w[h] << 16);
            xs[8 * i + 2 * h + 1] = __uint_as_float(w[h] & 0xffff0000u);
          }
        }
      }
    }
  } else {
    for (int i0 = threadIdx.x; i0 < a.D; i0 += B * NT) {
      float v[B];
#pragma unroll
      for (int u = 0; u < B; ++u) if (i0 + u * NT < a.D) v[u] = load_x(a.x, a.x_bf16, base + i0 + u * NT);
#pragma unroll
      for (int u = 0; u < B; ++u) if (i0 + u * NT < a.D) xs[i0 + u * NT] = v[u];
    }
  }
}

template <int NT>
__device__ void load_row(const SelectArgs& a, int t, float* xs, SelectScratch& s) {
  load_row_raw<NT>(a, t, xs);
  __syncthreads();
  if (a.norm_w == nullptr) return;
  // Sum of squares in a fixed order for any NT >= 256 (256 strided partials, then a tree where the
  // extra warps add exact zeros): the fused GEMV and the select kernel then normalize identically.
  float ss = 0.f;
  if (threadIdx.x < 256)
    for (int i = threadIdx.x; i < a.D; i += 256) ss = __fmaf_rn(xs[i], xs[i], ss);
  const float total = block_reduce_sum<NT>(ss, s.redf);
  // Same op order as reference.RMSNorm: x * rsqrt(mean(x^2) + eps) * w (summation order differs).
  const float inv = rsqrtf(__fadd_rn(__fdiv_rn(total, static_cast<float>(a.D)), a.eps));
  for (int i0 = threadIdx.x; i0 < a.D; i0 += 8 * NT) {  // batched loads of the norm weight
    float w[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) if (i0 + u * NT < a.D) w[u] = __ldg(a.norm_w + i0 + u * NT);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int i = i0 + u * NT;
      if (i < a.D) xs[i] = __fmul_rn(__fmul_rn(xs[i], inv), w[u]);
    }
  }
  __syncthreads();
}

// Exact top-K over xs[0..D) by radix select on the fp32 bits of |x| (non-negative floats order like
// their bit patterns), 8-bit digits from the top, warp-aggregated shared-memory histograms.
// Result in s: an element is selected iff bits >= lo, or bits == tie_key and it is among the first
// tie_count such elements in index order. Returns gamma; *scale_out = 127 / gamma.
template <int NT>
__device__ float block_select(const float* xs, int D, int K, SelectScratch& s, float* scale_out) {
  const int tid = threadIdx.x, lane = tid & 31;
  float m = 0.f;
  for (int i = tid; i < D; i += NT) m = fmaxf(m, fabsf(xs[i]));
  const float amax = block_reduce_max<NT>(m, s.redf);
  const float gamma = fmaxf(amax, kAbsmaxEps);
  // quant.py computes 127.0 / gamma as torch's Tensor.__rtruediv__ = reciprocal(gamma) * 127:
  // two correctly rounded ops, which can differ from one division in the last bit.
  *scale_out = __fmul_rn(__frcp_rn(gamma), 127.f);
  if (K >= D) {
    if (tid == 0) { s.lo = 0u; s.tie_key = 0u; s.tie_count = 0; }
    __syncthreads();
    return gamma;
  }
  if (tid == 0) { s.prefix = 0u; s.rem = K; s.done = 0; }
  unsigned mask = 0u;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = tid; i < kHistCopies * 256; i += NT) (&s.hist[0][0])[i] = 0u;
    __syncthreads();
    const unsigned prefix = s.prefix;
    for (int i0 = 0; i0 < D; i0 += NT) {
      const int i = i0 + tid;
      int digit = -1;
      if (i < D) {
        const unsigned kb = __float_as_uint(fabsf(xs[i]));
        if ((kb & mask) == prefix) digit = static_cast<int>((kb >> shift) & 255u);
      }
      const unsigned same = __match_any_sync(0xffffffffu, digit);
      if (digit >= 0 && lane == __ffs(same) - 1)
        atomicAdd(&s.hist[(tid >> 5) % kHistCopies][digit], static_cast<unsigned>(__popc(same)));
    }
    __syncthreads();
    for (int i = tid; i < 256; i += NT) {  // fold the copies into copy 0
      unsigned v = s.hist[0][i];
#pragma unroll
      for (int c = 1; c < kHistCopies; ++c) v += s.hist[c][i];
      s.hist[0][i] = v;
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 8l..8l+7; find the bin where the count from the top reaches rem.
      unsigned h[8];
      unsigned local = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) { h[b] = s.hist[0][lane * 8 + b]; local += h[b]; }
      unsigned suffix = local;  // inclusive suffix sum over lanes >= lane
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned n = __shfl_down_sync(0xffffffffu, suffix, o);
        if (lane + o < 32) suffix += n;
      }
      const unsigned rem = static_cast<unsigned>(s.rem);
      const unsigned above_lane = suffix - local;
      if (above_lane < rem && suffix >= rem) {
        unsigned above = above_lane;
#pragma unroll
        for (int b = 7; b >= 0; --b) {
          if (above + h[b] >= rem) {
            const unsigned digit = static_cast<unsigned>(lane * 8 + b);
            const unsigned need = rem - above;
            s.prefix = prefix | (digit << shift);
            s.rem = static_cast<int>(need);
            s.done = (need == h[b]) ? 1 : 0;  // the whole bucket is taken: no need to look further
            break;
          }
          above += h[b];
        }
      }
    }
    __syncthreads();
    mask |= 255u << shift;
    if (s.done) break;
  }
  if (tid == 0) {
    if (s.done) {
      s.lo = s.prefix;  // every key with these top digits (and all larger keys) is selected
      s.tie_key = 0u;
      s.tie_count = 0;
    } else {
      s.lo = s.prefix + 1u;  // keys > the K-th key, plus the first rem keys equal to it
      s.tie_key = s.prefix;
      s.tie_count = s.rem;
    }
  }
  __syncthreads();
  return gamma;
}

// Compact the selection into (idx, q) in index order. Warp w owns a contiguous range of D and walks
// it 32 channels at a time (lane = channel: conflict-free shared-memory reads); ballots give each
// lane its rank among the warp's selected channels and among the ties, and one scan over the warp
// totals gives each warp its output offset. ld > K: entries K..ld-1 get (0, 0). qdense
// (optional): the masked dense int8 row, zeros up to ldd.
template <int NT>
__device__ void block_compact(const float* xs, int D, int K, float scale, const SelectScratch& s, int32_t* idx,
                              int8_t* q, int ld, int8_t* qdense, int ldd, int* redi) {
  constexpr int NW = NT / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned lt = (1u << lane) - 1u;
  const int span = (((D + NW - 1) / NW) + 31) & ~31;
  const int wb = min(D, warp * span), we = min(D, wb + span);
  const unsigned lo = s.lo, tie = s.tie_key;
  const int tie_count = s.tie_count;
  int gt = 0, eq = 0;
  for (int i0 = wb; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    bool g = false, e = false;
    if (i < we) {
      const unsigned kb = __float_as_uint(fabsf(xs[i]));
      g = kb >= lo;
      e = tie_count > 0 && kb == tie;
    }
    gt += __popc(__ballot_sync(0xffffffffu, g));
    eq += __popc(__ballot_sync(0xffffffffu, e));
  }
  if (lane == 0) redi[warp] = (gt << 16) | eq;  // D <= 65535: both fields fit
  __syncthreads();
  unsigned before = 0;
  for (int w = 0; w < warp; ++w) before += static_cast<unsigned>(redi[w]);
  int ties_seen = static_cast<int>(before & 0xffffu);
  int pos = static_cast<int>(before >> 16) + min(ties_seen, tie_count);
  for (int i0 = wb; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    bool g = false, e = false;
    float v = 0.f;
    if (i < we) {
      v = xs[i];
      const unsigned kb = __float_as_uint(fabsf(v));
      g = kb >= lo;
      e = tie_count > 0 && kb == tie;
    }
    const unsigned eb = __ballot_sync(0xffffffffu, e);
    const bool sel = g || (e && ties_seen + __popc(eb & lt) < tie_count);
    const unsigned sb = __ballot_sync(0xffffffffu, sel);
    const int8_t qv = quantize_one(v, scale);
    if (sel) {
      const int p = pos + __popc(sb & lt);
      idx[p] = i;
      q[p] = qv;
    }
    if (qdense && i < we) qdense[i] = sel ? qv : static_cast<int8_t>(0);
    pos += __popc(sb);
    ties_seen += __popc(eb);
  }
  for (int i = K + tid; i < ld; i += NT) { idx[i] = 0; q[i] = 0; }
  if (qdense) for (int i = D + tid; i < ldd; i += NT) qdense[i] = 0;
}

// ---------------------------------------------------------------------------------------------
// Epilogue for packed column `col` of token t with int32 sum acc (and acc16 = column col + 16, the
// "up" partner of an interleaved gate column). gamma is the token's absmax.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float scale_of(const float* scales, int seg, float gamma) {
  return __fdiv_rn(__fmul_rn(gamma, scales[seg]), 127.f);
}

// The epilogue with its inputs already loaded: info = colinfo[col], scales = the betas (global or shared
// memory), resid = residual[o] (read only by the residual epilogue). Kernels that prefetch these call it
// directly; epilogue_one loads them first.
__device__ __forceinline__ void epilogue_apply(const EpilogueArgs& e, size_t o, int col, int info, int acc,
                                               int acc16, float gamma, const float* scales, float resid) {
  if (info < 0) return;
  const int seg = info >> 24;
  if (e.epi == kEpiPlain) {
    e.out[o] = __fmul_rn(__int2float_rn(acc), scale_of(scales, seg, gamma));
  } else if (e.epi == kEpiResidual) {
    e.out[o] = __fadd_rn(resid, __fmul_rn(__int2float_rn(acc), scale_of(scales, seg, gamma)));
  } else {
    if ((col >> 4) & 1) return;  // up columns are consumed with their gate partner
    const float g = __fmul_rn(__int2float_rn(acc), scale_of(scales, 0, gamma));
    const float u = __fmul_rn(__int2float_rn(acc16), scale_of(scales, 1, gamma));
    float a;
    if (e.epi == kEpiRelu2) {
      const float r = fmaxf(g, 0.f);
      a = __fmul_rn(r, r);
    } else {
      a = __fdiv_rn(g, __fadd_rn(1.f, expf(-g)));
    }
    e.out[o] = __fmul_rn(a, u);
  }
}

__device__ __forceinline__ size_t epilogue_offset(const EpilogueArgs& e, int t, int info) {
  return static_cast<size_t>(t) * e.out_ld + (info & 0xffffff);
}

__device__ __forceinline__ void epilogue_one(const EpilogueArgs& e, int t, int col, int acc, int acc16, float gamma) {
  const int info = e.colinfo[col];
  if (info < 0) return;
  const size_t o = epilogue_offset(e, t, info);
  epilogue_apply(e, o, col, info, acc, acc16, gamma, e.scales, e.epi == kEpiResidual ? e.residual[o] : 0.f);
}

}  // namespace lin
}  // namespace qsparse
