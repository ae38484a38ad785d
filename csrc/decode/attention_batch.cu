// Batched decode attention (flash-decoding) and the batched RoPE + KV append that feeds it.
//
// attention_decode: B query rows, row b at position positions[b] of cache slot slots[b]; it attends over
// positions [0, positions[b]] (inclusive: rope_append_batch just appended the new token). Cache layout
// [S, nkv, max_len, hd] (fp32 or bf16), activations fp32.
//
// Design (why):
// - Grid (max_splits, nkv, B), 256 threads. A CTA owns one contiguous chunk of positions for the G query
//   heads of one kv head, so each K/V row is read from DRAM exactly once for all G heads.
// - Decode attention is a chain of dependent memory round trips (launch, K/V loads, merge), not FLOPs.
//   So a CTA issues the loads of a whole tile of positions at once: TPP lanes per position, 16-byte loads
//   (a bf16 hd-128 row is 16 lanes x 16 B), RPT positions per thread, K and V of the tile together (V is
//   prefetched with K so the two DRAM round trips overlap), and the first tile's loads go out before q is
//   even staged; each next tile's loads go out before the current tile's math (registers double-buffered).
//   A tile is ~32 positions over 256 threads (2 per thread at hd 128), so one tile's chain of dependent
//   instructions is short: a short context pays exactly one tile per CTA. Scores of the tile are computed
//   in parallel (dot over the thread's lanes + xor shuffles), the block takes the tile's max and exp() in shared memory (one warp per head), then P.V runs with
//   each thread owning a few head dims of its positions; chunks longer than one tile loop with an online
//   softmax (running max / sum, accumulator rescale).
// - Splits: nsplit(len) = min(max_splits, ceil(len / min_chunk)) chunks of ceil(len / nsplit) positions.
//   It depends only on the sequence's own length and the two fixed workspace parameters, never on B or
//   on the other rows, so a row's result is bit-identical whatever batch it runs in (the server needs
//   batched logits == single-sequence logits). The grid is fixed at capture time (lengths live in device
//   memory), so CTAs with split >= nsplit(len) exit at once and never touch the counter.
// - With nsplit > 1 each CTA writes (max, sum, unnormalized acc) per head to the workspace and the last
//   CTA to arrive at the (b, kv head) counter merges them in split order (deterministic whichever CTA is
//   last) and resets the counter: no second launch. The merge is L2 round trips, so it is built for
//   memory-level parallelism: all (max, sum) pairs in one round, then 16-byte accumulator loads unrolled
//   16 deep. Its cost grows with the split count, hence the cap (max_splits, 48 by default: 48 x 5 kv
//   heads fit one wave at 2B4T shape): at long contexts that many CTAs keep far more bytes in flight than
//   DRAM needs.
// - Optional fused RoPE + KV append (cos_t != nullptr): see the kernel; it saves the rope_append_batch
//   launch per layer and is bit-identical to it.
// - Programmatic dependent launch: the next kernel is triggered after the tile loop, not at the start (see
//   pdl.cuh: dependents resident from the start slowed the sparse projections next to this grid).
// - 2 CTAs per SM (<= 128 registers; 1 for 8 query heads per kv head, whose accumulators need more).
// - hd not a multiple of 16 bytes (odd test sizes) or unaligned caches take the same code with scalar
//   loads (VEC = false).
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "decode/common.cuh"
#include "common/pdl.cuh"
#include "decode/rope.cuh"

namespace qsparse {
namespace {

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
  if (d < half) return __fadd_rn(__fmul_rn(x[d], c[d]), __fmul_rn(-x[d + half], s[d]));
  return __fadd_rn(__fmul_rn(x[d], c[d - half]), __fmul_rn(x[d - half], s[d - half]));
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

template <typename C, int HD_MAX, bool VEC, int GMAX>
__global__ void __launch_bounds__(kThreads, GMAX >= 8 ? 1 : 2) attention_decode_kernel(
    const float* __restrict__ qkv, int stride, int nq, int nkv, int hd, C* kc, C* vc, int num_slots, int max_len,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slots, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, float* __restrict__ out, float* ws, int* counters, int max_splits,
    int min_chunk, float scale) {
  using T = Tiling<C, HD_MAX, VEC, GMAX>;
  using R = typename T::R;
  constexpr int VW = T::VW, TPP = T::TPP, CPT = T::CPT, EPT = T::EPT, PPP = T::PPP, RPT = T::RPT;
  constexpr int TILE = T::TILE;
  const int split = blockIdx.x, kv = blockIdx.y, b = blockIdx.z;
  const int G = nq / nkv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pp = tid / TPP, cl = tid % TPP;
  float* orow = out + (size_t)b * nq * hd + (size_t)kv * G * hd;
  // No early pdl::launch_dependents(): up to max_splits x nkv CTAs of this grid sit resident from launch,
  // and the next kernel (a projection) is triggered after the tile loop below, so its CTAs do not crowd
  // the SMs while this grid still waits for the previous one (CTAs that exit early trigger it implicitly).
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)

  const int pos = positions[b], slot = slots[b];
  if (slot < 0 || slot >= num_slots || pos < 0) {  // bad device-side input: loud NaN, no stray access
    if (split == 0) {
      for (int i = tid; i < G * hd; i += kThreads) orow[i] = NAN;
    }
    return;
  }
  const int len = min(pos + 1, max_len);
  int nsplit, chunk;
  split_plan(len, max_splits, min_chunk, nsplit, chunk);
  if (split >= nsplit) return;
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
      const C kq = dec::from_f<C>(rope_dim(kx, d, half, crow, srow)), vq = dec::from_f<C>(vx[d]);
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
    if (g < G && d < hd) q = rot ? rope_dim(qrow + (size_t)g * hd, d, half, crow, srow) : qrow[(size_t)g * hd + d];
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

  pdl::launch_dependents();  // only the reduction and the merge are left: the next kernel may start
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
  if (nsplit == 1) return;

  // The last CTA of (b, kv) to arrive merges the nsplit records in split order.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  int* counter = counters + (size_t)b * nkv + kv;
  if (tid == 0) is_last = atomicAdd(counter, 1) == nsplit - 1;
  __syncthreads();
  if (!is_last) return;
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
}

// The launch arguments every dispatch level passes through unchanged.
struct DecodeArgs {
  const float* qkv;
  int stride, B, nq, nkv, hd;
  void *kc, *vc;
  int num_slots, max_len;
  const int32_t *positions, *slots;
  const float *cos_t, *sin_t;
  float* out;
  float* ws;
  int* counters;
  int max_splits, min_chunk;
  cudaStream_t stream;
};

template <typename C, int HD_MAX, bool VEC, int GMAX>
void launch_attention(const DecodeArgs& a) {
  dim3 grid(a.max_splits, a.nkv, a.B);
  QS_CUDA_CHECK(pdl::launch(attention_decode_kernel<C, HD_MAX, VEC, GMAX>, grid, dim3(kThreads), 0, a.stream,
      a.qkv, a.stride, a.nq, a.nkv, a.hd, (C*)a.kc, (C*)a.vc, a.num_slots, a.max_len, a.positions, a.slots,
      a.cos_t, a.sin_t, a.out, a.ws, a.counters, a.max_splits, a.min_chunk, 1.0f / sqrtf((float)a.hd)));
  QS_LAUNCH_CHECK("attention_decode_kernel");
}

template <typename C, int HD_MAX, bool VEC>
void dispatch_g(const DecodeArgs& a) {
  const int G = a.nq / a.nkv;
  if (G <= 1) launch_attention<C, HD_MAX, VEC, 1>(a);
  else if (G <= 2) launch_attention<C, HD_MAX, VEC, 2>(a);
  else if (G <= 4) launch_attention<C, HD_MAX, VEC, 4>(a);
  else launch_attention<C, HD_MAX, VEC, 8>(a);
}

template <typename C, int HD_MAX>
void dispatch_vec(const DecodeArgs& a) {
  const bool vec = (a.hd * sizeof(C)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.kc) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.vc) % 16 == 0;
  if (vec) dispatch_g<C, HD_MAX, true>(a);
  else dispatch_g<C, HD_MAX, false>(a);
}

template <typename C>
void dispatch_hd(const DecodeArgs& a) {
  if (a.hd <= 32) dispatch_vec<C, 32>(a);
  else if (a.hd <= 64) dispatch_vec<C, 64>(a);
  else dispatch_vec<C, 128>(a);
}

template <typename C>
__global__ void rope_append_batch_kernel(float* qkv, int stride, int nq, int nkv, int hd,
                                         const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                         const int32_t* __restrict__ positions, const int32_t* __restrict__ slots,
                                         C* __restrict__ kc, C* __restrict__ vc, int num_slots, int max_len) {
  pdl::launch_dependents();  // the next kernel may start its prologue
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)
  const int b = blockIdx.y, half = hd / 2;
  const int pos = positions[b], slot = slots[b];
  // the host cannot check device values without a sync; stay in bounds (attention_decode NaNs such rows)
  if (pos < 0 || pos >= max_len || slot < 0 || slot >= num_slots) return;
  const size_t seq = (size_t)slot * nkv * max_len * hd;
  dec::rope_append_head<C>(qkv + (size_t)b * stride, blockIdx.x, nq, nkv, hd, cos_t + (size_t)pos * half,
                           sin_t + (size_t)pos * half, kc + seq, vc + seq, max_len, pos);
}

void check_shape(const char* who, int B, int stride, int nq, int nkv, int hd, int num_slots, int max_len) {
  const std::string w(who);
  if (B < 0) throw std::invalid_argument(w + ": batch must be >= 0");
  if (nkv <= 0 || nq <= 0 || nq % nkv) {
    throw std::invalid_argument(w + ": num_heads must be a positive multiple of num_kv_heads");
  }
  if (nq / nkv > kMaxG) throw std::invalid_argument(w + ": at most 8 query heads per kv head are supported");
  if (hd <= 0 || hd > 128) throw std::invalid_argument(w + ": head_dim must be in [1, 128]");
  if (stride < (nq + 2 * nkv) * hd) throw std::invalid_argument(w + ": qkv row stride is shorter than a q|k|v row");
  if (num_slots < 1 || max_len < 1) throw std::invalid_argument(w + ": the cache needs >= 1 slot and >= 1 position");
}

}  // namespace

void rope_append_batch(float* qkv, int stride, int B, int nq, int nkv, int hd, const float* cos_t,
                       const float* sin_t, const int32_t* positions, const int32_t* slots, void* kcache,
                       void* vcache, int cache_dtype, int num_slots, int max_len, cudaStream_t stream) {
  check_shape("rope_append_batch", B, stride, nq, nkv, hd, num_slots, max_len);
  if (hd % 2) throw std::invalid_argument("rope_append_batch: head_dim must be even");
  if (B == 0) return;
  if (B > 65535) throw std::invalid_argument("rope_append_batch: at most 65535 rows");
  dim3 grid(nq + 2 * nkv, B);
  const int threads = hd / 2 < 32 ? 32 : (hd / 2 > 128 ? 128 : hd / 2);
  if (cache_dtype == kDBF16) {
    QS_CUDA_CHECK(pdl::launch(rope_append_batch_kernel<__nv_bfloat16>, grid, dim3(threads), 0, stream,
        qkv, stride, nq, nkv, hd, cos_t, sin_t, positions, slots, (__nv_bfloat16*)kcache, (__nv_bfloat16*)vcache,
        num_slots, max_len));
  } else if (cache_dtype == kDF32) {
    QS_CUDA_CHECK(pdl::launch(rope_append_batch_kernel<float>, grid, dim3(threads), 0, stream, qkv, stride, nq, nkv,
                              hd, cos_t, sin_t, positions, slots, (float*)kcache, (float*)vcache, num_slots,
                              max_len));
  } else {
    throw std::invalid_argument("rope_append_batch: KV cache must be float32 or bfloat16");
  }
  QS_LAUNCH_CHECK("rope_append_batch_kernel");
}

void attention_decode(const float* qkv, int stride, int B, int nq, int nkv, int hd, void* kcache, void* vcache,
                      int cache_dtype, int num_slots, int max_len, const int32_t* positions, const int32_t* slots,
                      const float* cos_t, const float* sin_t, float* out, float* ws, int* counters, int max_splits,
                      int min_chunk, cudaStream_t stream) {
  check_shape("attention_decode", B, stride, nq, nkv, hd, num_slots, max_len);
  if (max_splits < 1 || max_splits > kMaxSplits) {
    throw std::invalid_argument("attention_decode: max_splits must be in [1, 128]");
  }
  if (min_chunk < 1) throw std::invalid_argument("attention_decode: min_chunk must be >= 1");
  if ((cos_t == nullptr) != (sin_t == nullptr)) {
    throw std::invalid_argument("attention_decode: fused RoPE needs both the cos and the sin table");
  }
  if (cos_t != nullptr && hd % 2) throw std::invalid_argument("attention_decode: RoPE needs an even head_dim");
  if (B == 0) return;
  if (B > 65535) throw std::invalid_argument("attention_decode: at most 65535 rows");
  if (ws == nullptr || counters == nullptr || reinterpret_cast<uintptr_t>(ws) % 16) {
    throw std::invalid_argument("attention_decode: needs a 16-byte aligned workspace and counters");
  }
  const DecodeArgs a{qkv, stride, B, nq, nkv, hd, kcache, vcache, num_slots, max_len, positions, slots,
                     cos_t, sin_t, out, ws, counters, max_splits, min_chunk, stream};
  if (cache_dtype == kDBF16) {
    dispatch_hd<__nv_bfloat16>(a);
  } else if (cache_dtype == kDF32) {
    dispatch_hd<float>(a);
  } else {
    throw std::invalid_argument("attention_decode: KV cache must be float32 or bfloat16");
  }
}

}  // namespace qsparse
