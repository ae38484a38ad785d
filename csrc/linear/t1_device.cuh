// Device pieces shared by the one-token gather-GEMV variants (linear_gemv_t1.cu = variant 2,
// linear_gemv_t1p.cu = variant 3): the selection from registers, the 4-row dp4a step, and the reduction +
// epilogue through a thread-block cluster. Included by those two files only.
//
// Selection (exact, ties to the lower index): a thread holds KPT values of x (+ RMSNorm); value j of thread
// (warp, lane) is channel warp*32*KPT + 32j + lane. The K-th largest key (|x| as fp32 bits, < 2^31) is found in
// one of two ways, chosen per compiled variant by how many channels it holds (both exact: the same set):
//  - bisection (NT x KPT < kRadixMinKeys), 2 bits a step, each step one block-wide count of three candidate
//    thresholds packed into two words, stopping as soon as a candidate has exactly K keys at or above it (near
//    the K-th value neighbouring keys differ by ~1e-3 relative, so ~10 key bits down): ~8-12 barriers, every
//    key touched 3 times a step, so issue-bound when a thread holds many keys;
//  - radix select (the wide variants): at most 3 passes over key bits [30:20], [19:9], [8:0], each a
//    shared-memory histogram of the keys still in play, a block scan of its bins from the top and a broadcast
//    of the bin that holds the K-th key, ending once that bin is taken whole (pass 2 for continuous inputs).
//  Measured (bench/NOTES-persistent.md change 4, NOTES-dense.md): the radix select is 0.8-1.5 us slower at
//  D <= 6912 (its passes' barriers and colliding atomics) and faster from D = 8192 on, hence the split.
// The result is a rule: selected iff key >= lo, or key == tie among the first (K - count(key >= lo)) such
// channels by index.
#pragma once
#include <cooperative_groups.h>

#include "common/common.cuh"
#include "linear/device.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace t1 {

namespace cg = cooperative_groups;

constexpr int kColsPerCta = 512;  // 32 lanes x 4 bytes x 4 columns per byte
constexpr unsigned kNoTie = 0xffffffffu;  // no key (|x| bits < 2^31) equals it

struct T1Args {
  SelectArgs sel;       // x, x_bf16, norm_w, eps, D, K (T = 1)
  const uint8_t* packed;
  int RB;               // bytes per packed row
  EpilogueArgs ep;
  int R;                // CTAs per column block (cluster size along y)
  int nseg;             // number of betas (segments)
  int rows_per_cta;     // variant 3: channels (weight rows) per CTA, a multiple of 4
};

// Block-wide sums of two packed per-thread counters; parity double-buffers `red` so one barrier per call
// suffices (a thread can only overwrite a buffer after every thread has passed the barrier that
// follows the last reads of it).
template <int NT>
__device__ __forceinline__ uint2 block_sum2(unsigned a, unsigned b, uint2* red, int parity) {
  a = __reduce_add_sync(0xffffffffu, a);
  b = __reduce_add_sync(0xffffffffu, b);
  if ((threadIdx.x & 31) == 0) red[parity * 32 + (threadIdx.x >> 5)] = make_uint2(a, b);
  __syncthreads();
  uint2 s = make_uint2(0u, 0u);
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    const uint2 v = red[parity * 32 + w];
    s.x += v.x;
    s.y += v.y;
  }
  return s;
}

// acc[4b + j] += code(row r, column 4b + j of this lane's word) * q_r over the 4 rows r. Codes are t+1: per
// group of 4 rows the words are byte-transposed (__byte_perm) so one word holds one byte of 4 rows, then
// column j of the byte is (word & 0x03030303 << 2j) = code * 4^j, dotted with the 4 int8 q by dp4a.u32.s32;
// shifting back and subtracting sum(q) gives sum(t * q) exactly (t1_finish).
__device__ __forceinline__ void accumulate4(int (&acc)[16], unsigned w0, unsigned w1, unsigned w2, unsigned w3,
                                            int q4) {
  unsigned tr[4];
  lin::transpose_rows4(w0, w1, w2, w3, tr);
#pragma unroll
  for (int b = 0; b < 4; ++b)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[4 * b + j] = lin::dp4a_us(tr[b] & (0x03030303u << (2 * j)), q4, acc[4 * b + j]);
}

// Shared memory of the selection and the reduction (static; the kernels add their own dynamic part).
struct Shared {
  uint2 cnt[64];  // the bisection's counts (double-buffered)
  float redf[32];
  int scan[32];   // the radix passes' warp totals
  int found[3];   // the radix pass's bin, keys above it, keys in it
  int redi[2][32];
  float scales[4];
  int cred[kColsPerCta];  // the cluster's column sums (used in its first CTA)
};

// The epilogue's per-thread inputs in the leader CTA (blockIdx.y == 0): its columns' map entries (constant,
// loaded before pdl::wait) and, for the residual epilogue, the residual values (loaded after it).
template <int NT>
struct EpilogueInputs {
  static constexpr int CPT = (kColsPerCta + NT - 1) / NT;  // epilogue columns per thread
  int info[CPT];
  float res[CPT];

  __device__ __forceinline__ void load_constants(const T1Args& a, Shared& sh) {
    const bool lead_cta = blockIdx.y == 0;
#pragma unroll
    for (int u = 0; u < CPT; ++u) {
      const int c = threadIdx.x + u * NT, col = blockIdx.x * kColsPerCta + c;
      info[u] = -1;
      res[u] = 0.f;
      if (lead_cta && c < kColsPerCta && col < a.RB * 4) info[u] = __ldg(a.ep.colinfo + col);
    }
    if (threadIdx.x < a.nseg && threadIdx.x < 4) sh.scales[threadIdx.x] = __ldg(a.ep.scales + threadIdx.x);
  }
  __device__ __forceinline__ void load_residual(const T1Args& a) {
#pragma unroll
    for (int u = 0; u < CPT; ++u)
      if (a.ep.epi == kEpiResidual && info[u] >= 0) res[u] = a.ep.residual[lin::epilogue_offset(a.ep, 0, info[u])];
  }
};

// Zero this CTA's cluster accumulator and release it to the cluster; the matching wait (in t1_finish) comes
// long after every CTA has arrived here.
template <int NT>
__device__ __forceinline__ void cluster_begin(const T1Args& a, Shared& sh) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.R > 1) {
    for (int c = threadIdx.x; c < kColsPerCta; c += NT) sh.cred[c] = 0;
    asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
  }
#endif
}

// Norm weights for this thread's channels (constant: may be loaded before pdl::wait).
template <int NT, int KPT>
__device__ __forceinline__ void load_norm_weights(const SelectArgs& s, float (&nw)[KPT]) {
  const int base = (threadIdx.x >> 5) * 32 * KPT + (threadIdx.x & 31);
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    nw[j] = (s.norm_w != nullptr && i < s.D) ? __ldg(s.norm_w + i) : 0.f;
  }
}

struct Selection {
  float gamma, scale;
  unsigned lo, tie;
  bool exact;  // no tie to resolve: exactly K keys are >= lo
};

__device__ __forceinline__ unsigned key_of(float v) { return __float_as_uint(fabsf(v)); }

constexpr int kRadixBins = 2048;  // the radix select's histogram: 8 KB of shared memory, free while it runs
constexpr int kRadixMinKeys = 8192;  // variants that hold at least this many channels select by radix

// One radix pass: the keys whose bits above `shift + width` equal `prefix` are histogrammed by their `width`
// bits at `shift` (hist holds zeros on entry and again on exit: each thread reads and clears its own bins),
// then the bin holding the rank-th largest of them (rank >= 1) is found by a block scan from the top bin down.
// Returns (bin, number of those keys in higher bins, number in the bin), the same in every thread. Barriers: 3.
template <int NT, int KPT>
__device__ __forceinline__ int3 radix_pass(const float (&v)[KPT], int D, unsigned prefix, int shift, int width,
                                           unsigned rank, int* hist, Shared& sh, bool skip_histogram) {
  constexpr int BPT = kRadixBins / NT;  // bins per thread, highest first
  static_assert(BPT >= 1 && kRadixBins % NT == 0, "the bins must split evenly over the threads");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int base = warp * 32 * KPT + lane;
  const unsigned mask = (1u << width) - 1u;
  if (!skip_histogram) {  // pass 1 histograms its keys together with the block max (select)
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      const unsigned k = key_of(v[j]);
      if (base + 32 * j < D && (k >> (shift + width)) == prefix) atomicAdd(hist + ((k >> shift) & mask), 1);
    }
    __syncthreads();
  }
  const int top = static_cast<int>(mask);  // bins above it (width < 11) stay empty
  const int bin0 = kRadixBins - 1 - threadIdx.x * BPT;  // this thread's bins: bin0, bin0 - 1, ...
  int local = 0;
#pragma unroll
  for (int b = 0; b < BPT; ++b)
    if (bin0 - b <= top) local += hist[bin0 - b];
  int inc = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) sh.scan[warp] = inc;
  __syncthreads();
  int above = inc - local;
  for (int w = 0; w < warp; ++w) above += sh.scan[w];
#pragma unroll
  for (int b = 0; b < BPT; ++b) {
    const int bin = bin0 - b;
    if (bin > top) continue;
    const int c = hist[bin];  // read again rather than held: registers are short in the 64-register variants
    hist[bin] = 0;            // this thread alone reads this bin: clear it for the next pass
    if (static_cast<unsigned>(above) < rank && static_cast<unsigned>(above + c) >= rank)
      sh.found[0] = bin, sh.found[1] = above, sh.found[2] = c;
    above += c;
  }
  __syncthreads();
  return make_int3(sh.found[0], sh.found[1], sh.found[2]);
}

// x (+ RMSNorm) into v[], gamma and the quantization scale, then the selection rule. Call after pdl::wait.
// on_step(vk, n) runs after every bisection step or radix pass that does not end the selection, block-uniformly,
// with a lower bound vk and n = count(key >= vk) (>= K): the final selection is a subset of {key >= vk}.
// xs: D floats of shared memory, used for the norm's sum of squares: it is formed in exactly the order of
// lin::load_row (256 strided partials, then lin::block_reduce_sum), so every kernel that fuses the norm
// (this one, variant 1, the select kernel in front of the GEMM) normalizes bit-identically, and a row's
// result does not depend on which of them served it (batched decode relies on that).
// hist: kRadixBins ints of shared memory that nothing else uses until select returns (callers pass the
// product's reduction buffer); it is left zeroed.
// kCoherentX: x is fp32 written by other SMs earlier in the same launch (the persistent decode step), so it
// is read through L2 (__ldcg), never from this SM's possibly stale L1.
template <int NT, int KPT, bool kPrefetchedNorm, bool kCoherentX = false, typename OnStep>
__device__ __forceinline__ Selection select(const SelectArgs& s, const float (&nw)[kPrefetchedNorm ? KPT : 1],
                                            float (&v)[KPT], Shared& sh, float* xs, int* hist, OnStep on_step) {
  static_assert(NT >= 256, "the canonical sum of squares uses 256 partial sums");
  const int D = s.D, K = s.K;
  const bool sparse = K < D;
  constexpr bool kRadix = NT * KPT >= kRadixMinKeys;
  const int base = (threadIdx.x >> 5) * 32 * KPT + (threadIdx.x & 31);
  if (kRadix && sparse)
    for (int b = threadIdx.x; b < kRadixBins; b += NT) hist[b] = 0;  // visible after the barriers below
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    if constexpr (kCoherentX) v[j] = i < D ? __ldcg(reinterpret_cast<const float*>(s.x) + i) : 0.f;
    else v[j] = i < D ? lin::load_x(s.x, s.x_bf16, i) : 0.f;
  }
  if (s.norm_w != nullptr) {
#pragma unroll
    for (int j = 0; j < KPT; ++j)
      if (base + 32 * j < D) xs[base + 32 * j] = v[j];
    __syncthreads();
    float ss = 0.f;
    if (threadIdx.x < 256)
      for (int i = threadIdx.x; i < D; i += 256) ss = __fmaf_rn(xs[i], xs[i], ss);
    const float total = lin::block_reduce_sum<NT>(ss, sh.redf);
    // Same op order as reference.RMSNorm: x * rsqrt(mean(x^2) + eps) * w (summation order differs).
    const float inv = rsqrtf(__fadd_rn(__fdiv_rn(total, static_cast<float>(D)), s.eps));
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      const int i = base + 32 * j;
      float w;
      if constexpr (kPrefetchedNorm) w = nw[j];
      else w = i < D ? __ldg(s.norm_w + i) : 0.f;
      v[j] = __fmul_rn(__fmul_rn(v[j], inv), w);
    }
    __syncthreads();  // redf is reused below
  } else if (kRadix && sparse) {
    __syncthreads();  // the histogram's zeros
  }
  // The block max and the radix select's first histogram share one barrier.
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < KPT; ++j) m = fmaxf(m, fabsf(v[j]));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) sh.redf[threadIdx.x >> 5] = m;
  if (kRadix && sparse) {
#pragma unroll
    for (int j = 0; j < KPT; ++j)
      if (base + 32 * j < D) atomicAdd(hist + (key_of(v[j]) >> 20), 1);
  }
  __syncthreads();
  float g = sh.redf[0];
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) g = fmaxf(g, sh.redf[w]);
  Selection r;
  r.gamma = fmaxf(g, lin::kAbsmaxEps);
  r.scale = __fmul_rn(__frcp_rn(r.gamma), 127.f);  // = torch's 127.0 / gamma (see linear_device.cuh)

  // Radix passes (the wide variants) over key bits [30:20], [19:9], [8:0]. vk: the lower edge of the bin that
  // holds the K-th key; rank: its rank among the keys of that bin's prefix; exact: that bin is taken whole.
  unsigned vk = 0u;
  bool exact = false;
  if (kRadix && sparse) {
    unsigned rank = static_cast<unsigned>(K), prefix = 0u;
#pragma unroll 1
    for (int p = 0; p < 3; ++p) {
      const int shift = p == 0 ? 20 : p == 1 ? 9 : 0, width = p == 2 ? 9 : 11;
      const int3 f = radix_pass<NT, KPT>(v, D, prefix, shift, width, rank, hist, sh, p == 0);
      prefix = (prefix << width) | static_cast<unsigned>(f.x);
      vk = prefix << shift;
      const unsigned n_at_or_above = static_cast<unsigned>(f.y + f.z);
      if (n_at_or_above == rank) { exact = true; break; }  // block-uniform: every thread holds the same f
      rank -= static_cast<unsigned>(f.y);
      if (p < 2) on_step(vk, static_cast<unsigned>(K) - rank + static_cast<unsigned>(f.z));
    }
    // Not exact after the last pass: vk is the K-th key itself, shared by more keys than the rank needs.
  }
  // Bisection (the narrow variants). Invariant: count(key >= vk) >= K. Padding is 0 and never counted
  // (candidates are >= 1).
  auto key = [&](int j) { return __float_as_uint(fabsf(v[j])); };
  if (!kRadix && sparse) {
    const int hb = 31 - __clz(__float_as_uint(r.gamma) | 1u);  // no key has a bit above gamma's top bit
    const unsigned uK = static_cast<unsigned>(K);
    int parity = 0;
    for (int b = hb & ~1; b >= 0; b -= 2, parity ^= 1) {
      const unsigned c1 = vk | (1u << b), c2 = vk | (2u << b), c3 = vk | (3u << b);
      // key >= c  <=>  key > c - 1  <=>  bit 31 of (c - 1 - key): keys and c - 1 are < 2^31 (c is clamped:
      // at b = 30, c3 = 3 << 30 exceeds every key, and c = 2^31 gives c - 1 = 0x7fffffff, never exceeded).
      // One subtract and one shift-add per count (the compare + select form took ~12 instructions per key,
      // and the bisection is issue-bound: 8-16 warps x KPT keys x 3 counts per step).
      const unsigned m1 = min(c1, 0x80000000u) - 1u, m2 = min(c2, 0x80000000u) - 1u;
      const unsigned m3 = min(c3, 0x80000000u) - 1u;
      unsigned pa = 0u, pb = 0u;
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        pa += ((m1 - key(j)) >> 31) + (((m2 - key(j)) >> 31) << 16);
        pb += (m3 - key(j)) >> 31;
      }
      const uint2 t = block_sum2<NT>(pa, pb, sh.cnt, parity);  // 16-bit fields: D <= 65535
      const unsigned n1 = t.x & 0xffffu, n2 = t.x >> 16, n3 = t.y;
      unsigned n = 0u;  // count(key >= new vk), when vk moved
      if (n3 >= uK) { vk = c3; n = n3; }
      else if (n2 >= uK) { vk = c2; n = n2; }
      else if (n1 >= uK) { vk = c1; n = n1; }
      if (n == uK) { exact = true; break; }  // block-uniform: every thread holds the same sums
      if (n != 0u) on_step(vk, n);
    }
  }
  // With K == D every channel is in: vk = 0, so every key >= 0 is a "tie" and all of them are taken.
  r.exact = exact;
  r.lo = exact ? vk : vk + 1u;  // vk <= 0x7fffffff: no overflow
  r.tie = exact ? kNoTie : vk;
  return r;
}

// Per-warp counts (selected for sure, ties) -> this warp's tie offset and the tie quota. Not needed (and
// skipped) when the selection is exact: then nothing is a tie.
template <int NT, int KPT>
__device__ __forceinline__ void tie_quota(const float (&v)[KPT], const Selection& sel, int D, int K, Shared& sh,
                                          int* gt_before, int* eq_before, int* need) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int base = warp * 32 * KPT + lane;
  int gt = 0, eq = 0;
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const bool valid = base + 32 * j < D;
    gt += __popc(__ballot_sync(0xffffffffu, valid && key_of(v[j]) >= sel.lo));
    eq += __popc(__ballot_sync(0xffffffffu, valid && key_of(v[j]) == sel.tie));
  }
  if (lane == 0) { sh.redi[0][warp] = gt; sh.redi[1][warp] = eq; }
  __syncthreads();
  int gb = 0, eb = 0, gt_total = 0;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    gt_total += sh.redi[0][w];
    if (w < warp) { gb += sh.redi[0][w]; eb += sh.redi[1][w]; }
  }
  *gt_before = gb;
  *eq_before = eb;
  *need = K - gt_total;  // ties to take, lowest indices first
}

// The selected channels into (sidx, sq) in shared memory, in index order (ties to the lower index), then
// padded with (0, 0) up to a multiple of 4 rows. Ends with a barrier: the list is complete for every thread.
template <int NT, int KPT>
__device__ __forceinline__ void compact(const float (&v)[KPT], const Selection& sel, int D, int K, Shared& sh,
                                        uint16_t* sidx, int8_t* sq) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lt = (1u << lane) - 1u;
  const int base = warp * 32 * KPT + lane;
  const int Kpad = (K + 3) & ~3;
  if (K >= D) {  // every channel: its position is its index (no ballots, no barrier before the stores)
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      const int i = base + 32 * j;
      if (i < D) {
        sidx[i] = static_cast<uint16_t>(i);
        sq[i] = lin::quantize_one(v[j], sel.scale);
      }
    }
    for (int i = D + threadIdx.x; i < Kpad; i += NT) {
      sidx[i] = 0;
      sq[i] = 0;
    }
    __syncthreads();
    return;
  }
  int pos = 0, eq_before = 0, need = 0;
  if (!sel.exact) {
    int gt_before = 0;
    tie_quota<NT, KPT>(v, sel, D, K, sh, &gt_before, &eq_before, &need);
    pos = gt_before + min(eq_before, need);
  } else {
    // exact: per-warp counts of key >= lo give the offsets; no ties
    int gt = 0;
#pragma unroll
    for (int j = 0; j < KPT; ++j)
      gt += __popc(__ballot_sync(0xffffffffu, base + 32 * j < D && key_of(v[j]) >= sel.lo));
    if (lane == 0) sh.redi[0][warp] = gt;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < NW; ++w)
      if (w < warp) pos += sh.redi[0][w];
  }
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    const bool valid = i < D;
    const unsigned kj = key_of(v[j]);
    const bool g = valid && kj >= sel.lo, eqv = valid && kj == sel.tie;
    const unsigned eb = __ballot_sync(0xffffffffu, eqv);
    const bool take = g || (eqv && eq_before + __popc(eb & lt) < need);
    const unsigned sb = __ballot_sync(0xffffffffu, take);
    if (take) {
      const int p = pos + __popc(sb & lt);
      sidx[p] = static_cast<uint16_t>(i);
      sq[p] = lin::quantize_one(v[j], sel.scale);
    }
    pos += __popc(sb);
    eq_before += __popc(eb);
  }
  for (int i = K + threadIdx.x; i < Kpad; i += NT) {
    sidx[i] = 0;
    sq[i] = 0;
  }
  __syncthreads();
}

// This lane's 16 columns of packed bytes [byte0, byte0 + 4) over the groups of 4 selected rows [g0, g1) that
// warp `warp` of NW takes (g0 + warp, + NW, ...), kUnroll groups in flight per thread: acc and sumq for
// finish / column_sums. col_ok false (the lane is past the row's bytes): the rows are not read.
template <int NW, int kUnroll>
__device__ __forceinline__ void gather_product(const uint8_t* packed, size_t RB, int byte0, bool col_ok,
                                               const uint16_t* sidx, const int8_t* sq, int g0, int g1,
                                               int (&acc)[16], int& sumq) {
  const int warp = threadIdx.x >> 5;
  const uint8_t* wb = packed + (col_ok ? byte0 : 0);
  const ushort4* sidx4 = reinterpret_cast<const ushort4*>(sidx);
  const int* sq4 = reinterpret_cast<const int*>(sq);
#pragma unroll
  for (int c = 0; c < 16; ++c) acc[c] = 0;
  sumq = 0;
  for (int g = g0 + warp; g < g1; g += kUnroll * NW) {
    unsigned w[kUnroll][4];
    int q4[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int gg = g + u * NW;
      q4[u] = 0;
#pragma unroll
      for (int r = 0; r < 4; ++r) w[u][r] = 0u;
      if (gg < g1) {
        const ushort4 id = sidx4[gg];
        q4[u] = sq4[gg];
        if (col_ok) {
          w[u][0] = lin::ld_stream_u32(wb + id.x * RB);
          w[u][1] = lin::ld_stream_u32(wb + id.y * RB);
          w[u][2] = lin::ld_stream_u32(wb + id.z * RB);
          w[u][3] = lin::ld_stream_u32(wb + id.w * RB);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      sumq = __dp4a(q4[u], 0x01010101, sumq);
      accumulate4(acc, w[u][0], w[u][1], w[u][2], w[u][3], q4[u]);
    }
  }
}

// This lane's exact column sums (sum(t * q): acc shifted back, minus sum(q)) into its warp's row of `red`
// ([NW][512] ints of shared memory); the caller then sums the rows over the warps.
__device__ __forceinline__ void store_column_sums(const int (&acc)[16], int sumq, int* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int4* mine = reinterpret_cast<int4*>(red + warp * kColsPerCta + lane * 16);
#pragma unroll
  for (int c4 = 0; c4 < 4; ++c4) {
    int o[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int idx = 4 * c4 + c;
      o[c] = (acc[idx] >> (2 * (idx & 3))) - sumq;  // exact: acc is a multiple of 4^(idx & 3)
    }
    mine[c4] = make_int4(o[0], o[1], o[2], o[3]);
  }
}

// Reduce the per-thread column accumulators (acc: this lane's 16 columns) over the CTA's warps and the
// cluster's CTAs, then the leader CTA runs the shared epilogue. `red` is NW x 512 ints of shared memory.
// Each non-leader CTA pushes its column sums into the leader's accumulator with distributed-shared-memory
// atomics (fire-and-forget, order-free in int32: exact), then one cluster barrier. No second barrier: nobody
// reads another CTA's shared memory after it, and the leader (whose memory the others wrote) runs last.
template <int NT>
__device__ __forceinline__ void finish(const T1Args& a, const int (&acc)[16], int sumq, int* red, Shared& sh,
                                       const EpilogueInputs<NT>& e, float gamma) {
  constexpr int NW = NT / 32;
  const int tid = threadIdx.x;
  store_column_sums(acc, sumq, red);
  __syncthreads();
  int* sums = red;  // where the leader reads the complete column sums
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  const bool clustered = a.R > 1;
  if (clustered) {
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every CTA's cred is zeroed (cluster_begin)
    int* dst = cluster.map_shared_rank(sh.cred, 0);
    for (int c = tid; c < kColsPerCta; c += NT) {
      int s = 0;
#pragma unroll
      for (int w = 0; w < NW; ++w) s += red[w * kColsPerCta + c];
      atomicAdd(dst + c, s);  // result unused: compiled to a fire-and-forget reduction
    }
    cluster.sync();  // all adds done and visible to the leader
    sums = sh.cred;
  }
  const bool leader = !clustered || cluster.block_rank() == 0;
#else
  const bool clustered = false;
  const bool leader = true;  // launched with R == 1 below sm_90
#endif
  if (!clustered) {
    for (int c = tid; c < kColsPerCta; c += NT) {
      int s = 0;
#pragma unroll
      for (int w = 0; w < NW; ++w) s += red[w * kColsPerCta + c];
      red[c] = s;  // column c is summed by this thread only: in place is safe
    }
  }
  if (!leader) return;
  __syncthreads();
#pragma unroll
  for (int u = 0; u < EpilogueInputs<NT>::CPT; ++u) {
    const int c = tid + u * NT, col = blockIdx.x * kColsPerCta + c;
    if (c >= kColsPerCta || col >= a.RB * 4) continue;
    const int acc_c = sums[c];
    const int acc16 = c + 16 < kColsPerCta ? sums[c + 16] : 0;
    if (a.ep.raw) a.ep.raw[col] = acc_c;
    if (e.info[u] >= 0)
      lin::epilogue_apply(a.ep, lin::epilogue_offset(a.ep, 0, e.info[u]), col, e.info[u], acc_c, acc16, gamma,
                          sh.scales, e.res[u]);
  }
}

// Launch a one-token kernel with its cluster shape (sm_90) and programmatic dependent launch.
template <typename Kernel>
void launch(Kernel kernel, const T1Args& a, int nt, size_t smem, int cc_major, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((a.RB * 4 + kColsPerCta - 1) / kColsPerCta, a.R, 1);
  cfg.blockDim = dim3(nt, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  cfg.numAttrs = pdl::add_attr(attr, add_cluster_y_attr(attr, 0, a.R, cc_major));
  cfg.attrs = attr;
  QS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
}

}  // namespace t1
}  // namespace qsparse
