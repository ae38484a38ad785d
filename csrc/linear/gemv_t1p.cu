// Gather-GEMV for ONE token, variant 3: variant 2 (linear_gemv_t1.cu) with the weight rows prefetched into
// shared memory while the selection is still running.
//
// Why: at BitNet-2B4T sizes a projection reads 0.7-9 MB, 0.2-2 us at the card's bandwidth, but variant 2
// spends ~6-15 us in a chain of dependent steps: load x, normalize, select (bisection), compact, and only
// then load the selected rows (one more DRAM round trip of ~1 us), reduce, write. This variant takes the row
// loads off that chain:
//  - A CTA owns 512 packed columns and a contiguous range of rows (channels) [r0, r0 + rows_per_cta), not a
//    share of the compacted list, so it knows which rows it may need before the selection ends.
//  - Dense (K == D): every row of the range is copied to shared memory with cp.async before pdl::wait(), i.e.
//    while the previous kernel is still running (weights are constant).
//  - Sparse: the bisection keeps a lower bound vk with count(key >= vk) >= K, and the final top-K is a subset
//    of {key >= vk}. As soon as that superset is within ~1/4 of K, the rows of the range in it are copied (a
//    few % more bytes than the exact selection), and the last bisection steps overlap the copy.
//  - The product then reads each selected row's 128 bytes from shared memory (a lane reads 4 bytes: no bank
//    conflicts); reduction and epilogue are variant 2's (t1::finish).
// Exactness is variant 2's: the same selection rule, int32 sums in another (irrelevant) order.
#include "linear/t1_device.cuh"

namespace qsparse {
namespace {

using t1::kColsPerCta;
using t1::T1Args;

constexpr int kRowBytes = kColsPerCta / 4;  // 128 bytes of each row per CTA
constexpr size_t kMaxSmem = 220 * 1024;

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem_src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Copy rows [r0, r1) (128 bytes each at this CTA's column block) into tile, all threads, 16 bytes each.
template <int NT>
__device__ __forceinline__ void copy_all_rows(const T1Args& a, uint8_t* tile, int r0, int r1) {
  const size_t RB = static_cast<size_t>(a.RB);
  const int col0 = blockIdx.x * kRowBytes;
  for (int c = threadIdx.x; c < (r1 - r0) * 8; c += NT) {
    const int local = c >> 3, chunk = c & 7;
    if (col0 + chunk * 16 < a.RB)
      cp_async16(tile + local * kRowBytes + chunk * 16, a.packed + (r0 + local) * RB + col0 + chunk * 16);
  }
}

// Copy the rows of [r0, r1) whose key is >= thr. Warp-cooperative: each round, 8 lanes copy one row's 128
// bytes, 4 rows per round, taken from the warp's ballot of wanted channels.
template <int KPT>
__device__ __forceinline__ void copy_rows_above(const T1Args& a, uint8_t* tile, int r0, int r1, const float (&v)[KPT],
                                                unsigned thr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wbase = warp * 32 * KPT;
  const size_t RB = static_cast<size_t>(a.RB);
  const int col0 = blockIdx.x * kRowBytes;
  const int sub = lane >> 3, chunk = lane & 7;
  const bool chunk_ok = col0 + chunk * 16 < a.RB;
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = wbase + 32 * j + lane;
    unsigned m = __ballot_sync(0xffffffffu, i >= r0 && i < r1 && t1::key_of(v[j]) >= thr);
    while (m) {  // warp-uniform
      unsigned mm = m;  // this lane's row: the (sub+1)-th set bit of m
#pragma unroll
      for (int k = 0; k < 3; ++k)
        if (k < sub) mm &= mm - 1u;
      if (mm != 0u && chunk_ok) {
        const int ch = wbase + 32 * j + (__ffs(mm) - 1);
        cp_async16(tile + (ch - r0) * kRowBytes + chunk * 16, a.packed + ch * RB + col0 + chunk * 16);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) m &= m - 1u;  // drop the 4 rows of this round
    }
  }
}

template <int NT, int KPT>
__global__ void __launch_bounds__(NT) gemv_t1p_kernel(T1Args a) {
  constexpr int NW = NT / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ t1::Shared sh;
  __shared__ int nsel;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = a.sel.D, K = a.sel.K, Dr = a.rows_per_cta;
  const int r0 = min(D, blockIdx.y * Dr), r1 = min(D, r0 + Dr);
  int* red = reinterpret_cast<int*>(smem);                                   // [NW][512]
  uint8_t* tile = smem + NW * kColsPerCta * 4;                               // [Dr][128]
  uint16_t* sidx = reinterpret_cast<uint16_t*>(tile + static_cast<size_t>(Dr) * kRowBytes);  // [Dr] local rows
  int8_t* sq = reinterpret_cast<int8_t*>(sidx + Dr);                         // [Dr]
  float* xs = reinterpret_cast<float*>(sq + Dr);                             // [D] (norm only)
  const bool dense = K >= D;

  pdl::launch_dependents();
  // ---- 0. Constant inputs, including (dense) every weight row of the range, then the dependent ones.
  if (dense) copy_all_rows<NT>(a, tile, r0, r1);
  t1::EpilogueInputs<NT> e;
  e.load_constants(a, sh);
  t1::cluster_begin<NT>(a, sh);
  if (tid == 0) nsel = 0;
  constexpr bool kPrefetchNorm = NT <= 512;
  float nw[kPrefetchNorm ? KPT : 1], v[KPT];
  if constexpr (kPrefetchNorm) t1::load_norm_weights<NT, KPT>(a.sel, nw);
  pdl::wait();  // everything below may read what the previous kernel wrote
  e.load_residual(a);

  // ---- 1-2. Selection; the rows of the superset {key >= vk} are copied once it is close to K.
  bool copied = dense;
  const unsigned slack = static_cast<unsigned>(K / 4 + 16);
  const t1::Selection sel = t1::select<NT, KPT, kPrefetchNorm>(a.sel, nw, v, sh, xs, red,
                                                               [&](unsigned vk, unsigned n) {
    if (!copied && n <= static_cast<unsigned>(K) + slack) {  // block-uniform
      copy_rows_above<KPT>(a, tile, r0, r1, v, vk);
      copied = true;
    }
  });
  if (!copied) copy_rows_above<KPT>(a, tile, r0, r1, v, sel.exact ? sel.lo : sel.tie);

  // ---- 3. The selected rows of this CTA's range into (local row, q); any order (int32 sums commute).
  const unsigned lt = (1u << lane) - 1u;
  const int base = warp * 32 * KPT + lane;
  int eq_before = 0, need = 0;
  if (!sel.exact && !dense) {
    int gt_before = 0;
    t1::tie_quota<NT, KPT>(v, sel, D, K, sh, &gt_before, &eq_before, &need);
  }
#pragma unroll
  for (int j = 0; j < KPT; ++j) {
    const int i = base + 32 * j;
    const bool valid = i < D;
    const unsigned kj = t1::key_of(v[j]);
    const bool eqv = valid && kj == sel.tie;
    const unsigned eb = __ballot_sync(0xffffffffu, eqv);
    const bool taken = dense ? valid : (valid && kj >= sel.lo) || (eqv && eq_before + __popc(eb & lt) < need);
    const bool mine = taken && i >= r0 && i < r1;
    const unsigned sb = __ballot_sync(0xffffffffu, mine);
    if (sb) {  // warp-uniform
      int p0 = 0;
      if (lane == 0) p0 = atomicAdd(&nsel, __popc(sb));
      p0 = __shfl_sync(0xffffffffu, p0, 0);
      if (mine) {
        const int p = p0 + __popc(sb & lt);
        sidx[p] = static_cast<uint16_t>(i - r0);
        sq[p] = lin::quantize_one(v[j], sel.scale);
      }
    }
    eq_before += __popc(eb);
  }
  __syncthreads();
  const int n = nsel;
  if (tid < ((n + 3) & ~3) - n) { sidx[n + tid] = 0; sq[n + tid] = 0; }  // q = 0: padding adds nothing
  cp_async_wait_all();
  __syncthreads();  // the tile (copied by every thread) and the padded list are complete

  // ---- 4. Product from shared memory: warp w takes groups of 4 selected rows w, w + NW, ...
  const bool col_ok = blockIdx.x * kRowBytes + lane * 4 < a.RB;
  const ushort4* sidx4 = reinterpret_cast<const ushort4*>(sidx);
  const int* sq4 = reinterpret_cast<const int*>(sq);
  int acc[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) acc[c] = 0;
  int sumq = 0;
  const int groups = (n + 3) >> 2;
  const uint8_t* tl = tile + lane * 4;
  for (int g = warp; g < groups; g += NW) {
    const ushort4 id = sidx4[g];
    const int q4 = sq4[g];
    unsigned w0 = 0u, w1 = 0u, w2 = 0u, w3 = 0u;
    if (col_ok) {
      w0 = *reinterpret_cast<const unsigned*>(tl + id.x * kRowBytes);
      w1 = *reinterpret_cast<const unsigned*>(tl + id.y * kRowBytes);
      w2 = *reinterpret_cast<const unsigned*>(tl + id.z * kRowBytes);
      w3 = *reinterpret_cast<const unsigned*>(tl + id.w * kRowBytes);
    }
    sumq = __dp4a(q4, 0x01010101, sumq);
    t1::accumulate4(acc, w0, w1, w2, w3, q4);
  }

  // ---- 5. Reduce over warps and the cluster, then the epilogue (variant 2's).
  t1::finish<NT>(a, acc, sumq, red, sh, e, sel.gamma);
}

int rows_per_cta(int D, int R) { return ((D + R - 1) / R + 3) & ~3; }

// Conservative: counts the norm's D floats whether or not a norm is fused.
size_t smem_bytes(int D, int R, int nt) {
  const size_t dr = static_cast<size_t>(rows_per_cta(D, R));
  return static_cast<size_t>(nt / 32) * kColsPerCta * 4 + dr * kRowBytes + dr * 3 + static_cast<size_t>(D) * 4;
}

template <int NT, int KPT>
void launch_t1p(T1Args a, int cc_major, cudaStream_t stream) {
  auto kernel = gemv_t1p_kernel<NT, KPT>;
  static bool configured[64] = {};
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!configured[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxSmem)));
    if (cc_major >= 9) QS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    configured[dev & 63] = true;
  }
  a.rows_per_cta = rows_per_cta(a.sel.D, a.R);
  t1::launch(kernel, a, NT, smem_bytes(a.sel.D, a.R, NT), cc_major, stream);
  QS_LAUNCH_CHECK("gemv_t1p_kernel");
}

}  // namespace

size_t gemv_t1p_smem_bytes(int D, int R, int threads) { return smem_bytes(D, R, threads == 0 ? 256 : threads); }
size_t gemv_t1p_max_smem_bytes() { return kMaxSmem; }

bool launch_gemv_t1p(const t1::T1Args& a, int cc_major, cudaStream_t stream, int threads) {
  const int nt = threads == 0 ? (a.sel.D <= 256 * 32 ? 256 : 1024) : threads;
  if (smem_bytes(a.sel.D, a.R, nt) > kMaxSmem) return false;
  if (nt == 512 && a.sel.D <= 512 * 14) { launch_t1p<512, 14>(a, cc_major, stream); return true; }
  if (nt != 256) return false;
  if (a.sel.D <= 256 * 8) launch_t1p<256, 8>(a, cc_major, stream);
  else if (a.sel.D <= 256 * 10) launch_t1p<256, 10>(a, cc_major, stream);
  else if (a.sel.D <= 256 * 16) launch_t1p<256, 16>(a, cc_major, stream);
  else if (a.sel.D <= 256 * 28) launch_t1p<256, 28>(a, cc_major, stream);
  else if (a.sel.D <= 256 * 32) launch_t1p<256, 32>(a, cc_major, stream);
  else return false;
  return true;
}

}  // namespace qsparse
