// The persistent decode step's kernel (step_api.cuh): one CTA per SM walks the whole schedule of a batch-1
// decode step's layers; instantiated per cache type in step_kernel_{bf16,f32}.cu.
//
// Why one kernel: the multi-kernel step is a chain of ~150 dependent launches of 5-15 us each against
// 0.3-2 us of bytes (bench/NOTES-latency.md). Here an op's tiles start as soon as the tiles they read have
// finished, not when a whole grid has drained, and weights do not wait for activations: a tile prefetches
// the rows it may read into L2 before it waits for its input.
//
// Work and dependencies (a tile = one CTA's share of an op):
//  - projection: tile = (512-column block cb, split r of R). Every tile runs the full selection over x
//    redundantly (the same code and bits as the one-token GEMV, linear/t1_device.cuh: no cross-CTA
//    selection round trip), takes split r of the selected rows (the t1 kernel's partition), and adds its
//    512 column sums into acc with L2 reductions (int32: exact in any order). The last of the R tiles to
//    arrive reads and zeroes the sums (atomicExch), runs the shared epilogue (lin::epilogue_apply: the
//    multi-kernel path's bits) and signals one column block done.
//  - attention: tile = (key split, kv head), the multi-kernel decode attention's own per-CTA body
//    (attention_decode_cta.cuh, same split plan, same merge by the last split): the same bits. The CTA that
//    writes a kv head's final output signals it.
//  - a tile waits (one thread polls with relaxed loads, then an acquire fence, then a barrier) for its
//    producer op's count; every read of data written in this launch goes through L2 (__ldcg): another SM wrote it, and
//    this SM's L1 may hold the previous layer's lines.
// Deadlock freedom: the grid never exceeds the co-resident CTA count (step::max_grid), and a tile only
// waits for ops earlier in the schedule, which every CTA walks in order.
#pragma once
#include <type_traits>

#include "decode/attention_decode_cta.cuh"
#include "decode/step_api.cuh"
#include "linear/t1_device.cuh"

namespace qsparse {
namespace step {

constexpr int kNT = 256;  // the attention body's block size; the selection needs >= 256
constexpr int kCols = t1::kColsPerCta;

// Dynamic shared memory of a projection tile: warp partials [8][512] int, the selected list (idx u16 + q i8,
// padded to 4), and the norm's D floats.
__host__ __device__ constexpr size_t gemv_smem_bytes(int max_d) {
  return static_cast<size_t>(kNT / 32) * kCols * 4 + ((static_cast<size_t>(max_d + 3) / 4 * 4 * 3 + 15) / 16 * 16) +
         static_cast<size_t>(max_d) * 4;
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned smid() {
  unsigned s;
  asm volatile("mov.u32 %0, %smid;" : "=r"(s));
  return s;
}

__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// One thread polls with relaxed loads (an acquire per poll would also invalidate this SM's L1 each time),
// then one acquire fence; the barrier passes it on to the CTA (the pattern of cooperative groups' grid sync).
__device__ __forceinline__ void wait_ready(const unsigned* ready, int idx, unsigned target) {
  if (idx >= 0 && threadIdx.x == 0) {
    while (ld_relaxed(ready + idx) < target) {
    }
    fence_acq_rel();
  }
  __syncthreads();
}

// The CTA's writes, then one release increment by thread 0 (cumulative: it orders what the barrier made
// visible to it). Call block-uniformly.
__device__ __forceinline__ void signal_ready(unsigned* ready, int idx) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(ready + idx) : "memory");
}

__device__ __forceinline__ unsigned arrive_acq_rel(unsigned* p) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
  return old;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
}

// The rows [r0, r1) that split r of R reads: dense, exactly its groups of the (complete) list; sparse, a
// contiguous 1/R of the channels (the R tiles together cover every row of the column block, so whatever
// the selection, its rows are in L2 when the product needs them: dense DRAM bytes, off the critical path).
__device__ __forceinline__ void tile_rows(int D, int K, int R, int r, int& r0, int& r1) {
  if (K >= D) {
    const int groups = (D + 3) >> 2, per = (groups + R - 1) / R;
    r0 = min(D, 4 * r * per);
    r1 = min(D, 4 * (r + 1) * per);
  } else {
    const int per = (D + R - 1) / R;
    r0 = min(D, r * per);
    r1 = min(D, r0 + per);
  }
}

struct TileShared {
  t1::Shared sel;
  float scales[4];
  int last;
  unsigned long long stamp[3];  // profile: wait done, selection done, product done (globaltimer, thread 0)
};

__device__ __forceinline__ void stamp(TileShared& ts, int i) {
  if (threadIdx.x == 0) ts.stamp[i] = globaltimer();
}

template <int KPT>
__device__ __noinline__ void gemv_tile(const StepOp& op, int tile, unsigned* ready, unsigned char* smem,
                                       TileShared& ts) {
  constexpr int NW = kNT / 32;
  const int tid = threadIdx.x, lane = tid & 31;
  const int cb = tile / op.R, r = tile % op.R;
  const int D = op.D, K = op.K, Kpad = (K + 3) & ~3;
  int* red = reinterpret_cast<int*>(smem);                                     // [NW][512]
  uint16_t* sidx = reinterpret_cast<uint16_t*>(smem + NW * kCols * 4);         // [Kpad]
  int8_t* sq = reinterpret_cast<int8_t*>(sidx + Kpad);                         // [Kpad]
  float* xs = reinterpret_cast<float*>(smem + NW * kCols * 4 + ((Kpad * 3 + 15) & ~15));  // [D]
  const size_t RB = static_cast<size_t>(op.RB);
  const int byte_blk = cb * (kCols / 4);

  // ---- 0. Constant inputs before the wait: the rows this tile may read (into L2), the betas.
  if (op.prefetch) {
    int r0, r1;
    tile_rows(D, K, op.R, r, r0, r1);
    const int blk_bytes = min(kCols / 4, op.RB - byte_blk);
    for (int row = r0 + tid; row < r1; row += kNT) {
      const uint8_t* p = op.packed + row * RB + byte_blk;
      prefetch_l2(p);
      prefetch_l2(p + blk_bytes - 1);  // the 128 bytes may straddle two lines
    }
  }
  if (tid < op.nseg && tid < 4) ts.scales[tid] = __ldg(op.scales + tid);
  SelectArgs s;
  s.x = op.x;
  s.x_bf16 = 0;
  s.norm_w = op.norm_w;
  s.eps = op.eps;
  s.T = 1;
  s.D = D;
  s.K = K;
  constexpr bool kPrefetchNorm = KPT <= 28;  // registers: 56 values + 56 weights would not fit
  float nw[kPrefetchNorm ? KPT : 1], v[KPT];
  if constexpr (kPrefetchNorm) t1::load_norm_weights<kNT, KPT>(s, nw);
  wait_ready(ready, op.wait_idx, op.wait_target);
  stamp(ts, 0);

  // ---- 1. x (+ RMSNorm), gamma and the selection rule: the one-token GEMV's code, hence its bits.
  const t1::Selection sel =
      t1::select<kNT, KPT, kPrefetchNorm, true>(s, nw, v, ts.sel, xs, red, [](unsigned, unsigned) {});

  // ---- 2. Ballot compaction into shared memory, in index order (as gemv_t1_kernel).
  t1::compact<kNT, KPT>(v, sel, D, K, ts.sel, sidx, sq);
  stamp(ts, 1);

  // ---- 3. Split r of the selected rows, 128 bytes of each (this column block), split among the warps.
  const int groups = Kpad >> 2;
  const int per = (groups + op.R - 1) / op.R;
  const int g0 = r * per, g1 = min(groups, g0 + per);
  const int byte0 = byte_blk + lane * 4;
  int acc[16], sumq;
  t1::gather_product<NW, 8>(op.packed, RB, byte0, byte0 < op.RB, sidx, sq, g0, g1, acc, sumq);

  // ---- 4. Column sums over the warps, then into acc in L2 (fire-and-forget reductions, exact in int32).
  stamp(ts, 2);  // this thread's share of the product is issued; the stores below wait for it
  t1::store_column_sums(acc, sumq, red);
  __syncthreads();
  const int ncols = min(kCols, op.RB * 4 - cb * kCols);
  for (int c = tid; c < ncols; c += kNT) {
    int sum = 0;
#pragma unroll
    for (int w = 0; w < NW; ++w) sum += red[w * kCols + c];
    if (g1 > g0) atomicAdd(op.acc + cb * kCols + c, sum);  // result unused: compiled to red.global.add
  }
  __syncthreads();
  if (tid == 0) ts.last = arrive_acq_rel(op.arrive + cb) == static_cast<unsigned>(op.R - 1);
  __syncthreads();
  if (!ts.last) return;

  // ---- 5. The last tile of the column block: read-and-zero the sums, the shared epilogue, signal. The
  // column map and the residual (final since this op's input was ready) load beside the exchange.
  EpilogueArgs ep;
  ep.colinfo = op.colinfo;
  ep.scales = op.scales;
  ep.epi = op.epi;
  ep.residual = op.residual;
  ep.out = op.out;
  ep.out_ld = op.out_ld;
  constexpr int CPT = kCols / kNT;
  int info[CPT];
  float resid[CPT];
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = tid + u * kNT, col = cb * kCols + c;
    info[u] = c < ncols ? __ldg(op.colinfo + col) : -1;
    resid[u] = op.epi == kEpiResidual && info[u] >= 0 ? __ldcg(op.residual + lin::epilogue_offset(ep, 0, info[u])) : 0.f;
  }
  for (int c = tid; c < kCols; c += kNT) red[c] = c < ncols ? atomicExch(op.acc + cb * kCols + c, 0) : 0;
  __syncthreads();
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = tid + u * kNT, col = cb * kCols + c;
    if (c >= ncols) continue;
    const int a = red[c], a16 = c + 16 < kCols ? red[c + 16] : 0;
    if (op.raw) op.raw[col] = a;
    if (info[u] >= 0)
      lin::epilogue_apply(ep, lin::epilogue_offset(ep, 0, info[u]), col, info[u], a, a16, sel.gamma, ts.scales,
                          resid[u]);
  }
  if (tid == 0) op.arrive[cb] = 0u;
  signal_ready(ready, op.signal_idx);
}

template <typename C, int HD_MAX, int GMAX>
__device__ __noinline__ void attention_tile(const StepOp& op, const StepAttention& at, int tile, int nsplit,
                                            unsigned* ready, TileShared& ts) {
  wait_ready(ready, op.wait_idx, op.wait_target);
  stamp(ts, 0);
  if (threadIdx.x == 0) ts.stamp[1] = ts.stamp[2] = 0ull;
  const int split = tile / at.nkv, kv = tile % at.nkv;
  const bool wrote = attn_decode::attention_decode_cta<C, HD_MAX, true, GMAX, false>(
      at.qkv, at.stride, at.nq, at.nkv, at.hd, static_cast<C*>(op.kc), static_cast<C*>(op.vc), 1, at.max_len,
      at.positions, at.slots, at.cos_t, at.sin_t, at.out, at.ws, at.counters, at.max_splits, at.min_chunk, at.scale,
      split, kv, 0);
  if (wrote) signal_ready(ready, op.signal_idx);
}

// Values of x per thread for a projection's D (the selection keeps them in registers): 256 x KPT >= D.
template <typename F>
__device__ __forceinline__ void with_kpt(int D, F f) {
  if (D <= 256 * 10) f(std::integral_constant<int, 10>{});
  else if (D <= 256 * 16) f(std::integral_constant<int, 16>{});
  else if (D <= 256 * 28) f(std::integral_constant<int, 28>{});
  else f(std::integral_constant<int, 56>{});
}
constexpr int kMaxD = 256 * 56;

template <typename C, int HD_MAX, int GMAX>
__global__ void __launch_bounds__(kNT, 1) decode_step_kernel(StepLaunch a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ TileShared ts;
  __shared__ __align__(16) StepOp op;
  const int tid = threadIdx.x;
  const int grid = gridDim.x, cta = blockIdx.x;
  for (int i = 0; i < a.nops; ++i) {
    __syncthreads();  // every thread is done with the previous op
    constexpr int kWords = sizeof(StepOp) / 4;
    for (int w = tid; w < kWords; w += kNT)
      reinterpret_cast<unsigned*>(&op)[w] = __ldg(reinterpret_cast<const unsigned*>(a.ops + i) + w);
    __syncthreads();
    int ntiles, nsplit = 0;
    if (op.kind == kOpAttention) {
      const int len = min(__ldg(a.at.positions) + 1, a.at.max_len);
      int chunk;
      attn_decode::split_plan(max(len, 1), a.at.max_splits, a.at.min_chunk, nsplit, chunk);
      ntiles = nsplit * a.at.nkv;
    } else {
      ntiles = op.ncb * op.R;
    }
    int t = cta - op.tile0 % grid;
    if (t < 0) t += grid;
    unsigned long long t_start = 0;
    if (a.prof && t < ntiles) t_start = globaltimer();
    int ran = 0;
    for (; t < ntiles; t += grid, ++ran) {
      if (op.kind == kOpAttention) attention_tile<C, HD_MAX, GMAX>(op, a.at, t, nsplit, a.ready, ts);
      else with_kpt(op.D, [&](auto kpt) { gemv_tile<decltype(kpt)::value>(op, t, a.ready, smem, ts); });
      __syncthreads();
      if (a.prof && ran == 0 && tid == 0) {  // the first tile's phases
        unsigned long long* rec = a.prof + (static_cast<size_t>(i) * grid + cta) * kProfWords;
        rec[4] = ts.stamp[0];
        rec[5] = ts.stamp[1];
        rec[6] = ts.stamp[2];
        rec[7] = globaltimer();
      }
    }
    if (a.prof && t_start && tid == 0) {
      unsigned long long* rec = a.prof + (static_cast<size_t>(i) * grid + cta) * kProfWords;
      rec[0] = t_start;
      rec[1] = static_cast<unsigned long long>(ran);
      rec[2] = globaltimer();
      rec[3] = smid();
    }
  }
  // The last CTA out resets the counters for the next launch (every CTA has passed all its waits).
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(a.done, 1u) == static_cast<unsigned>(grid - 1)) {
      for (int k = 0; k < a.nready; ++k) a.ready[k] = 0u;
      *a.done = 0u;
      __threadfence();
    }
  }
}

template <typename C, int HD_MAX, int GMAX>
void launch_typed(const StepLaunch& a, cudaStream_t stream) {
  auto kernel = decode_step_kernel<C, HD_MAX, GMAX>;
  const size_t smem = gemv_smem_bytes(a.max_d);
  QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<a.grid, kNT, smem, stream>>>(a);
  QS_LAUNCH_CHECK("decode_step_kernel");
}

template <typename C, int HD_MAX, int GMAX>
int occupancy(int max_d) {
  auto kernel = decode_step_kernel<C, HD_MAX, GMAX>;
  const size_t smem = gemv_smem_bytes(max_d);
  QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  QS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kNT, smem));
  return per_sm;
}

// hd -> HD_MAX and G -> GMAX exactly as attention_batch.cu's dispatch (so the body's tiling, hence its bits,
// are the multi-kernel step's).
template <typename C, typename F>
bool dispatch(int hd, int G, F f) {
  auto by_g = [&](auto hdmax) {
    constexpr int H = decltype(hdmax)::value;
    if (G <= 1) f(C{}, std::integral_constant<int, H>{}, std::integral_constant<int, 1>{});
    else if (G <= 2) f(C{}, std::integral_constant<int, H>{}, std::integral_constant<int, 2>{});
    else if (G <= 4) f(C{}, std::integral_constant<int, H>{}, std::integral_constant<int, 4>{});
    else f(C{}, std::integral_constant<int, H>{}, std::integral_constant<int, 8>{});
    return true;
  };
  if (hd <= 32) return by_g(std::integral_constant<int, 32>{});
  if (hd <= 64) return by_g(std::integral_constant<int, 64>{});
  return by_g(std::integral_constant<int, 128>{});
}

}  // namespace step
}  // namespace qsparse
