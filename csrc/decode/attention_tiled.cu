// Causal GQA prefill attention, variant 2: query tiles x key splits (variant 1, one block per query token,
// is csrc/decode/attention.cu and stays the reference and the fallback).
//
// Why: variant 1 gives each (kv head, query) a block that walks every key alone, one position per warp step.
// A 64-token chunk at position 3072 then costs ~1.5 ms per layer on an H200 (bench/results/mixed-step-v1attn-h200.json),
// 45 ms of a 53 ms serving step, and a 4k prompt takes 2.3 s to prefill among 16 decoding streams.
//
// Here a block takes kTileRows query rows (TQ = kTileRows / G tokens x the G query heads of one kv head) and one
// split of kSplitKeys keys, staged through shared memory 32 keys at a time: scores as a 64 x 32 tile (2 x 4 per
// thread), a tile-wise online softmax (one warp per row, one lane per key), then P.V (4 rows x 8 channels per
// thread). Splits run in parallel; a merge kernel combines them in split order.
//
// Invariance: a query at position p gets the same bits whichever chunk, tile or call it is in. Splits and key
// tiles are aligned to absolute positions (multiples of kSplitKeys and 32), every sum runs in a fixed order
// (channels 0..hd-1 by fma, the warp's butterfly over the tile's 32 keys, keys 0..31 of a tile, splits 0, 1, ...),
// and a tile whose keys are all past p is an exact no-op (corr = 1, p = 0). So the serving runner's chunked
// prefill gives a prompt the same bits as one whole-prompt call, whatever the chunk sizes.
#include <cmath>
#include <stdexcept>
#include <string>

#include "decode/common.cuh"

namespace qsparse {
namespace {

constexpr int kTileRows = 64;    // query rows (token x head) per block
constexpr int kTileKeys = 32;    // keys per shared-memory tile: one per lane in the softmax
constexpr int kSplitKeys = 512;  // keys per split
constexpr int kThreads = 256;
constexpr int kMaxHd = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kTileRows / kWarps;  // softmax: 8 rows per warp

struct TiledArgs {
  const float* qkv;
  int stride, T, t_base, nq, nkv, hd, max_len;
  const void* kc;
  const void* vc;
  const int32_t* start;
  float* out;
  float* part_acc;  // [nsplit][T][nq][hd]
  float* part_ml;   // [nsplit][T][nq][2]: running max, sum
  float scale;
  // Several prompts' chunks in one call (attention_tiled_chunks): tile i is tiles[i] = (first row, tokens, slot,
  // position offset of the first row within the chunk); row positions are start[slot] + offset + j, and the
  // caches are those of `slot` (slot_stride elements apart). Rows are absolute in qkv / out; the partials are
  // indexed from row ws_row0 (T rows of them). nullptr: one chunk, rows t at *start + t_base + t.
  const int4* tiles;
  size_t slot_stride;
  int ws_row0;
};

__host__ __device__ inline size_t smem_floats(int hd) {
  return (size_t)kTileRows * (hd + 1) + (size_t)kTileKeys * (hd + 1) + (size_t)kTileKeys * hd +
         (size_t)kTileRows * (kTileKeys + 1) + 3 * kTileRows;
}

template <typename C>
__global__ void __launch_bounds__(kThreads) attention_tiled_kernel(TiledArgs a) {
  const int G = a.nq / a.nkv, TQ = kTileRows / G;
  const int g = blockIdx.y, split = blockIdx.z;
  int t0, tokens, pos0;  // the tile's first row, its tokens, the position of its first token
  size_t slot_off = 0;
  if (a.tiles) {
    const int4 d = a.tiles[blockIdx.x];
    t0 = d.x;
    tokens = d.y;
    pos0 = a.start[d.z] + d.w;
    slot_off = static_cast<size_t>(d.z) * a.slot_stride;
  } else {
    t0 = blockIdx.x * TQ;
    tokens = min(TQ, a.T - t0);
    pos0 = *a.start + a.t_base + t0;
  }
  const int rows = tokens * G;
  const int p_last = min(pos0 + tokens - 1, a.max_len - 1);
  const int k_begin = split * kSplitKeys;
  if (k_begin > p_last) return;  // no row of this tile has keys here (the merge reads only splits with keys)
  const int k_end = min(k_begin + kSplitKeys, p_last + 1);
  const int hd = a.hd, hq = hd + 1;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  extern __shared__ float smem[];
  float* q_s = smem;                         // [kTileRows][hd + 1]
  float* k_s = q_s + kTileRows * hq;         // [kTileKeys][hd + 1]
  float* v_s = k_s + kTileKeys * hq;         // [kTileKeys][hd]
  float* s_s = v_s + kTileKeys * hd;         // [kTileRows][kTileKeys + 1]: scores, then probabilities
  float* corr_s = s_s + kTileRows * (kTileKeys + 1);
  float* m_s = corr_s + kTileRows;
  float* l_s = m_s + kTileRows;

  for (int i = tid; i < kTileRows * hd; i += kThreads) {
    const int r = i / hd, d = i - r * hd;
    float q = 0.f;
    if (r < rows) q = a.qkv[(size_t)(t0 + r / G) * a.stride + (size_t)(g * G + r % G) * hd + d];
    q_s[r * hq + d] = q;
  }
  // Row r's last key: min(position, max_len - 1), as variant 1 (p1 = min(start + t + 1, max_len)).
  auto row_last = [&](int r) { return r < rows ? min(pos0 + r / G, a.max_len - 1) : -1; };

  // softmax state of this warp's rows (replicated in every lane)
  float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  // P.V accumulators: rows pv_r + 16 i, channels pv_d + 16 e
  const int pv_r = tid >> 4, pv_d = tid & 15;
  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
  // scores: rows sc_r + 32 i, keys sc_k + 8 u
  const int sc_r = tid >> 3, sc_k = tid & 7;
  int sc_last[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) sc_last[i] = row_last(sc_r + 32 * i);

  const C* kb = static_cast<const C*>(a.kc) + slot_off + (size_t)g * a.max_len * hd;
  const C* vb = static_cast<const C*>(a.vc) + slot_off + (size_t)g * a.max_len * hd;
  for (int kt = k_begin; kt < k_end; kt += kTileKeys) {
    __syncthreads();  // the previous tile's k_s, v_s and s_s are consumed (and q_s is written, the first time)
    for (int i = tid; i < kTileKeys * hd; i += kThreads) {
      const int j = i / hd, d = i - j * hd, key = kt + j;
      const bool ok = key < k_end;
      k_s[j * hq + d] = ok ? dec::to_f<C>(kb[(size_t)key * hd + d]) : 0.f;
      v_s[j * hd + d] = ok ? dec::to_f<C>(vb[(size_t)key * hd + d]) : 0.f;
    }
    __syncthreads();
    {
      float s[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int u = 0; u < 4; ++u) s[i][u] = 0.f;
      const float* q0 = q_s + sc_r * hq;
      const float* q1 = q_s + (sc_r + 32) * hq;
      for (int d = 0; d < hd; ++d) {
        const float qa = q0[d], qb = q1[d];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float kv = k_s[(sc_k + 8 * u) * hq + d];
          s[0][u] = fmaf(qa, kv, s[0][u]);
          s[1][u] = fmaf(qb, kv, s[1][u]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int key = kt + sc_k + 8 * u;
          s_s[(sc_r + 32 * i) * (kTileKeys + 1) + sc_k + 8 * u] = key <= sc_last[i] ? s[i][u] * a.scale : -INFINITY;
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      float* sr = s_s + r * (kTileKeys + 1);
      const float x = sr[lane];
      const float mn = fmaxf(m[i], dec::warp_max(x));
      float p = 0.f, corr = 1.f;
      if (mn != -INFINITY) {
        corr = expf(m[i] - mn);  // m = -inf before the row's first key: corr = 0 (acc and l are 0 anyway)
        p = expf(x - mn);        // a key past the row's position: exp(-inf) = 0
      }
      l[i] = l[i] * corr + dec::warp_sum(p);
      m[i] = mn;
      sr[lane] = p;
      if (lane == 0) corr_s[r] = corr;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = pv_r + 16 * i;
      const float c = corr_s[r];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] *= c;
    }
    for (int j = 0; j < kTileKeys; ++j) {
      float pj[4], vj[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) pj[i] = s_s[(pv_r + 16 * i) * (kTileKeys + 1) + j];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int d = pv_d + 16 * e;
        vj[e] = d < hd ? v_s[j * hd + d] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(pj[i], vj[e], acc[i][e]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      m_s[warp * kRowsPerWarp + i] = m[i];
      l_s[warp * kRowsPerWarp + i] = l[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = pv_r + 16 * i;
    const int last = row_last(r);
    if (last < k_begin) continue;  // padding row, or a token before this split
    const int t = t0 + r / G, head = g * G + r % G;
    const float L = l_s[r];
    if (last < kSplitKeys) {  // one split only: final here, with the merge's formula for one split (A / L)
      float* o = a.out + (size_t)t * a.nq * hd + (size_t)head * hd;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int d = pv_d + 16 * e;
        if (d < hd) o[d] = L > 0.f ? acc[i][e] / L : 0.f;
      }
    } else {
      const size_t rec = ((size_t)split * a.T + (t - a.ws_row0)) * a.nq + head;
      float* pa = a.part_acc + rec * hd;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int d = pv_d + 16 * e;
        if (d < hd) pa[d] = acc[i][e];
      }
      if (pv_d == 0) {
        a.part_ml[rec * 2] = m_s[r];
        a.part_ml[rec * 2 + 1] = L;
      }
    }
  }
}

// One block per (token, head), a thread per channel: rows at positions >= kSplitKeys combine their splits
// 0 .. last / kSplitKeys in order. For one split this is A / L with A = acc and L = l exactly (c = exp(0) = 1).
// With tiles: block x = tile * TQ + j serves row j of tile x / TQ.
__global__ void attention_tiled_merge_kernel(TiledArgs a) {
  const int head = blockIdx.y, d = threadIdx.x;
  int t, last;
  if (a.tiles) {
    const int TQ = kTileRows / (a.nq / a.nkv), j = blockIdx.x % TQ;
    const int4 tile = a.tiles[blockIdx.x / TQ];
    if (j >= tile.y) return;
    t = tile.x + j;
    last = min(a.start[tile.z] + tile.w + j, a.max_len - 1);
  } else {
    t = blockIdx.x;
    last = min(*a.start + a.t_base + t, a.max_len - 1);
  }
  if (last < kSplitKeys || d >= a.hd) return;
  const int ns = last / kSplitKeys + 1, tw = t - a.ws_row0;
  float M = -INFINITY;
  for (int s = 0; s < ns; ++s) M = fmaxf(M, a.part_ml[(((size_t)s * a.T + tw) * a.nq + head) * 2]);
  float L = 0.f, A = 0.f;
  for (int s = 0; s < ns; ++s) {
    const size_t rec = ((size_t)s * a.T + tw) * a.nq + head;
    const float c = expf(a.part_ml[rec * 2] - M);
    L += a.part_ml[rec * 2 + 1] * c;
    A += a.part_acc[rec * a.hd + d] * c;
  }
  a.out[(size_t)t * a.nq * a.hd + (size_t)head * a.hd + d] = L > 0.f ? A / L : 0.f;
}

template <typename C>
void launch(const TiledArgs& a, int ntiles, cudaStream_t stream) {
  const int G = a.nq / a.nkv, TQ = kTileRows / G;
  const int nsplit = (a.max_len + kSplitKeys - 1) / kSplitKeys;
  const size_t smem = sizeof(float) * smem_floats(a.hd);
  auto kern = attention_tiled_kernel<C>;
  static size_t smem_set = 0;  // the attribute is per function: raise it once to the largest size asked
  if (smem > smem_set) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    smem_set = smem;
  }
  dim3 grid(a.tiles ? ntiles : (a.T + TQ - 1) / TQ, a.nkv, nsplit);
  kern<<<grid, kThreads, smem, stream>>>(a);
  QS_LAUNCH_CHECK("attention_tiled_kernel");
  if (nsplit > 1) {
    attention_tiled_merge_kernel<<<dim3(a.tiles ? ntiles * TQ : a.T, a.nq), kMaxHd, 0, stream>>>(a);
    QS_LAUNCH_CHECK("attention_tiled_merge_kernel");
  }
}

}  // namespace

size_t attention_tiled_workspace_floats(int T, int nq, int hd, int max_len) {
  const size_t nsplit = (size_t)(max_len + kSplitKeys - 1) / kSplitKeys;
  return nsplit > 1 ? nsplit * (size_t)T * nq * (hd + 2) : 0;
}

namespace {

TiledArgs make_args(const float* qkv, int stride, int T, int t_base, int nq, int nkv, int hd, const void* kcache,
                    const void* vcache, int max_len, const int32_t* start, float* out, float* workspace,
                    size_t workspace_floats) {
  if (nkv <= 0 || nq % nkv) throw std::invalid_argument("attention: num_heads must be a multiple of num_kv_heads");
  if (nq / nkv > 8) throw std::invalid_argument("attention: at most 8 query heads per kv head are supported");
  if (hd < 1 || hd > kMaxHd) throw std::invalid_argument("attention: head_dim must be in 1..128");
  if (max_len < 1 || t_base < 0) throw std::invalid_argument("attention: max_len >= 1 and t_base >= 0 required");
  const size_t need = attention_tiled_workspace_floats(T, nq, hd, max_len);
  if (workspace_floats < need || (need && workspace == nullptr)) {
    throw std::invalid_argument("attention_tiled: the workspace needs " + std::to_string(need) + " floats, got " +
                                std::to_string(workspace_floats));
  }
  const size_t nsplit = (size_t)(max_len + kSplitKeys - 1) / kSplitKeys;
  return TiledArgs{qkv, stride, T, t_base, nq, nkv, hd, max_len, kcache, vcache, start, out, workspace,
                   workspace ? workspace + nsplit * (size_t)T * nq * hd : nullptr, 1.0f / sqrtf((float)hd),
                   nullptr, 0, 0};
}

void launch_dtype(const TiledArgs& a, int ntiles, int cache_dtype, cudaStream_t stream) {
  if (cache_dtype == kDBF16) {
    launch<__nv_bfloat16>(a, ntiles, stream);
  } else if (cache_dtype == kDF32) {
    launch<float>(a, ntiles, stream);
  } else {
    throw std::invalid_argument("attention: KV cache must be float32 or bfloat16");
  }
}

}  // namespace

void attention_tiled(const float* qkv, int stride, int T, int t_base, int nq, int nkv, int hd, const void* kcache,
                     const void* vcache, int cache_dtype, int max_len, const int32_t* start, float* out,
                     float* workspace, size_t workspace_floats, cudaStream_t stream) {
  if (T <= 0) return;
  const TiledArgs a = make_args(qkv, stride, T, t_base, nq, nkv, hd, kcache, vcache, max_len, start, out, workspace,
                                workspace_floats);
  launch_dtype(a, 0, cache_dtype, stream);
}

void attention_tiled_chunks(const float* qkv, int stride, const int32_t* tiles, int ntiles, int ws_row0, int ws_rows,
                            int nq, int nkv, int hd, const void* kpool, const void* vpool, int cache_dtype,
                            int max_len, size_t slot_stride, const int32_t* start, float* out, float* workspace,
                            size_t workspace_floats, cudaStream_t stream) {
  if (ntiles <= 0) return;
  if (ws_rows < 1 || ws_row0 < 0) throw std::invalid_argument("attention_tiled_chunks: ws_rows >= 1, ws_row0 >= 0");
  TiledArgs a = make_args(qkv, stride, ws_rows, 0, nq, nkv, hd, kpool, vpool, max_len, start, out, workspace,
                          workspace_floats);
  a.tiles = reinterpret_cast<const int4*>(tiles);
  a.slot_stride = slot_stride;
  a.ws_row0 = ws_row0;
  launch_dtype(a, ntiles, cache_dtype, stream);
}

}  // namespace qsparse
