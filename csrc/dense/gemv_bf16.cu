// One-token top-K gather-GEMV over bf16 weights (the full-precision family, format v2).
//
// Layout: W is [D, ld] bf16, row k = input channel k (docs/ARCHITECTURE.md "Engine file"), so the K channels a
// token keeps are K rows, and every byte of the matrix that is read is read once.
//
// Per CTA (NT threads, a 512-column block of one segment, a 1/splits share of the selected rows):
//  1. Selection fused into every CTA, as in the ternary one-token kernel and with its code (linear/t1_device.cuh):
//     x (+ RMSNorm, the canonical order of lin::load_row) into registers, the exact top-K of |x'| on the
//     fp32 bits (bisection, or a radix select in the wide variants; ties: the lower index), a ballot
//     compaction of the kept (channel, value) pairs into shared memory in ascending channel order. Every CTA
//     computes the same list from the same x.
//  2. With the L2 re-scale: f = sqrt(sum x'^2) / sqrt(sum kept x'^2), each sum formed per thread over its
//     KPT values in order, then lin::block_reduce_sum (warp xor butterfly, then across warps).
//  3. Product. Warps form 2 column groups of 256 columns (a lane owns 8 consecutive columns: one 16-byte load
//     per row) x RW = NW/2 row-warps. The CTA's positions [y*per, (y+1)*per) of the ascending list are split
//     into RW contiguous runs; each thread accumulates its run in ascending order, acc = fmaf(x_k, w[k][n],
//     acc) in fp32, bf16 widened exactly.
//  4. Reduction, in a fixed order (so results are deterministic): the RW row-warp sums left to right (rw =
//     0, 1, ...), times f with the re-scale, into the workspace; the last CTA to arrive at a column block
//     (a counter per block) sums the splits left to right (y = 0, 1, ...), applies the epilogue (+ bias |
//     + residual | silu(gate) * up) and resets the counter. No atomics on data: graph-capturable, and the
//     same inputs give the same bits on every run.
// Programmatic dependent launch: waits before reading x, norm-independent constants only before; triggers
// the next kernel after the selection (as the ternary one-token kernel: see pdl.cuh).
#include "dense/api.cuh"
#include "linear/t1_device.cuh"

#include <algorithm>
#include <stdexcept>

namespace qsparse {
namespace {

constexpr int kColsPerWarp = 256;  // 32 lanes x 8 bf16
constexpr int kColGroups = 2;
constexpr int kColsPerBlock = kColsPerWarp * kColGroups;
constexpr int kSplitChunk = 16;  // split partials per column loaded together by the last CTA

struct SmemLayout {
  size_t red, vals, idx, xs, total;
};

// [RW][512] float partials | [Kmax] float values | [Kmax] uint16 channels | (16-aligned) [D] float (norm only)
__host__ __device__ inline SmemLayout smem_layout(int nt, int D, int Kmax, bool norm) {
  SmemLayout s;
  const size_t rw = static_cast<size_t>(nt / 32 / kColGroups);
  s.red = 0;
  s.vals = rw * kColsPerBlock * 4;
  s.idx = s.vals + static_cast<size_t>(Kmax) * 4;
  s.xs = (s.idx + static_cast<size_t>(Kmax) * 2 + 15) & ~static_cast<size_t>(15);
  s.total = s.xs + (norm ? static_cast<size_t>(D) * 4 : 0);
  return s;
}

__device__ __forceinline__ uint4 ld_stream_v4(const uint16_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float bf16_at(unsigned word, int half) {  // bf16 -> fp32 is exact
  return half ? __uint_as_float(word & 0xffff0000u) : __uint_as_float(word << 16);
}

template <int NT, int KPT>
__global__ void __launch_bounds__(NT) dense_gemv_kernel(DenseGemvArgs a, int vec) {
  constexpr int NW = NT / 32;
  constexpr int RW = NW / kColGroups;
  constexpr int U = NT <= 512 ? 8 : 4;  // rows in flight per thread (64 KB per SM at 2 x 256 or 1 x 512)
  constexpr bool kPrefetchNorm = NT <= 256 || KPT <= 16;  // registers: 128 a thread at 512, 64 at 1024
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ t1::Shared sh;
  __shared__ int last_flag;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int seg = blockIdx.z, D = a.sel.D, K = a.K[seg];
  const int Kmax = a.nseg > 1 ? max(a.K[0], a.K[1]) : a.K[0];
  const SmemLayout L = smem_layout(NT, D, Kmax, a.sel.norm_w != nullptr);
  float* red = reinterpret_cast<float*>(smem + L.red);
  float* svals = reinterpret_cast<float*>(smem + L.vals);
  uint16_t* sidx = reinterpret_cast<uint16_t*>(smem + L.idx);
  float* xs = reinterpret_cast<float*>(smem + L.xs);

  float nw[kPrefetchNorm ? KPT : 1], v[KPT];
  if constexpr (kPrefetchNorm) t1::load_norm_weights<NT, KPT>(a.sel, nw);
  pdl::wait();

  // ---- 1. selection (t1::select reads a.sel.K: this segment's K)
  SelectArgs s = a.sel;
  s.K = K;
  const t1::Selection sel = t1::select<NT, KPT, kPrefetchNorm>(s, nw, v, sh, xs, reinterpret_cast<int*>(red),
                                                             [](unsigned, unsigned) {});
  const unsigned lt = (1u << lane) - 1u;
  const int base = warp * 32 * KPT + lane;
  int pos = 0, eq_before = 0, need = 0;
  if (!sel.exact) {
    int gt_before = 0;
    t1::tie_quota<NT, KPT>(v, sel, D, K, sh, &gt_before, &eq_before, &need);
    pos = gt_before + min(eq_before, need);
  } else {
    int gt = 0;
#pragma unroll
    for (int j = 0; j < KPT; ++j)
      gt += __popc(__ballot_sync(0xffffffffu, base + 32 * j < D && t1::key_of(v[j]) >= sel.lo));
    if (lane == 0) sh.redi[0][warp] = gt;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < NW; ++w)
      if (w < warp) pos += sh.redi[0][w];
  }
  float full_ss = 0.f, kept_ss = 0.f;
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    const bool valid = i < D;
    const unsigned kj = t1::key_of(v[j]);
    const bool g = valid && kj >= sel.lo, eqv = valid && kj == sel.tie;
    const unsigned eb = __ballot_sync(0xffffffffu, eqv);
    const bool take = g || (eqv && eq_before + __popc(eb & lt) < need);
    const unsigned sb = __ballot_sync(0xffffffffu, take);
    if (valid) full_ss = __fmaf_rn(v[j], v[j], full_ss);
    if (take) {
      const int p = pos + __popc(sb & lt);
      sidx[p] = static_cast<uint16_t>(i);
      svals[p] = v[j];
      kept_ss = __fmaf_rn(v[j], v[j], kept_ss);
    }
    pos += __popc(sb);
    eq_before += __popc(eb);
  }
  float f = 1.f;
  if (a.rescale) {  // block-uniform branch: every thread takes part in both reductions
    const float full = lin::block_reduce_sum<NT>(full_ss, sh.redf);
    const float kept = lin::block_reduce_sum<NT>(kept_ss, sh.redf);
    f = kept > 0.f ? __fdiv_rn(__fsqrt_rn(full), __fsqrt_rn(kept)) : 1.f;
  }
  __syncthreads();
  pdl::launch_dependents();

  // ---- 3. this CTA's share of the list: row-warp rw of column group cg
  const int cg = warp / RW, rw = warp % RW;
  const int per = (K + a.splits - 1) / a.splits;
  const int p0 = min(K, static_cast<int>(blockIdx.y) * per), p1 = min(K, p0 + per);
  const int sub = (p1 - p0 + RW - 1) / RW;
  const int q0 = min(p1, p0 + rw * sub), q1 = min(p1, q0 + sub);
  const int c0 = blockIdx.x * kColsPerBlock + cg * kColsPerWarp + lane * 8;  // first of this lane's 8 columns
  const size_t ld = static_cast<size_t>(a.ld);
  const uint16_t* wcol = a.w + (seg ? a.col1 : 0) + c0;
  float acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = 0.f;
  if (c0 < a.N) {
    if (vec) {  // N % 8 == 0, ld % 8 == 0, col1 % 8 == 0 and W 16-byte aligned: all 8 columns valid
      for (int p = q0; p < q1; p += U) {
        uint4 wv[U];
        float xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (p + u < q1) {
            xv[u] = svals[p + u];
            wv[u] = ld_stream_v4(wcol + sidx[p + u] * ld);
          } else {
            xv[u] = 0.f;
            wv[u] = make_uint4(0u, 0u, 0u, 0u);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (p + u < q1) {
            const unsigned w4[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = __fmaf_rn(xv[u], bf16_at(w4[j >> 1], j & 1), acc[j]);
          }
        }
      }
    } else {  // any shape: one bf16 per load, columns past N skipped
      for (int p = q0; p < q1; ++p) {
        const float xv = svals[p];
        const uint16_t* row = wcol + sidx[p] * ld;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (c0 + j < a.N) acc[j] = __fmaf_rn(xv, __uint_as_float(static_cast<unsigned>(__ldg(row + j)) << 16), acc[j]);
      }
    }
  }

  // ---- 4. row-warps, then splits, in fixed order
#pragma unroll
  for (int j = 0; j < 8; ++j) red[rw * kColsPerBlock + cg * kColsPerWarp + lane * 8 + j] = acc[j];
  __syncthreads();
  const size_t ncols = static_cast<size_t>(gridDim.x) * kColsPerBlock;
  float* ws_mine = a.ws + (static_cast<size_t>(seg) * a.splits + blockIdx.y) * ncols + blockIdx.x * kColsPerBlock;
  for (int c = tid; c < kColsPerBlock; c += NT) {
    float t = red[c];
#pragma unroll
    for (int w = 1; w < RW; ++w) t = __fadd_rn(t, red[w * kColsPerBlock + c]);
    ws_mine[c] = a.rescale ? __fmul_rn(t, f) : t;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const unsigned prev = atomicAdd(a.counters + blockIdx.x, 1u);
    last_flag = prev == static_cast<unsigned>(a.nseg * a.splits - 1);
  }
  __syncthreads();
  if (!last_flag) return;
  __threadfence();
  // The splits of each column in the fixed order y = 0, 1, ..., but with a chunk of kSplitChunk loads per
  // column (and per segment) in flight: a loop of dependent L2 loads cost one round trip per split (~0.6 us
  // x up to 64 splits), more than the rows themselves at 8B shapes (bench/NOTES-dense.md).
  constexpr int CPT = (kColsPerBlock + NT - 1) / NT;
  const int nseg_sum = a.epi == kDenseEpiSiluGlu ? 2 : 1;
  float sum[2][CPT] = {};
  for (int y0 = 0; y0 < a.splits; y0 += kSplitChunk) {
    float t[2][CPT][kSplitChunk];
#pragma unroll
    for (int g = 0; g < 2; ++g)
#pragma unroll
      for (int u = 0; u < CPT; ++u) {
        const int n = blockIdx.x * kColsPerBlock + tid + u * NT;
        const bool ok = g < nseg_sum && tid + u * NT < kColsPerBlock && n < a.N;
        const float* col = a.ws + static_cast<size_t>(g) * a.splits * ncols + n;
#pragma unroll
        for (int q = 0; q < kSplitChunk; ++q)
          t[g][u][q] = ok && y0 + q < a.splits ? __ldcg(col + static_cast<size_t>(y0 + q) * ncols) : 0.f;
      }
#pragma unroll
    for (int g = 0; g < 2; ++g)
#pragma unroll
      for (int u = 0; u < CPT; ++u)
#pragma unroll
        for (int q = 0; q < kSplitChunk; ++q)
          if (y0 + q < a.splits) sum[g][u] = y0 + q == 0 ? t[g][u][q] : __fadd_rn(sum[g][u], t[g][u][q]);
  }
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = tid + u * NT, n = blockIdx.x * kColsPerBlock + c;
    if (c >= kColsPerBlock || n >= a.N) continue;
    const float s0 = sum[0][u];
    if (a.epi == kDenseEpiSiluGlu) {
      a.out[n] = __fmul_rn(__fdiv_rn(s0, __fadd_rn(1.f, expf(-s0))), sum[1][u]);
    } else if (a.epi == kDenseEpiResidual) {
      a.out[n] = __fadd_rn(a.residual[n], s0);
    } else {
      a.out[n] = a.bias != nullptr ? __fadd_rn(s0, a.bias[n]) : s0;
    }
  }
  if (tid == 0) a.counters[blockIdx.x] = 0u;
}

template <int NT, int KPT>
void launch(const DenseGemvArgs& a, cudaStream_t stream) {
  const int Kmax = a.nseg > 1 ? std::max(a.K[0], a.K[1]) : a.K[0];
  const SmemLayout L = smem_layout(NT, a.sel.D, Kmax, a.sel.norm_w != nullptr);
  auto kernel = dense_gemv_kernel<NT, KPT>;
  static bool configured[64] = {};
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  static int limit[64] = {};
  if (!configured[dev & 63]) {
    int optin = 0;
    QS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    limit[dev & 63] = optin - static_cast<int>(sizeof(t1::Shared)) - 64;  // the kernel's static shared memory
    QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit[dev & 63]));
    configured[dev & 63] = true;
  }
  if (L.total > static_cast<size_t>(limit[dev & 63]))
    throw std::invalid_argument("dense_gemv: the selection list does not fit in shared memory at this D and K");
  const int vec = (a.N % 8 == 0 && a.ld % 8 == 0 && a.col1 % 8 == 0 &&
                   (reinterpret_cast<uintptr_t>(a.w) & 15) == 0) ? 1 : 0;
  const dim3 grid((a.N + kColsPerBlock - 1) / kColsPerBlock, a.splits, a.nseg);
  QS_CUDA_CHECK(pdl::launch(kernel, grid, dim3(NT), L.total, stream, a, vec));
  QS_LAUNCH_CHECK("dense_gemv_kernel");
}

// 512 threads to D = 16384 (8B's down: 28 of 32 values a thread used, no spills at 128 registers), 1024 above.
int threads_for(int D) { return D <= 8192 ? 256 : D <= 16384 ? 512 : 1024; }

}  // namespace

int dense_gemv_max_d() { return 1024 * 32; }

size_t dense_gemv_smem_bytes(int D, int Kmax, bool norm) {
  if (D < 1 || D > dense_gemv_max_d() || Kmax < 1 || Kmax > D) return 0;
  return smem_layout(threads_for(D), D, Kmax, norm).total;
}

void launch_dense_gemv(const DenseGemvArgs& a, cudaStream_t stream) {
  const int D = a.sel.D;
  if (a.sel.T != 1) throw std::invalid_argument("dense_gemv: exactly one token");
  if (D < 1 || D > dense_gemv_max_d()) throw std::invalid_argument("dense_gemv: D out of range");
  if (a.nseg != 1 && a.nseg != 2) throw std::invalid_argument("dense_gemv: 1 or 2 segments");
  if ((a.nseg == 2) != (a.epi == kDenseEpiSiluGlu)) throw std::invalid_argument("dense_gemv: 2 segments iff glu");
  for (int s = 0; s < a.nseg; ++s)
    if (a.K[s] < 1 || a.K[s] > D) throw std::invalid_argument("dense_gemv: need 1 <= K <= D");
  if (a.N < 1 || a.splits < 1 || a.ld < a.N || (a.nseg == 2 && a.col1 + a.N > a.ld))
    throw std::invalid_argument("dense_gemv: bad shape");
  if (D <= 2048) launch<256, 8>(a, stream);
  else if (D <= 4096) launch<256, 16>(a, stream);
  else if (D <= 8192) launch<256, 32>(a, stream);
  else if (D <= 16384) launch<512, 32>(a, stream);
  else if (D <= 28672) launch<1024, 28>(a, stream);  // 70B's down: fewer dead values, fewer spills
  else launch<1024, 32>(a, stream);
}

}  // namespace qsparse
