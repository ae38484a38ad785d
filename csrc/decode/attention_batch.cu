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

#include "decode/attention_decode_cta.cuh"

namespace qsparse {
namespace {

using attn_decode::kMaxG;
using attn_decode::kMaxSplits;
using attn_decode::kThreads;

template <typename C, int HD_MAX, bool VEC, int GMAX>
__global__ void __launch_bounds__(kThreads, GMAX >= 8 ? 1 : 2) attention_decode_kernel(
    const float* __restrict__ qkv, int stride, int nq, int nkv, int hd, C* kc, C* vc, int num_slots, int max_len,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slots, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, float* __restrict__ out, float* ws, int* counters, int max_splits,
    int min_chunk, float scale) {
  // No early pdl::launch_dependents(): up to max_splits x nkv CTAs of this grid sit resident from launch,
  // and the next kernel (a projection) is triggered after the tile loop (inside the body), so its CTAs do
  // not crowd the SMs while this grid still waits for the previous one (CTAs that exit early trigger it
  // implicitly).
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)
  attn_decode::attention_decode_cta<C, HD_MAX, VEC, GMAX>(qkv, stride, nq, nkv, hd, kc, vc, num_slots, max_len,
      positions, slots, cos_t, sin_t, out, ws, counters, max_splits, min_chunk, scale, blockIdx.x, blockIdx.y,
      blockIdx.z);
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
