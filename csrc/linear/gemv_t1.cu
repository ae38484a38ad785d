// Gather-GEMV for ONE token (decode), variant 2. linear_gemv.cu (variant 1) serves 2..8 tokens;
// linear_gemv_t1p.cu (variant 3) is this kernel with its weight rows prefetched into shared memory.
//
// Variant 1 spends 15-25 us per call at BitNet-2B4T shapes on fixed costs (bench/NOTES-kernels.md, run 3):
// a 4-pass shared-memory radix select, 64 accumulators per thread with expensive reductions, 8 warps
// per SM, and split-K through global atomics. This variant is built for latency instead:
//  - Exact selection from registers (t1_device.cuh: bisection with an early exit; a radix select in the
//    variants that hold >= 8192 channels). A ballot scan then writes the selected (index, int8) list to
//    shared memory in index order; ties go to the lower index.
//  - Product: a CTA owns 512 packed columns (one 4-byte word of every row per lane: a warp reads 128
//    contiguous bytes of a row) and a 1/R share of the selected rows, split among its warps; 16
//    accumulators per thread, dp4a over byte-transposed groups of 4 rows (t1::accumulate4).
//  - Reduction: warps through shared memory; the R CTAs of a column block form a thread-block cluster
//    (sm_90) and push their column sums into the first CTA with distributed-shared-memory atomics, then the
//    first CTA runs the shared epilogue (t1::finish). No workspace, no counters: graph-friendly.
//  - Programmatic dependent launch (pdl.cuh): weights, norm weights, column map and betas load before
//    pdl::wait(); x and the residual after it.
#include "linear/t1_device.cuh"

namespace qsparse {
namespace {

using t1::kColsPerCta;
using t1::T1Args;

template <int NT, int KPT>
__global__ void __launch_bounds__(NT) gemv_t1_kernel(T1Args a) {
  constexpr int NW = NT / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ t1::Shared sh;
  const int lane = threadIdx.x & 31;
  const int D = a.sel.D, K = a.sel.K, Kpad = (K + 3) & ~3;
  int* red = reinterpret_cast<int*>(smem);                                // [NW][512]
  uint16_t* sidx = reinterpret_cast<uint16_t*>(smem + NW * kColsPerCta * 4);  // [Kpad]
  int8_t* sq = reinterpret_cast<int8_t*>(sidx + Kpad);                    // [Kpad]
  float* xs = reinterpret_cast<float*>(smem + NW * kColsPerCta * 4 + ((Kpad * 3 + 15) & ~15));  // [D]

  // ---- 0. Constant inputs first (their latency hides behind the selection), then the dependent ones.
  t1::EpilogueInputs<NT> e;
  e.load_constants(a, sh);
  t1::cluster_begin<NT>(a, sh);
  constexpr bool kPrefetchNorm = NT <= 512;  // the 1024-thread variant has no registers to spare
  float nw[kPrefetchNorm ? KPT : 1], v[KPT];
  if constexpr (kPrefetchNorm) t1::load_norm_weights<NT, KPT>(a.sel, nw);
  pdl::wait();  // everything below may read what the previous kernel wrote
  e.load_residual(a);

  // ---- 1-2. x (+ RMSNorm) into registers, gamma, and the selection rule.
  const t1::Selection sel = t1::select<NT, KPT, kPrefetchNorm>(a.sel, nw, v, sh, xs, red, [](unsigned, unsigned) {});

  // ---- 3. Ballot compaction into shared memory, in index order.
  t1::compact<NT, KPT>(v, sel, D, K, sh, sidx, sq);
  // The next kernel may launch only now, not at the start: its CTAs would sit resident on these SMs through
  // the selection above, which is issue-bound (block-wide counts, 8-16 warps), and slow it. Measured on the
  // H200: with the trigger first thing, the S = 0.6 decode step took 2.23 ms with PDL and 1.77 ms without.
  pdl::launch_dependents();

  // ---- 4. This CTA's share of the selected rows, 128 bytes of each, split among the warps.
  const int groups = Kpad >> 2;
  const int per = (groups + a.R - 1) / a.R;
  const int g0 = blockIdx.y * per, g1 = min(groups, g0 + per);
  const int byte0 = blockIdx.x * (kColsPerCta / 4) + lane * 4;
  int acc[16], sumq;
  constexpr int kUnroll = NT <= 256 ? 8 : 4;  // groups of 4 rows in flight per thread
  t1::gather_product<NW, kUnroll>(a.packed, static_cast<size_t>(a.RB), byte0, byte0 < a.RB, sidx, sq, g0, g1, acc,
                                  sumq);

  // ---- 5. Reduce over warps and the cluster, then the epilogue.
  t1::finish<NT>(a, acc, sumq, red, sh, e, sel.gamma);
}

template <int NT, int KPT>
void launch_t1(const T1Args& a, int cc_major, cudaStream_t stream) {
  constexpr int NW = NT / 32;
  const int kpad = (a.sel.K + 3) & ~3;
  const size_t smem = static_cast<size_t>(NW) * kColsPerCta * 4 + ((static_cast<size_t>(kpad) * 3 + 15) & ~15) +
                      static_cast<size_t>(a.sel.norm_w != nullptr ? a.sel.D : 0) * 4;
  auto kernel = gemv_t1_kernel<NT, KPT>;
  static bool configured[64] = {};
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!configured[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    if (cc_major >= 9) QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    configured[dev & 63] = true;
  }
  t1::launch(kernel, a, NT, smem, cc_major, stream);
  QS_LAUNCH_CHECK("gemv_t1_kernel");
}

}  // namespace

// Variant 3 (linear_gemv_t1p.cu); returns false when its shared-memory tile does not fit (the caller then
// runs variant 2).
bool launch_gemv_t1p(const t1::T1Args& a, int cc_major, cudaStream_t stream, int threads);
size_t gemv_t1p_smem_bytes(int D, int R, int threads);

int gemv_t1_max_d() { return 1024 * 32; }

void launch_gemv_t1(const SelectArgs& sel, const uint8_t* packed, int RB, const EpilogueArgs& ep, int nseg, int R,
                    cudaStream_t stream, int threads, int variant) {
  if (sel.T != 1) throw std::invalid_argument("gemv_t1: exactly one token");
  if (sel.K < 1 || sel.K > sel.D) throw std::invalid_argument("gemv_t1: need 1 <= K <= D");
  if (sel.D > gemv_t1_max_d()) throw std::invalid_argument("gemv_t1: D too large");
  if (R < 1 || R > 16) throw std::invalid_argument("gemv_t1: R must be in 1..16");
  if (variant != 2 && variant != 3) throw std::invalid_argument("gemv_t1: variant must be 2 or 3");
  int dev = 0, cc_major = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  QS_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  if (nseg < 1 || nseg > 4) throw std::invalid_argument("gemv_t1: 1 to 4 segments");
  T1Args a{sel, packed, RB, ep, cc_major >= 9 ? R : 1, nseg, 0};
  if (variant == 3) {
    if (!launch_gemv_t1p(a, cc_major, stream, threads))
      throw std::invalid_argument("gemv_t1: variant 3's weight tile does not fit in shared memory at this D and R");
    return;
  }
  // Kernel-lab shapes (bench/gemv_sweep.py --variants t1): other CTA sizes at BitNet-2B4T's widths.
  if (threads == 512 && sel.D <= 512 * 5) return launch_t1<512, 5>(a, cc_major, stream);
  if (threads == 512 && sel.D <= 512 * 14) return launch_t1<512, 14>(a, cc_major, stream);
  if (threads != 0 && threads != 256 && !(threads == 1024 && sel.D > 256 * 32))
    throw std::invalid_argument("gemv_t1: no variant with that many threads for this D");
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
