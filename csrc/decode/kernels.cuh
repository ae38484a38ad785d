// Decoder kernels: embedding gather, RMSNorm, RoPE + KV append, attention (causal prefill; batched
// split-K decode), LM head GEMV, GPU sampling. Framework-free: raw device pointers and a cudaStream_t.
// Every position-dependent kernel reads the position from a device buffer so a captured CUDA graph
// replays correctly step after step.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/common.cuh"

namespace qsparse {

// Element types a table / cache may have. Activations are always fp32 here (never fp16).
enum DecodeDType : int { kDF32 = 0, kDBF16 = 1, kDF16 = 2 };

// out[t, :] = float(table[ids[t], :]); ids are int32 on the device. An id outside [0, V) writes NaN
// (the host validates ids first; NaN makes any slip loud instead of reading out of bounds).
void embedding_gather(const void* table, int dtype, const int32_t* ids, int T, int H, int V, float* out,
                      cudaStream_t stream);

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w  (fp32; w fp32). out may alias x.
void rmsnorm(const float* x, const float* w, float* out, int T, int H, float eps, cudaStream_t stream);

// qkv [T, stride] fp32 holds q (nq*hd) | k (nkv*hd) | v (nkv*hd) per token. Rotates q in place and
// writes rotated k and v into the layer's caches [nkv, max_len, hd] at positions *start + t.
// cos/sin tables are [max_len, hd/2] fp32 (the first half of reference.rope_cos_sin's rows).
void rope_append(float* qkv, int stride, int T, int nq, int nkv, int hd, const float* cos_t, const float* sin_t,
                 const int32_t* start, void* kcache, void* vcache, int cache_dtype, int max_len,
                 cudaStream_t stream);

// Causal GQA attention for T queries at positions *start + t (query t sees keys 0 .. *start + t), one
// block per (kv head, query): the prefill path. q: rows of qkv (stride), already rotated. out [T, nq*hd].
void attention(const float* qkv, int stride, int T, int nq, int nkv, int hd, const void* kcache,
               const void* vcache, int cache_dtype, int max_len, const int32_t* start, float* out,
               cudaStream_t stream);

// Variant 2 of the prefill attention (csrc/decode/attention_tiled.cu): tiles of 64 query rows x splits of 512
// keys, merged in split order; query t at position *start + t_base + t. A query's bits depend only on its
// position and the cache, not on T, t_base or the chunking. workspace: attention_tiled_workspace_floats(T, ...)
// floats (0 when max_len <= 512).
size_t attention_tiled_workspace_floats(int T, int nq, int hd, int max_len);
void attention_tiled(const float* qkv, int stride, int T, int t_base, int nq, int nkv, int hd, const void* kcache,
                     const void* vcache, int cache_dtype, int max_len, const int32_t* start, float* out,
                     float* workspace, size_t workspace_floats, cudaStream_t stream);
// Several prompts' chunks of one serving step in one launch: tiles int32 [ntiles][4] = (first row, tokens <= the
// tile's 64 / G, slot, position offset of the first row within its chunk), a row at position start[slot] + offset
// + j over cache slot `slot` (pools [num_slots][nkv][max_len][hd], slot_stride = nkv * max_len * hd). qkv and out
// are indexed by absolute row; the workspace holds ws_rows rows from ws_row0 (every tile's rows in that range).
// Each query gets the bits that attention_tiled gives it.
void attention_tiled_chunks(const float* qkv, int stride, const int32_t* tiles, int ntiles, int ws_row0, int ws_rows,
                            int nq, int nkv, int hd, const void* kpool, const void* vpool, int cache_dtype,
                            int max_len, size_t slot_stride, const int32_t* start, float* out, float* workspace,
                            size_t workspace_floats, cudaStream_t stream);

// Batched decode (csrc/decode/attention_batch.cu). Caches [num_slots, nkv, max_len, hd]; row b of qkv
// [B, stride] is at position positions[b] of cache slot slots[b] (both int32 on the device).
// rope_append_batch: rotate q of row b in place, write rotated k and v at (slots[b], positions[b]).
void rope_append_batch(float* qkv, int stride, int B, int nq, int nkv, int hd, const float* cos_t,
                       const float* sin_t, const int32_t* positions, const int32_t* slots, void* kcache,
                       void* vcache, int cache_dtype, int num_slots, int max_len, cudaStream_t stream);
// attention_decode: row b attends over positions [0, positions[b]] of its slot; out [B, nq*hd] fp32.
// Split-K over min(max_splits, ceil(len / min_chunk)) blocks per (row, kv head), merged by the last block
// to arrive. ws: B*nq*max_splits*(roundup(hd, 4) + 4) floats (16-byte aligned); counters: B*nkv ints,
// zero on entry, left zero on exit.
// A row with a negative position or a slot outside [0, num_slots) gets NaN output.
// cos_t/sin_t [>= max_len, hd/2] (both or neither): fuse rope_append_batch in (q rotated on the fly, qkv
// left as it is; the rotated k and v stored at the row's position and attended with). Bit-identical to
// rope_append_batch followed by the unfused call.
void attention_decode(const float* qkv, int stride, int B, int nq, int nkv, int hd, void* kcache, void* vcache,
                      int cache_dtype, int num_slots, int max_len, const int32_t* positions, const int32_t* slots,
                      const float* cos_t, const float* sin_t, float* out, float* ws, int* counters, int max_splits,
                      int min_chunk, cudaStream_t stream);

// logits[t, v] = sum_h xn[t, h] * W[v, h], with xn = RMSNorm(x) * norm_w when norm_w != nullptr, else x.
// W [V, H] bf16/fp16/fp32; fp32 accumulation. Up to 16 rows share one pass over W (batched decode); a
// row's logits are bit-identical whatever T is (same per-row operation order, explicit fma/rounding).
void lm_head(const float* x, const float* norm_w, float eps, const void* W, int wdtype, int T, int V, int H,
             float* logits, cudaStream_t stream);

// The tensor-core head for batched decode (decode_head_mma.cu): W bf16 [V, H] with H % 128 == 0 (see
// lm_head_mma_supported), any T; ws: 2*T*H bf16 of scratch (16-byte aligned) for xn split into hi + lo.
// A row's logits are bit-identical whatever T is; they agree with lm_head to ~1e-5 relative.
bool lm_head_mma_supported(int H);
void lm_head_mma(const float* x, const float* norm_w, float eps, const void* W, int T, int V, int H,
                 float* logits, void* ws, cudaStream_t stream);

// The int8 head (decode_head_int8.cu): logits[t, v] = scales[v] * sum_h xn[t, h] * float(Q[v, h]), xn as above,
// Q [V, H] int8 (per-row absmax, values in [-127, 127]), scales [V] fp32; fp32 accumulation.
void lm_head_int8(const float* x, const float* norm_w, float eps, const int8_t* Q, const float* scales, int T, int V,
                  int H, float* logits, cudaStream_t stream);

// One sampled token from logits [V] (see qsparse_infer/generate/sampling.py for the exact rules, mirrored on the CPU):
// repetition penalty on tokens marked in seen, greedy when temperature <= 0, else top-k / top-p threshold
// and a Gumbel-max draw with a counter-based hash of (seed, step, index).
// fparams: {temperature, top_p, repetition_penalty}; iparams: {top_k}; rng: {seed, step} (step += 1).
// Writes token[0], seen[token] = 1, history[*pos + advance] = token (if < hist_len), *pos += advance.
void sample(const float* logits, int V, uint8_t* seen, const float* fparams, const int32_t* iparams, int64_t* rng,
            int32_t* pos, int advance, int32_t* token, int32_t* history, int hist_len, cudaStream_t stream);

// B rows in one launch (one block per row), same rules and random numbers as sample(): row b samples from
// logits [b, :] with the state of sequence r = slots[b] (slots == nullptr: r = b): seen [r, V], fparams [r, 3],
// iparams [r], rng [r, 2], pos [r], token [r], history [r, hist_len] (history may be nullptr). Rows that
// share r (padding rows of a batched step) race on that state: give them a scratch sequence.
// counts [r, V] int32 (may be nullptr): how often each token was generated (counts[r][token] += 1); with
// penalties [r, 2] = {presence, frequency} (may be nullptr), OpenAI's additive penalties after the repetition
// penalty: x -= frequency * counts + presence * (counts > 0), in fp32 without contraction (the CPU's bits).
void sample_batch(const float* logits, int B, int V, const int32_t* slots, uint8_t* seen, const float* fparams,
                  const int32_t* iparams, int64_t* rng, int32_t* pos, int advance, int32_t* token, int32_t* history,
                  int hist_len, int32_t* counts, const float* penalties, cudaStream_t stream);

}  // namespace qsparse
