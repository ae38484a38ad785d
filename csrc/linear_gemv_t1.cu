// Gather-GEMV for ONE token (decode), variant 2. linear_gemv.cu (variant 1) still serves 2..8 tokens.
//
// Variant 1 spends 15-25 us per call at BitNet-2B4T shapes on fixed costs (bench/NOTES-kernels.md, run 3):
// a 4-pass shared-memory radix select, 64 accumulators per thread with expensive reductions, 8 warps
// per SM, and split-K through global atomics. This variant is built for latency instead:
//  - Selection from registers: a thread holds KPT values of x (+ RMSNorm); the K-th largest key (|x| as
//    fp32 bits) is found by bisection, 2 bits per step, each step one block-wide count of three
//    candidate thresholds packed into two words (no histograms, no atomics). A ballot scan then writes
//    the selected (index, int8) list to shared memory in index order; ties go to the lower index.
//  - Product: a CTA owns 512 packed columns (one 4-byte word of every row per lane: a warp reads 128
//    contiguous bytes of a row) and a 1/R share of the selected rows, split among its warps; 16
//    accumulators per thread. Codes are t+1: per group of 4 rows the words are byte-transposed
//    (__byte_perm) so one word holds one byte of 4 rows, then column j of the byte is
//    (word & 0x03030303 << 2j) = code * 4^j, dotted with the 4 int8 q by dp4a.u32.s32; shifting back
//    and subtracting sum(q) gives sum(t * q) exactly.
//  - Reduction: warps through shared memory; the R CTAs of a column block form a thread-block cluster
//    (sm_90) and each pushes its column sums into the first CTA's accumulator with distributed-shared-
//    memory atomics (fire-and-forget, order-free in int32: exact), then one cluster barrier and the first
//    CTA runs the shared epilogue. No workspace, no counters, nothing to reset: graph-friendly.
//  - Selection stops early once some candidate threshold has exactly K keys at or above it: the top-K is
//    then every key >= that threshold, with no tie to resolve (the bisection would only refine a value
//    no key lies at). For typical activations this happens ~10 bits into the key, not after all 31.
//  - Programmatic dependent launch (pdl.cuh): weights, norm weights, column map and betas load before
//    pdl::wait(); x and the residual after it.
#include <cooperative_groups.h>

#include "common.cuh"
#include "linear_device.cuh"
#include "pdl.cuh"

namespace cg = cooperative_groups;

namespace qsparse {
namespace {

constexpr int kColsPerCta = 512;  // 32 lanes x 4 bytes x 4 columns per byte

__device__ __forceinline__ unsigned ld_word(const uint8_t* p) {
  unsigned v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

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

template <int NT>
__device__ __forceinline__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = red[0];
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) m = fmaxf(m, red[w]);
  return m;
}

template <int NT>
__device__ __forceinline__ float block_sum_ordered(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = red[0];
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) s = __fadd_rn(s, red[w]);  // same order in every thread
  return s;
}

// acc[4b + j] += code(row r, column 4b + j of this lane's word) * q_r over the 4 rows r.
__device__ __forceinline__ void accumulate4(int (&acc)[16], unsigned w0, unsigned w1, unsigned w2, unsigned w3,
                                            int q4) {
  const unsigned lo01 = __byte_perm(w0, w1, 0x5140), hi01 = __byte_perm(w0, w1, 0x7362);
  const unsigned lo23 = __byte_perm(w2, w3, 0x5140), hi23 = __byte_perm(w2, w3, 0x7362);
  unsigned tr[4];
  tr[0] = __byte_perm(lo01, lo23, 0x5410);
  tr[1] = __byte_perm(lo01, lo23, 0x7632);
  tr[2] = __byte_perm(hi01, hi23, 0x5410);
  tr[3] = __byte_perm(hi01, hi23, 0x7632);
#pragma unroll
  for (int b = 0; b < 4; ++b)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[4 * b + j] = lin::dp4a_us(tr[b] & (0x03030303u << (2 * j)), q4, acc[4 * b + j]);
}

struct T1Args {
  SelectArgs sel;       // x, x_bf16, norm_w, eps, D, K (T = 1)
  const uint8_t* packed;
  int RB;               // bytes per packed row
  EpilogueArgs ep;
  int R;                // CTAs per column block (cluster size along y)
  int nseg;             // number of betas (segments)
};

template <int NT, int KPT>
__global__ void __launch_bounds__(NT) gemv_t1_kernel(T1Args a) {
  constexpr int NW = NT / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ uint2 cnt[64];
  __shared__ float redf[32];
  __shared__ int redi[2][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = a.sel.D, K = a.sel.K, Kpad = (K + 3) & ~3;
  int* red = reinterpret_cast<int*>(smem);                                // [NW][512]
  uint16_t* sidx = reinterpret_cast<uint16_t*>(smem + NW * kColsPerCta * 4);  // [Kpad]
  int8_t* sq = reinterpret_cast<int8_t*>(sidx + Kpad);                    // [Kpad]

  pdl::launch_dependents();
  // ---- 0. The epilogue's inputs do not depend on the selection: the leader CTA loads them first, so their
  // latency hides behind the selection instead of adding to the end of the chain.
  constexpr int CPT = (kColsPerCta + NT - 1) / NT;  // epilogue columns per thread
  __shared__ float s_scales[4];
  __shared__ int cred[kColsPerCta];  // the cluster's column sums (used in its first CTA)
  const bool lead_cta = blockIdx.y == 0;
  int e_info[CPT];
  float e_res[CPT];
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = tid + u * NT, col = blockIdx.x * kColsPerCta + c;
    e_info[u] = -1;
    e_res[u] = 0.f;
    if (lead_cta && c < kColsPerCta && col < a.RB * 4) e_info[u] = __ldg(a.ep.colinfo + col);
  }
  if (tid < a.nseg && tid < 4) s_scales[tid] = __ldg(a.ep.scales + tid);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.R > 1) {
    for (int c = tid; c < kColsPerCta; c += NT) cred[c] = 0;
    // Release this CTA's zeroed accumulator to the cluster; the matching wait comes just before the
    // other CTAs add into it, long after every CTA has arrived here.
    asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
  }
#endif

  // ---- 1. x (+ RMSNorm) into registers: value j of thread (warp, lane) is channel warp*32*KPT + 32j + lane.
  constexpr bool kPrefetchNorm = NT <= 256;  // the 1024-thread variant has no registers to spare
  float v[KPT], nw[kPrefetchNorm ? KPT : 1];
  const int base = warp * 32 * KPT + lane;
  const bool has_norm = a.sel.norm_w != nullptr;
  if constexpr (kPrefetchNorm) {
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      const int i = base + 32 * j;
      nw[j] = (has_norm && i < D) ? __ldg(a.sel.norm_w + i) : 0.f;
    }
  }
  pdl::wait();  // everything below may read what the previous kernel wrote
#pragma unroll
  for (int u = 0; u < CPT; ++u)
    if (a.ep.epi == kEpiResidual && e_info[u] >= 0) e_res[u] = a.ep.residual[lin::epilogue_offset(a.ep, 0, e_info[u])];
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    v[j] = i < D ? lin::load_x(a.sel.x, a.sel.x_bf16, i) : 0.f;
  }
  if (has_norm) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < KPT; ++j) ss = __fmaf_rn(v[j], v[j], ss);
    const float total = block_sum_ordered<NT>(ss, redf);
    const float inv = rsqrtf(__fadd_rn(__fdiv_rn(total, static_cast<float>(D)), a.sel.eps));
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      const int i = base + 32 * j;
      float w;
      if constexpr (kPrefetchNorm) w = nw[j];
      else w = i < D ? __ldg(a.sel.norm_w + i) : 0.f;
      v[j] = __fmul_rn(__fmul_rn(v[j], inv), w);
    }
    __syncthreads();  // redf is reused below
  }
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < KPT; ++j) m = fmaxf(m, fabsf(v[j]));
  const float gamma = fmaxf(block_max<NT>(m, redf), lin::kAbsmaxEps);
  const float scale = __fmul_rn(__frcp_rn(gamma), 127.f);  // = torch's 127.0 / gamma (see linear_device.cuh)

  // ---- 2. The K-th largest key by bisection, 2 bits a step. Invariant: count(key >= vk) >= K.
  // key(j) = |v[j]| as fp32 bits (non-negative floats order like their bits); padding is 0 and never counted.
  auto key = [&](int j) { return __float_as_uint(fabsf(v[j])); };
  unsigned vk = 0u;
  bool exact = false;  // count(key >= vk) == K: take every key >= vk, no ties
  if (K < D) {
    const int hb = 31 - __clz(__float_as_uint(gamma) | 1u);  // no key has a bit above gamma's top bit
    const unsigned uK = static_cast<unsigned>(K);
    int parity = 0;
    for (int b = hb & ~1; b >= 0; b -= 2, parity ^= 1) {
      const unsigned c1 = vk | (1u << b), c2 = vk | (2u << b), c3 = vk | (3u << b);
      unsigned pa = 0u, pb = 0u;
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        pa += (key(j) >= c1 ? 1u : 0u) + (key(j) >= c2 ? 0x10000u : 0u);
        pb += key(j) >= c3 ? 1u : 0u;
      }
      const uint2 s = block_sum2<NT>(pa, pb, cnt, parity);  // 16-bit fields: D <= 65535
      const unsigned n1 = s.x & 0xffffu, n2 = s.x >> 16, n3 = s.y;
      unsigned n = 0u;  // count(key >= new vk), when vk moved
      if (n3 >= uK) { vk = c3; n = n3; }
      else if (n2 >= uK) { vk = c2; n = n2; }
      else if (n1 >= uK) { vk = c1; n = n1; }
      if (n == uK) { exact = true; break; }  // block-uniform: every thread holds the same sums
    }
  }
  // Selected: key >= lo, plus (when not exact) key == vk among the first (K - count(key > vk)) such
  // channels by index. With K == D every channel is in (vk = 0: every key >= 0 is a tie, all taken).
  const unsigned lo = exact ? vk : vk + 1u;          // vk <= 0x7fffffff: no overflow
  const unsigned tie = exact ? 0xffffffffu : vk;      // no key (|x| bits < 2^31) equals 0xffffffff

  // ---- 3. Ballot compaction into shared memory, in index order.
  const unsigned lt = (1u << lane) - 1u;
  int gt = 0, eq = 0;
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const bool valid = base + 32 * j < D;
    gt += __popc(__ballot_sync(0xffffffffu, valid && key(j) >= lo));
    eq += __popc(__ballot_sync(0xffffffffu, valid && key(j) == tie));
  }
  if (lane == 0) { redi[0][warp] = gt; redi[1][warp] = eq; }
  __syncthreads();
  int gt_before = 0, eq_before = 0, gt_total = 0;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    gt_total += redi[0][w];
    if (w < warp) { gt_before += redi[0][w]; eq_before += redi[1][w]; }
  }
  const int need = K - gt_total;  // ties to take, lowest indices first
  int pos = gt_before + min(eq_before, need);
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    const bool valid = i < D;
    const bool g = valid && key(j) >= lo, e = valid && key(j) == tie;
    const unsigned eb = __ballot_sync(0xffffffffu, e);
    const bool sel = g || (e && eq_before + __popc(eb & lt) < need);
    const unsigned sb = __ballot_sync(0xffffffffu, sel);
    if (sel) {
      const int p = pos + __popc(sb & lt);
      sidx[p] = static_cast<uint16_t>(i);
      sq[p] = lin::quantize_one(v[j], scale);
    }
    pos += __popc(sb);
    eq_before += __popc(eb);
  }
  for (int i = K + tid; i < Kpad; i += NT) { sidx[i] = 0; sq[i] = 0; }
  __syncthreads();

  // ---- 4. This CTA's share of the selected rows, 128 bytes of each, split among the warps.
  const int groups = Kpad >> 2;
  const int per = (groups + a.R - 1) / a.R;
  const int g0 = blockIdx.y * per, g1 = min(groups, g0 + per);
  const int byte0 = blockIdx.x * (kColsPerCta / 4) + lane * 4;
  const bool col_ok = byte0 < a.RB;
  const uint8_t* wb = a.packed + (col_ok ? byte0 : 0);
  const size_t RB = static_cast<size_t>(a.RB);
  const ushort4* sidx4 = reinterpret_cast<const ushort4*>(sidx);
  const int* sq4 = reinterpret_cast<const int*>(sq);
  int acc[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) acc[c] = 0;
  int sumq = 0;
  constexpr int kUnroll = NT <= 256 ? 8 : 4;  // groups of 4 rows in flight per thread
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
          w[u][0] = ld_word(wb + id.x * RB);
          w[u][1] = ld_word(wb + id.y * RB);
          w[u][2] = ld_word(wb + id.z * RB);
          w[u][3] = ld_word(wb + id.w * RB);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      sumq = __dp4a(q4[u], 0x01010101, sumq);
      accumulate4(acc, w[u][0], w[u][1], w[u][2], w[u][3], q4[u]);
    }
  }

  // ---- 5. Reduce: warps through shared memory, then the cluster's CTAs through distributed shared memory.
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
  __syncthreads();
  int* sums = red;  // where the leader reads the complete column sums
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  const bool clustered = a.R > 1;
  if (clustered) {
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every CTA's cred is zeroed
    int* dst = cluster.map_shared_rank(cred, 0);
    for (int c = tid; c < kColsPerCta; c += NT) {
      int s = 0;
#pragma unroll
      for (int w = 0; w < NW; ++w) s += red[w * kColsPerCta + c];
      atomicAdd(dst + c, s);  // result unused: a fire-and-forget reduction into the leader's memory
    }
    cluster.sync();  // all adds done and visible to the leader
    sums = cred;
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
  if (leader) {
    __syncthreads();
#pragma unroll
    for (int u = 0; u < CPT; ++u) {
      const int c = tid + u * NT, col = blockIdx.x * kColsPerCta + c;
      if (c >= kColsPerCta || col >= a.RB * 4) continue;
      const int acc_c = sums[c];
      const int acc16 = c + 16 < kColsPerCta ? sums[c + 16] : 0;
      if (a.ep.raw) a.ep.raw[col] = acc_c;
      if (e_info[u] >= 0)
        lin::epilogue_apply(a.ep, lin::epilogue_offset(a.ep, 0, e_info[u]), col, e_info[u], acc_c, acc16, gamma,
                            s_scales, e_res[u]);
    }
  }
  // No second cluster barrier: nobody reads another CTA's shared memory after the one above, and the
  // leader (whose cred the others wrote) is the one still running.
}

template <int NT, int KPT>
void launch_t1(const T1Args& a, int cc_major, cudaStream_t stream) {
  constexpr int NW = NT / 32;
  const int kpad = (a.sel.K + 3) & ~3;
  const size_t smem = static_cast<size_t>(NW) * kColsPerCta * 4 + static_cast<size_t>(kpad) * 3;
  auto kernel = gemv_t1_kernel<NT, KPT>;
  static bool configured[64] = {};
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!configured[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    if (cc_major >= 9) QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    configured[dev & 63] = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((a.RB * 4 + kColsPerCta - 1) / kColsPerCta, a.R, 1);
  cfg.blockDim = dim3(NT, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (cc_major >= 9) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = a.R;
    attr[0].val.clusterDim.z = 1;
    n = 1;
  }
  cfg.numAttrs = pdl::add_attr(attr, n);
  cfg.attrs = attr;
  QS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
  QS_LAUNCH_CHECK("gemv_t1_kernel");
}

}  // namespace

int gemv_t1_max_d() { return 1024 * 32; }

void launch_gemv_t1(const SelectArgs& sel, const uint8_t* packed, int RB, const EpilogueArgs& ep, int nseg, int R,
                    cudaStream_t stream) {
  if (sel.T != 1) throw std::invalid_argument("gemv_t1: exactly one token");
  if (sel.K < 1 || sel.K > sel.D) throw std::invalid_argument("gemv_t1: need 1 <= K <= D");
  if (sel.D > gemv_t1_max_d()) throw std::invalid_argument("gemv_t1: D too large");
  if (R < 1 || R > 16) throw std::invalid_argument("gemv_t1: R must be in 1..16");
  int dev = 0, cc_major = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  QS_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  if (nseg < 1 || nseg > 4) throw std::invalid_argument("gemv_t1: 1 to 4 segments");
  T1Args a{sel, packed, RB, ep, cc_major >= 9 ? R : 1, nseg};
  // Values of x per thread sized to the common model widths (2560, 6912 = BitNet-2B4T), so the
  // unrolled selection loops do not run over padding.
  if (sel.D <= 256 * 8) launch_t1<256, 8>(a, cc_major, stream);
  else if (sel.D <= 256 * 10) launch_t1<256, 10>(a, cc_major, stream);
  else if (sel.D <= 256 * 16) launch_t1<256, 16>(a, cc_major, stream);
  else if (sel.D <= 256 * 28) launch_t1<256, 28>(a, cc_major, stream);
  else if (sel.D <= 256 * 32) launch_t1<256, 32>(a, cc_major, stream);
  else launch_t1<1024, 32>(a, cc_major, stream);
}

}  // namespace qsparse
