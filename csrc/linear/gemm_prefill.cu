// Tensor-core ternary GEMM for prefill widths (GEMM variant 3: prompts and mixed serving steps, from 64
// tokens where its grid fills the card). Variant 2 (gemm_skinny.cu) takes 16 tokens per CTA, so every 16 tokens re-read the weights and
// rebuild their mma fragments: at 524 tokens a 2B4T layer ran at ~130 int8 TOPS (bench/NOTES-serving.md).
// Here a CTA holds 32 * MT tokens (64 or 128) x 128 packed columns, and both operands stream through a
// cp.async pipeline (6 or 4 stages) in 64-row k steps:
//  - A (the masked int8 activations, qdense) lands in shared memory as token rows padded to 80 bytes, so
//    each ldmatrix phase reads 8 rows from distinct banks; one ldmatrix.x4 gives a whole m16n8k32 A fragment.
//  - B stays packed (2 bits per weight, 32 bytes per k row of the tile, rows padded to 40 bytes so the four
//    rows one lane group reads in one load sit in distinct banks). Lane (g, tg) of warp column wn reads the
//    halfword at byte 16 wn + 2g (8 packed columns) of rows tg*4 + j and 16 + tg*4 + j; a byte transpose puts
//    4 consecutive rows of each column in one register: the B fragment of column label g in n-tile nt is
//    packed column 64 wn + 8g + nt (mma column labels are free; the sums go back under their real columns).
//    One fragment set serves the warp's MT m-tiles.
//  - codes (t + 1 in {0, 1, 2}) enter the mma unsigned (s8 x u8); each token's sum of q over the same rows
//    (dp4a on the A fragments) is subtracted at the end. int32 throughout: exact, in any order.
//  - 4 warps = 2 along tokens x 2 along columns; a warp owns 16 MT tokens x 64 columns (MT x 8 mmas per
//    32-deep k step). After the k loop the sums go through shared memory (the pipeline's space, reused) so
//    the shared epilogue writes whole rows; an interleaved gate column's up partner is 16 columns on, in the
//    same 128-column tile.
// No split-K: one CTA's k loop is latency-bound (~0.5-0.7 us per 64-row step with one CTA per SM), so the
// kernel wins only where the grid fills the card; kernels/linear.py's plan_gemm sends it there.
#include "common/common.cuh"
#include "linear/device.cuh"

namespace qsparse {
namespace {

constexpr int kThreads = 128;
constexpr int kCols = 128;  // packed columns per CTA
constexpr int kBK = 64;     // k rows per pipeline stage
constexpr int kALd = kBK + 16;  // bytes per token row of an A stage
constexpr int kBLd = 40;        // bytes per k row of a packed B stage (32 used)
constexpr int kCLd = 164;       // words per token row of the sum tile: = 4 (mod 32), plus a col / 16 skew

template <int MT>
struct Tile {
  // Stages in flight: with one CTA per SM (the small grids) a 64-row step takes ~0.35 us against ~1-1.5 us of
  // loaded-DRAM latency, so 64-token tiles keep 5 steps in flight (46 KB, still 4 CTAs per SM); the 128-token
  // tiles, 2 CTAs per SM by registers, keep 3.
  static constexpr int kStages = MT == 2 ? 6 : 4;
  static constexpr int kTok = 32 * MT;
  static constexpr int kAStage = kTok * kALd;
  static constexpr int kBStage = kBK * kBLd;
  static constexpr size_t kPipe = static_cast<size_t>(kStages) * (kAStage + kBStage);
  static constexpr size_t kSums = static_cast<size_t>(kTok) * kCLd * sizeof(int);
  static constexpr size_t kSmem = kPipe > kSums ? kPipe : kSums;
};

// Lanes (g, tg) of one fragment store then hit 32 distinct banks (4g + 17tg mod 32).
__device__ __forceinline__ int sum_at(int tok, int col) { return tok * kCLd + col + (col >> 4); }

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// src-size 0 fills the destination with zeros and reads nothing (rows past T or D, columns past the matrix).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(int (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_s8u8(int (&c)[4], const int (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Halfwords of 4 consecutive rows -> out[b]: byte j of out[b] is byte b of row j.
__device__ __forceinline__ void transpose_halves4(unsigned h0, unsigned h1, unsigned h2, unsigned h3,
                                                  unsigned (&out)[2]) {
  const unsigned p01 = __byte_perm(h0, h1, 0x5140), p23 = __byte_perm(h2, h3, 0x5140);
  out[0] = __byte_perm(p01, p23, 0x5410);
  out[1] = __byte_perm(p01, p23, 0x7632);
}

template <int MT>
__global__ void __launch_bounds__(kThreads, 2) gemm_prefill_kernel(GemmArgs a) {
  using Tl = Tile<MT>;
  constexpr int kStages = Tl::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
  int8_t* As = reinterpret_cast<int8_t*>(smem);
  uint8_t* Bp = smem + kStages * Tl::kAStage;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tg = lane & 3;
  const int wm = warp >> 1, wn = warp & 1;
  const int col0 = blockIdx.x * kCols, m0 = blockIdx.y * Tl::kTok;
  const int npad = a.RB * 4;
  const int nk = (a.D + kBK - 1) / kBK;

  auto load_stage = [&](int s, int kt) {
    int8_t* as = As + s * Tl::kAStage;
#pragma unroll
    for (int i = 0; i < MT; ++i) {  // kTok rows x 4 chunks of 16 bytes
      const int idx = tid + i * kThreads, r = idx >> 2, c = idx & 3;
      const bool ok = m0 + r < a.T;
      const int8_t* src = a.qdense + (ok ? static_cast<size_t>(m0 + r) * a.ldq + kt * kBK + c * 16 : 0);
      cp_async16(as + r * kALd + c * 16, src, ok);
    }
    uint8_t* bp = Bp + s * Tl::kBStage;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 64 rows x 4 chunks of 8 bytes
      const int idx = tid + i * kThreads, r = idx >> 2, c = idx & 3;
      const int k = kt * kBK + r, byte = col0 / 4 + c * 8;
      const bool ok = k < a.D && byte < a.RB;  // RB is a multiple of 16: a chunk is all in or all out
      const uint8_t* src = a.packed + (ok ? static_cast<size_t>(k) * a.RB + byte : 0);
      cp_async8(bp + r * kBLd + c * 8, src, ok);
    }
  };

  int c[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) c[mt][nt][0] = c[mt][nt][1] = c[mt][nt][2] = c[mt][nt][3] = 0;
  int sum_lo[MT], sum_hi[MT];  // sums of q over this lane's k for tokens g and g + 8 of each m-tile
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) sum_lo[mt] = sum_hi[mt] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  const int a_row = wm * 16 * MT + (lane & 15), a_col = (lane >> 4) * 16;
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt is visible, and every warp is done with the stage the next load overwrites
    if (kt + kStages - 1 < nk) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();
    const int8_t* as = As + (kt % kStages) * Tl::kAStage;
    const uint8_t* bp = Bp + (kt % kStages) * Tl::kBStage;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      int af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], as + (a_row + mt * 16) * kALd + ks + a_col);
      const uint8_t* brow = bp + (ks + tg * 4) * kBLd + wn * 16 + 2 * g;
      unsigned lo[2], hi[2];
      transpose_halves4(*reinterpret_cast<const uint16_t*>(brow), *reinterpret_cast<const uint16_t*>(brow + kBLd),
                        *reinterpret_cast<const uint16_t*>(brow + 2 * kBLd),
                        *reinterpret_cast<const uint16_t*>(brow + 3 * kBLd), lo);
      brow += 16 * kBLd;
      transpose_halves4(*reinterpret_cast<const uint16_t*>(brow), *reinterpret_cast<const uint16_t*>(brow + kBLd),
                        *reinterpret_cast<const uint16_t*>(brow + 2 * kBLd),
                        *reinterpret_cast<const uint16_t*>(brow + 3 * kBLd), hi);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        sum_lo[mt] = __dp4a(af[mt][2], 0x01010101, __dp4a(af[mt][0], 0x01010101, sum_lo[mt]));
        sum_hi[mt] = __dp4a(af[mt][3], 0x01010101, __dp4a(af[mt][1], 0x01010101, sum_hi[mt]));
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int sh = 2 * (nt & 3);
        const unsigned b0 = (lo[nt >> 2] >> sh) & 0x03030303u, b1 = (hi[nt >> 2] >> sh) & 0x03030303u;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_s8u8(c[mt][nt], af[mt], b0, b1);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory now holds the sums

  int* sums = reinterpret_cast<int*>(smem);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    // The 4 lanes of a group cover a k step's 32 rows between them.
    int lo = sum_lo[mt], hi = sum_hi[mt];
    lo += __shfl_xor_sync(0xffffffffu, lo, 1);
    lo += __shfl_xor_sync(0xffffffffu, lo, 2);
    hi += __shfl_xor_sync(0xffffffffu, hi, 1);
    hi += __shfl_xor_sync(0xffffffffu, hi, 2);
    const int r = wm * 16 * MT + mt * 16 + g;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int cc = wn * 64 + 16 * tg + nt;  // labels 2tg and 2tg + 1 of n-tile nt: columns cc and cc + 8
      sums[sum_at(r, cc)] = c[mt][nt][0] - lo;
      sums[sum_at(r, cc + 8)] = c[mt][nt][1] - lo;
      sums[sum_at(r + 8, cc)] = c[mt][nt][2] - hi;
      sums[sum_at(r + 8, cc + 8)] = c[mt][nt][3] - hi;
    }
  }
  __syncthreads();
  // Thread tid owns column col0 + tid (kThreads == kCols) for every row of the tile: its map entry is loaded
  // once, and each batch of 8 rows issues its gamma / residual loads together (a row at a time, the
  // epilogue's dependent loads cost more than the k loop at small grids).
  static_assert(kThreads == kCols, "one epilogue column per thread");
  const int cc = tid, col = col0 + cc;
  const int rows = min(Tl::kTok, a.T - m0);
  if (col < npad) {
    const int info = a.ep.colinfo[col];
    if (info >= 0 || a.ep.raw) {
      const bool resid = a.ep.epi == kEpiResidual;
      for (int r0 = 0; r0 < rows; r0 += 8) {
        int acc[8], acc16[8];
        float gam[8], res[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int r = min(r0 + u, rows - 1);  // clamped: the extra lanes of the last batch store nothing
          acc[u] = sums[sum_at(r, cc)];
          acc16[u] = cc + 16 < kCols ? sums[sum_at(r, cc + 16)] : 0;
          gam[u] = a.gamma[m0 + r];
          res[u] = resid && info >= 0 ? a.ep.residual[lin::epilogue_offset(a.ep, m0 + r, info)] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (r0 + u >= rows) break;
          const int m = m0 + r0 + u;
          if (a.ep.raw) a.ep.raw[static_cast<size_t>(m) * npad + col] = acc[u];
          lin::epilogue_apply(a.ep, lin::epilogue_offset(a.ep, m, info), col, info, acc[u], acc16[u], gam[u],
                              a.ep.scales, res[u]);
        }
      }
    }
  }
}

template <int MT>
void launch_tile(const GemmArgs& a, cudaStream_t stream) {
  constexpr size_t smem = Tile<MT>::kSmem;
  static bool configured[64] = {};  // per device, once (not inside every captured step)
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!configured[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(gemm_prefill_kernel<MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)));
    configured[dev & 63] = true;
  }
  const dim3 grid((a.RB * 4 + kCols - 1) / kCols, (a.T + Tile<MT>::kTok - 1) / Tile<MT>::kTok);
  gemm_prefill_kernel<MT><<<grid, kThreads, smem, stream>>>(a);
  QS_LAUNCH_CHECK("gemm_prefill_kernel");
}

}  // namespace

void launch_gemm_prefill(const GemmArgs& a, int tile_tokens, cudaStream_t stream) {
  if (a.ldq % kBK != 0 || a.ldq < a.D) throw std::invalid_argument("gemm_prefill: ldq must be a multiple of 64, >= D");
  if (tile_tokens == 64) launch_tile<2>(a, stream);
  else if (tile_tokens == 128) launch_tile<4>(a, stream);
  else throw std::invalid_argument("gemm_prefill: tile_tokens must be 64 or 128");
}

}  // namespace qsparse
