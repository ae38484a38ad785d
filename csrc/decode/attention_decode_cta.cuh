// The decode attention's per-CTA body (flash-decoding split of one kv head, fused RoPE + KV append, merge
// by the last CTA), shared by attention_decode_kernel (attention_batch.cu, which documents the design) and
// the persistent decode step (step_kernel.cu). One source for both, so they produce the same bits.
#pragma once
#include <cmath>
#include <type_traits>

#include "decode/common.cuh"
#include "common/pdl.cuh"
#include "decode/rope.cuh"

namespace qsparse {
namespace attn_decode {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxG = 8;
constexpr int kMaxSplits = 128;

// Compile-time tiling for cache element C, head dims padded to HD_MAX, 16-byte loads or scalar ones, and at
// most GMAX query heads per kv head (G rounded up to a power of two: the per-head loops are unrolled, so the
// code, and the instruction-cache footprint, grows with GMAX, not with kMaxG).
template <typename C, int HD_MAX, bool VEC, int GMAX>
struct Tiling {
  using R = typename std::conditional<VEC, uint4, C>::type;       // one load
  static constexpr int VW = VEC ? 16 / (int)sizeof(C) : 1;        // elements per load
  static constexpr int NC = HD_MAX / VW;                          // loads per row
  static constexpr int TPP = NC < 16 ? NC : 16;                   // threads per position
  static constexpr int CPT = NC / TPP;                            // loads per thread per row
  static constexpr int EPT = CPT * VW;                            // head dims per thread
  static constexpr int PPP = kThreads / TPP;                      // positions per pass of the block
  // Few positions per thread: the chain of one tile (scores, softmax, P.V) is what a short context pays,
  // so a tile is ~32 positions spread over all 256 threads rather than 64 over 128 (4x fewer instructions
  // per warp than the first version, which spent its ~11 us issuing ~2.7k dependent instructions per warp).
  static constexpr int RPT = PPP >= 32 ? 1 : 32 / PPP;            // positions per thread per tile
  static constexpr int TILE = PPP * RPT;                          // positions per tile
  static_assert(TPP <= 32 && 32 % TPP == 0 && EPT <= 8 && GMAX <= kWarps, "tiling");
  // shared memory (floats): q, then a union of {scores x2 buffers, per-warp acc, merge weights}, then stats
  static constexpr int U_SCORES = 2 * GMAX * TILE;
  static constexpr int U_RED = kWarps * GMAX * HD_MAX;
  static constexpr int U_MERGE = GMAX * kMaxSplits;
  static constexpr int U = U_SCORES > U_RED ? (U_SCORES > U_MERGE ? U_SCORES : U_MERGE)
                                            : (U_RED > U_MERGE ? U_RED : U_MERGE);
  static constexpr int SMEM = GMAX * HD_MAX + U + 3 * GMAX;
};

template <typename R>
__device__ __forceinline__ R zero_load() {
  if constexpr (std::is_same<R, uint4>::value) {
    return make_uint4(0u, 0u, 0u, 0u);
  } else {
    return dec::from_f<R>(0.f);
  }
}

// Expand one load into VW floats.
template <typename C, bool VEC, typename R>
__device__ __forceinline__ void unpack(const R& r, float* f) {
  if constexpr (!VEC) {
    f[0] = dec::to_f<C>(r);
  } else if constexpr (std::is_same<C, float>::value) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  } else {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
}

template <typename C, bool VEC, typename R>
__device__ __forceinline__ R load_row(const C* __restrict__ p) {
  if constexpr (VEC) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    return *p;
  }
}

// Dimension d of a head x rotated by RoPE at the position whose cos/sin rows are c/s: exactly
// dec::rope_append_head's operations (two products then a sum, no FMA contraction), so the fused path stores
// and attends with the values rope_append_batch would have written.
__device__ __forceinline__ float rope_dim(const float* x, int d, int half, const float* c, const float* s) {
  if (d < half) return __fadd_rn(__fmul_rn(__ldcg(x + d), c[d]), __fmul_rn(-__ldcg(x + d + half), s[d]));
  return __fadd_rn(__fmul_rn(__ldcg(x + d), c[d - half]), __fmul_rn(__ldcg(x + d - half), s[d - half]));
}

// Number of splits and positions per split of a sequence of len positions (len >= 1). Only len and the
// fixed parameters enter: batch invariance depends on it.
__device__ __forceinline__ void split_plan(int len, int max_splits, int min_chunk, int& nsplit, int& chunk) {
  nsplit = min(max_splits, (len + min_chunk - 1) / min_chunk);
  chunk = (len + nsplit - 1) / nsplit;
  nsplit = (len + chunk - 1) / chunk;  // drop splits that the rounding left empty
}

// The K and V registers of one tile (RPT positions x CPT loads per thread).
template <typename R, int RPT, int CPT>
struct KVFrag {
  R k[RPT][CPT], v[RPT][CPT];
};

// One CTA's work of the decode attention: split `split` of kv head `kv` of row `b` (the kernel passes its
// blockIdx; the persistent decode step (step_kernel.cu) passes its tiles). Returns true in the CTA that
// wrote row b's final output for this kv head (nsplit == 1, or the merging CTA): the persistent step
// signals its consumers from there. Every read of qkv goes through L2 (__ldcg): in the persistent step
// another SM wrote it within the same launch, and this SM's L1 may still hold the previous layer's lines.
// kPdlTrigger: trigger the next kernel's launch after the tile loop (the kernel; the persistent step has no
// dependent kernel until it ends).
template <typename C, int HD_MAX, bool VEC, int GMAX, bool kPdlTrigger = true>
__device__ __forceinline__ bool attention_decode_cta(
    const float* __restrict__ qkv, int stride, int nq, int nkv, int hd, C* kc, C* vc, int num_slots, int max_len,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slots, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, float* __restrict__ out, float* ws, int* counters, int max_splits,
    int min_chunk, float scale, int split, int kv, int b) {
  using T = Tiling<C, HD_MAX, VEC, GMAX>;
  using R = typename T::R;
  constexpr int VW = T::VW, TPP = T::TPP, CPT = T::CPT, EPT = T::EPT, PPP = T::PPP, RPT = T::RPT;
  constexpr int TILE = T::TILE;
  const int G = nq / nkv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pp = tid / TPP, cl = tid % TPP;
  float* orow = out + (size_t)b * nq * hd + (size_t)kv * G * hd;

  const int pos = positions[b], slot = slots[b];
  if (slot < 0 || slot >= num_slots || pos < 0) {  // bad device-side input: loud NaN, no stray access
    if (split == 0) {
      for (int i = tid; i < G * hd; i += kThreads) orow[i] = NAN;
    }
    return split == 0;
  }
  const int len = min(pos + 1, max_len);
  int nsplit, chunk;
  split_plan(len, max_splits, min_chunk, nsplit, chunk);
  if (split >= nsplit) return false;
  const int p0 = split * chunk, p1 = min(len, p0 + chunk);

  __shared__ __align__(16) float smem[T::SMEM];
  float* q_s = smem;                       // [GMAX][HD_MAX], zero-padded past hd and past G
  float* u = q_s + GMAX * HD_MAX;          // union
  float* s_sm = u;                         // [2][GMAX][TILE] scores, then probabilities
  float* red = u;                          // [kWarps][GMAX][HD_MAX] after the tile loop
  float* c_sm = u;                         // [GMAX][kMaxSplits] merge weights
  float* corr_sm = u + T::U;               // [GMAX]
  float* m_fin = corr_sm + GMAX;           // [GMAX]
  float* l_fin = m_fin + GMAX;             // [GMAX]

  const size_t head_off = ((size_t)slot * nkv + kv) * max_len * hd;
  C* kb = kc + head_off;
  C* vb = vc + head_off;
  // Fused RoPE + append (cos_t != nullptr): q is rotated while it is staged, and the CTA whose chunk holds
  // position pos rotates the new k, rounds k and v to the cache type, stores them in the cache and in shared
  // memory, and patches them into its tile registers instead of reading the row back (the row's loads are
  // skipped). Rows past the cache are neither rotated nor stored, as in rope_append_batch.
  const bool rot = cos_t != nullptr && pos < max_len;
  const bool own_new = rot && p0 <= pos && pos < p1;
  const int half = hd / 2;
  const float* row = qkv + (size_t)b * stride;
  const float* crow = rot ? cos_t + (size_t)pos * half : nullptr;
  const float* srow = rot ? sin_t + (size_t)pos * half : nullptr;
  __shared__ __align__(16) C new_kv[2][HD_MAX];
  auto load_tile = [&](KVFrag<R, RPT, CPT>& f, int t0) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = t0 + r * PPP + pp;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int d0 = (cl + j * TPP) * VW;
        const bool ok = p < p1 && d0 < hd && !(own_new && p == pos);
        f.k[r][j] = ok ? load_row<C, VEC, R>(kb + (size_t)p * hd + d0) : zero_load<R>();
        f.v[r][j] = ok ? load_row<C, VEC, R>(vb + (size_t)p * hd + d0) : zero_load<R>();
      }
    }
  };
  // After new_kv is written and a barrier: the new token's registers of a tile that holds it.
  auto patch_tile = [&](KVFrag<R, RPT, CPT>& f, int t0) {
    if (!own_new || pos < t0 || pos >= t0 + TILE) return;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      if (t0 + r * PPP + pp != pos) continue;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int d0 = (cl + j * TPP) * VW;
        if (d0 < hd) {
          f.k[r][j] = *reinterpret_cast<const R*>(&new_kv[0][d0]);
          f.v[r][j] = *reinterpret_cast<const R*>(&new_kv[1][d0]);
        }
      }
    }
  };
  KVFrag<R, RPT, CPT> cur, nxt;
  load_tile(cur, p0);  // in flight while q is staged
  if (own_new) {
    const float* kx = row + (size_t)(nq + kv) * hd;
    const float* vx = row + (size_t)(nq + nkv + kv) * hd;
    for (int d = tid; d < hd; d += kThreads) {
      const C kq = dec::from_f<C>(rope_dim(kx, d, half, crow, srow)), vq = dec::from_f<C>(__ldcg(vx + d));
      new_kv[0][d] = kq;
      new_kv[1][d] = vq;
      kb[(size_t)pos * hd + d] = kq;
      vb[(size_t)pos * hd + d] = vq;
    }
  }

  const float* qrow = row + (size_t)kv * G * hd;
  for (int i = tid; i < GMAX * HD_MAX; i += kThreads) {
    const int g = i / HD_MAX, d = i % HD_MAX;
    float q = 0.f;
    if (g < G && d < hd) q = rot ? rope_dim(qrow + (size_t)g * hd, d, half, crow, srow) : __ldcg(qrow + (size_t)g * hd + d);
    q_s[i] = q;
  }

  float acc[GMAX][EPT];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[g][e] = 0.f;
  }
  // Running max / sum of head g = warp, held by that warp (GMAX <= kWarps).
  float m_run = -INFINITY, l_run = 0.f;
  __syncthreads();  // q_s and new_kv are complete
  patch_tile(cur, p0);

  int buf = 0;
  for (int t0 = p0; t0 < p1; t0 += TILE, buf ^= 1) {
    // The next tile's loads go out before this tile's math: a CTA with a long chunk streams its K/V with one
    // tile in flight behind the one it computes on.
    if (t0 + TILE < p1) {
      load_tile(nxt, t0 + TILE);
      patch_tile(nxt, t0 + TILE);
    }
    float* sc = s_sm + buf * GMAX * TILE;
    // 1. scores of the tile: partial dot over this thread's dims, then over the TPP lanes of the position
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      float kf[EPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) unpack<C, VEC>(cur.k[r][j], kf + j * VW);
      const bool valid = t0 + r * PPP + pp < p1;
      float s[GMAX];
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        s[g] = 0.f;
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const float* qg = q_s + g * HD_MAX + (cl + j * TPP) * VW;
          if constexpr (VW % 4 == 0) {  // 16-byte shared loads (aligned: VW and HD_MAX are multiples of 4)
#pragma unroll
            for (int v = 0; v < VW; v += 4) {
              const float4 q4 = *reinterpret_cast<const float4*>(qg + v);
              s[g] += q4.x * kf[j * VW + v];
              s[g] += q4.y * kf[j * VW + v + 1];
              s[g] += q4.z * kf[j * VW + v + 2];
              s[g] += q4.w * kf[j * VW + v + 3];
            }
          } else {
#pragma unroll
            for (int v = 0; v < VW; ++v) s[g] += qg[v] * kf[j * VW + v];
          }
        }
      }
      // the GMAX shuffle trees are independent: their latencies overlap
#pragma unroll
      for (int o = TPP / 2; o > 0; o >>= 1) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
      }
      if (cl == 0) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) sc[g * TILE + r * PPP + pp] = valid ? s[g] * scale : -INFINITY;
      }
    }
    __syncthreads();
    // 2. block softmax of the tile, one warp per head: new running max, rescale factor, probabilities
    if (warp < G) {
      float* sg = sc + warp * TILE;
      float tmax = -INFINITY;
      for (int k = lane; k < TILE; k += 32) tmax = fmaxf(tmax, sg[k]);
      tmax = dec::warp_max(tmax);
      const float m_new = fmaxf(m_run, tmax);  // finite: a tile holds >= 1 valid position
      const float corr = expf(m_run - m_new);  // first tile: exp(-inf) = 0
      float psum = 0.f;
      for (int k = lane; k < TILE; k += 32) {
        const float pe = expf(sg[k] - m_new);
        sg[k] = pe;
        psum += pe;
      }
      psum = dec::warp_sum(psum);
      l_run = l_run * corr + psum;
      m_run = m_new;
      if (lane == 0) corr_sm[warp] = corr;
    }
    __syncthreads();
    // 3. acc = acc * corr + P.V over this thread's positions and dims (scores: double-buffered, so the
    //    next tile's scores never overwrite probabilities another thread still reads)
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < G) {
        const float c = corr_sm[g];
#pragma unroll
        for (int e = 0; e < EPT; ++e) acc[g][e] *= c;
      }
    }
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      float vf[EPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) unpack<C, VEC>(cur.v[r][j], vf + j * VW);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
          const float pr = sc[g * TILE + r * PPP + pp];
#pragma unroll
          for (int e = 0; e < EPT; ++e) acc[g][e] += pr * vf[e];
        }
      }
    }
    cur = nxt;  // waits for the next tile's loads only now (unused after the last tile)
  }

  if constexpr (kPdlTrigger) pdl::launch_dependents();  // only the reduction and the merge are left: the next kernel may start
  // Reduce acc over the positions groups: xor shuffles inside the warp, then the warps through smem.
  __syncthreads();  // red aliases the score buffers
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        float a = acc[g][e];
#pragma unroll
        for (int o = TPP; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane < TPP) red[(warp * GMAX + g) * HD_MAX + (cl + (e / VW) * TPP) * VW + e % VW] = a;
      }
    }
  }
  if (warp < G && lane == 0) {
    m_fin[warp] = m_run;
    l_fin[warp] = l_run;
  }
  __syncthreads();

  // Split record per head: {max, sum, 2 pad, acc[hd4]}, hd4 = hd rounded up to 4, so the merge reads the
  // accumulators as 16-byte vectors (the padding dims hold zeros: q and V are zero-padded there).
  const int hd4 = (hd + 3) & ~3;
  const size_t part = (size_t)hd4 + 4;
  float* wsb = ws + ((size_t)b * nq + (size_t)kv * G) * max_splits * part;  // [G][max_splits][part]
  for (int i = tid; i < G * hd4; i += kThreads) {
    const int g = i / hd4, d = i % hd4;
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += red[(w * GMAX + g) * HD_MAX + d];
    if (nsplit == 1) {
      if (d < hd) orow[g * hd + d] = a / l_fin[g];
    } else {
      float* rec = wsb + ((size_t)g * max_splits + split) * part;
      rec[4 + d] = a;
      if (d == 0) {
        rec[0] = m_fin[g];
        rec[1] = l_fin[g];
      }
    }
  }
  if (nsplit == 1) return true;

  // The last CTA of (b, kv) to arrive merges the nsplit records in split order.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  int* counter = counters + (size_t)b * nkv + kv;
  if (tid == 0) is_last = atomicAdd(counter, 1) == nsplit - 1;
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  if (warp < G) {
    const float* base = wsb + (size_t)warp * max_splits * part;
    constexpr int kPerLane = kMaxSplits / 32;
    float ms[kPerLane], ls[kPerLane];  // one round of L2 loads for all (max, sum) pairs
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int s = lane + 32 * k;
      ms[k] = s < nsplit ? __ldcg(base + s * part) : -INFINITY;
      ls[k] = s < nsplit ? __ldcg(base + s * part + 1) : 0.f;
    }
    float M = ms[0];
#pragma unroll
    for (int k = 1; k < kPerLane; ++k) M = fmaxf(M, ms[k]);
    M = dec::warp_max(M);
    float L = 0.f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int s = lane + 32 * k;
      if (s < nsplit) {
        const float c = expf(ms[k] - M);
        c_sm[warp * kMaxSplits + s] = c;
        L += c * ls[k];
      }
    }
    L = dec::warp_sum(L);
    if (lane == 0) l_fin[warp] = L;
  }
  __syncthreads();
  // One thread per 4 dims of a head; the loop is unrolled so many 16-byte L2 loads are in flight at once
  // (the merge is a chain of L2 round trips otherwise).
  const int nd4 = hd4 / 4;
  for (int i = tid; i < G * nd4; i += kThreads) {
    const int g = i / nd4, d = (i % nd4) * 4;
    const float4* base = reinterpret_cast<const float4*>(wsb + (size_t)g * max_splits * part + 4 + d);
    const size_t step = part / 4;
    const float* cg = c_sm + g * kMaxSplits;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
    for (int s = 0; s < nsplit; ++s) {
      const float4 v = __ldcg(base + s * step);
      const float c = cg[s];
      a.x += c * v.x;
      a.y += c * v.y;
      a.z += c * v.z;
      a.w += c * v.w;
    }
    const float L = l_fin[g];
    float* o = orow + g * hd + d;
    o[0] = a.x / L;  // d < hd always; the other three may be padding
    if (d + 1 < hd) o[1] = a.y / L;
    if (d + 2 < hd) o[2] = a.z / L;
    if (d + 3 < hd) o[3] = a.w / L;
  }
  if (tid == 0) *counter = 0;
  return true;
}

}  // namespace attn_decode
}  // namespace qsparse
