// Gather-GEMV over packed ternary rows for T <= 8 tokens (decode).
//
// Grid (column tiles, K-splits, tokens), 256 threads. A CTA owns C 16-byte chunks (64 packed columns
// each) of every row and a contiguous share of the token's selected rows. Lane l works on chunk
// l % C of groups of 4 selected rows: it loads 16 B from each of the 4 rows, byte-transposes them
// with __byte_perm so one 32-bit word holds the same byte of the 4 rows, and for column j of the
// byte masks (word & 0x03030303 << 2j) = code * 4^j per row; dp4a.u32.s32 with the 4 packed int8 q
// accumulates code * q * 4^j. At the end acc >> 2j minus sum(q) gives sum(t * q) (codes are t + 1).
// Partial sums reduce across lanes (shuffles), warps (shared memory), and splits (int32 atomics into
// a self-resetting workspace; the last CTA of a tile, found with an arrival counter, runs the
// epilogue and zeroes what it used, so no memset launch is ever needed: graph-friendly).
//
// fused=1: each CTA quantizes and selects the token itself (redundantly), saving a launch.
#include "common/common.cuh"
#include "linear/device.cuh"

namespace qsparse {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStageGroups = 1024;  // unfused: selected groups staged in shared memory per batch

// Not volatile: the compiler may hoist these loads above independent arithmetic (more bytes in flight).
__device__ __forceinline__ uint4 ld_stream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// acc[16*i + 4*b + j] += code(row r, column 16i+4b+j) * q_r over the 4 rows r.
__device__ __forceinline__ void accumulate4(int (&acc)[64], const uint4& r0, const uint4& r1, const uint4& r2,
                                            const uint4& r3, int q4) {
  const unsigned* w0 = &r0.x;
  const unsigned* w1 = &r1.x;
  const unsigned* w2 = &r2.x;
  const unsigned* w3 = &r3.x;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned tr[4];
    lin::transpose_rows4(w0[i], w1[i], w2[i], w3[i], tr);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = 16 * i + 4 * b + j;
        acc[c] = lin::dp4a_us(tr[b] & (0x03030303u << (2 * j)), q4, acc[c]);
      }
    }
  }
}

__host__ __device__ inline size_t align16(size_t n) { return (n + 15) & ~size_t(15); }
__host__ __device__ inline size_t red_bytes(int C) { return static_cast<size_t>(kWarps) * C * 64 * sizeof(int); }

template <bool FUSED>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ lin::SelectScratch s;
  __shared__ int is_last;
  const int tile = blockIdx.x, split = blockIdx.y, t = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = a.chunks_per_tile;
  const int log2C = __ffs(C) - 1;
  const int K = a.sel.K, Kpad = (K + 3) & ~3;
  int* red = reinterpret_cast<int*>(smem);
  unsigned char* stage = smem + red_bytes(C);  // unfused only: [kStageGroups] int4 idx, then int q4

  const int32_t* idx;
  const int8_t* q;
  float gamma;
  if constexpr (FUSED) {
    float* xs = reinterpret_cast<float*>(smem + red_bytes(C));
    int32_t* sidx = reinterpret_cast<int32_t*>(smem + red_bytes(C) + align16(a.sel.D * sizeof(float)));
    int8_t* sq = reinterpret_cast<int8_t*>(sidx + Kpad);
    lin::load_row<kThreads>(a.sel, t, xs, s);
    float scale;
    gamma = lin::block_select<kThreads>(xs, a.sel.D, K, s, &scale);
    lin::block_compact<kThreads>(xs, a.sel.D, K, scale, s, sidx, sq, Kpad, nullptr, 0, s.redi);
    __syncthreads();
    idx = sidx;
    q = sq;
  } else {
    idx = a.sel.idx + static_cast<size_t>(t) * a.sel.ld;
    q = a.sel.q + static_cast<size_t>(t) * a.sel.ld;
    gamma = a.sel.gamma[t];
  }

  // This split's share of the selected list, in whole groups of 4.
  const int groups = Kpad >> 2;
  const int per = (groups + a.splits - 1) / a.splits;
  const int g0 = split * per, g1 = min(groups, g0 + per);
  const int cl = lane & (C - 1), rl = lane >> log2C;
  const int slot = warp * (32 >> log2C) + rl, nslots = kWarps * (32 >> log2C);
  const int nchunks = a.RB >> 4;
  const int chunk = tile * C + cl;
  const bool valid = chunk < nchunks;

  int acc[64];
#pragma unroll
  for (int c = 0; c < 64; ++c) acc[c] = 0;
  int sumq = 0;
  const uint8_t* wb = a.packed + static_cast<size_t>(valid ? chunk : 0) * 16;
  const size_t RB = static_cast<size_t>(a.RB);
  // The selected list is read from shared memory: the fused CTA built it there; otherwise this
  // split's share is staged in batches (coalesced, all loads in flight at once).
  const int4* sid4 = FUSED ? reinterpret_cast<const int4*>(idx) : reinterpret_cast<const int4*>(stage);
  const int* sq4 = FUSED ? reinterpret_cast<const int*>(q) : reinterpret_cast<const int*>(stage + 16 * kStageGroups);
  for (int b0 = g0; b0 < g1; b0 += FUSED ? (g1 - g0) : kStageGroups) {
    const int b1 = FUSED ? g1 : min(g1, b0 + kStageGroups);
    const int base = FUSED ? 0 : b0;
    if constexpr (!FUSED) {
      const int4* gi = reinterpret_cast<const int4*>(idx) + b0;
      const int* gq = reinterpret_cast<const int*>(q) + b0;
      int4* si = reinterpret_cast<int4*>(stage);
      int* sqw = reinterpret_cast<int*>(stage + 16 * kStageGroups);
      for (int i = tid; i < b1 - b0; i += kThreads) {
        si[i] = __ldg(gi + i);
        sqw[i] = __ldg(gq + i);
      }
      __syncthreads();
    }
    if (valid) {
      // Two groups (8 rows, 8 x 16 B loads) in flight per thread per step.
      for (int g = b0 + slot; g < b1; g += 2 * nslots) {
        const bool two = g + nslots < b1;
        const int4 ia = sid4[g - base];
        const int qa = sq4[g - base];
        const int4 ib = two ? sid4[g + nslots - base] : ia;
        const int qb = two ? sq4[g + nslots - base] : 0;
        const uint4 a0 = ld_stream(wb + ia.x * RB), a1 = ld_stream(wb + ia.y * RB);
        const uint4 a2 = ld_stream(wb + ia.z * RB), a3 = ld_stream(wb + ia.w * RB);
        uint4 c0 = make_uint4(0, 0, 0, 0), c1 = c0, c2 = c0, c3 = c0;
        if (two) {
          c0 = ld_stream(wb + ib.x * RB);
          c1 = ld_stream(wb + ib.y * RB);
          c2 = ld_stream(wb + ib.z * RB);
          c3 = ld_stream(wb + ib.w * RB);
        }
        sumq = __dp4a(qa, 0x01010101, sumq);
        sumq = __dp4a(qb, 0x01010101, sumq);
        accumulate4(acc, a0, a1, a2, a3, qa);
        accumulate4(acc, c0, c1, c2, c3, qb);  // qb = 0 when absent: adds nothing
      }
    }
    if constexpr (!FUSED) __syncthreads();  // the stage is overwritten by the next batch
  }
#pragma unroll
  for (int c = 0; c < 64; ++c) {
    int v = (acc[c] >> (2 * (c & 3))) - sumq;  // exact: acc[c] is a multiple of 4^(c&3)
    for (int o = C; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[c] = v;
  }
  // Tile column tc = cl*64 + c lives at red[c*C + cl]: conflict-free stores.
  if (rl == 0) {
#pragma unroll
    for (int c = 0; c < 64; ++c) red[warp * C * 64 + c * C + cl] = acc[c];
  }
  __syncthreads();
  const int tile_n = C * 64;
  const int npad = a.RB * 4;
  const int col0 = tile * tile_n;
  for (int i = tid; i < tile_n; i += kThreads) {
    int v = red[i];
    for (int w = 1; w < kWarps; ++w) v += red[w * tile_n + i];
    red[i] = v;
  }
  if (a.splits > 1) {
    int32_t* ws = a.ws + static_cast<size_t>(t) * npad;
    __syncthreads();
    for (int i = tid; i < tile_n; i += kThreads) {
      const int tc = (i % C) * 64 + i / C;
      const int v = red[i];
      if (col0 + tc < npad && v != 0) atomicAdd(ws + col0 + tc, v);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      const int ntiles = (nchunks + C - 1) / C;
      unsigned* ctr = a.counters + static_cast<size_t>(t) * ntiles + tile;
      const unsigned prev = atomicAdd(ctr, 1u);
      is_last = prev == static_cast<unsigned>(a.splits - 1);
      if (is_last) *ctr = 0u;  // reset for the next call
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int i = tid; i < tile_n; i += kThreads) {
      const int tc = (i % C) * 64 + i / C;
      int v = 0;
      if (col0 + tc < npad) {
        v = __ldcg(ws + col0 + tc);
        ws[col0 + tc] = 0;
      }
      red[i] = v;
    }
  }
  __syncthreads();
  for (int tc = tid; tc < tile_n; tc += kThreads) {
    const int col = col0 + tc;
    if (col >= npad) break;
    const int v = red[(tc & 63) * C + (tc >> 6)];
    const int tc16 = tc + 16;
    const int v16 = tc16 < tile_n ? red[(tc16 & 63) * C + (tc16 >> 6)] : 0;
    if (a.ep.raw) a.ep.raw[static_cast<size_t>(t) * npad + col] = v;
    lin::epilogue_one(a.ep, t, col, v, v16, gamma);
  }
}

template <bool FUSED>
void configure_once() {
  static bool done[64] = {};
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!done[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<FUSED>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    done[dev & 63] = true;
  }
}

}  // namespace

size_t gemv_fused_smem_bytes(int D, int K, int chunks_per_tile) {
  const size_t kpad = static_cast<size_t>((K + 3) & ~3);
  return red_bytes(chunks_per_tile) + align16(static_cast<size_t>(D) * sizeof(float)) + kpad * sizeof(int32_t) + kpad;
}

void launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  const int nchunks = a.RB / 16;
  const int ntiles = (nchunks + a.chunks_per_tile - 1) / a.chunks_per_tile;
  const dim3 grid(ntiles, a.splits, a.sel.T);
  if (a.fused) {
    configure_once<true>();
    gemv_kernel<true><<<grid, kThreads, gemv_fused_smem_bytes(a.sel.D, a.sel.K, a.chunks_per_tile), stream>>>(a);
    QS_LAUNCH_CHECK("gemv_kernel<fused>");
  } else {
    configure_once<false>();
    gemv_kernel<false><<<grid, kThreads, red_bytes(a.chunks_per_tile) + kStageGroups * 20, stream>>>(a);
    QS_LAUNCH_CHECK("gemv_kernel<unfused>");
  }
}

}  // namespace qsparse
