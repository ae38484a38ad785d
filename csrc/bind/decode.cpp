// Python bindings of the decoder kernels. Pointers and the stream are plain integers (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); qsparse_infer/kernels/decode.py validates tensors first.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "common/common.cuh"
#include "decode/kernels.cuh"

namespace py = pybind11;

namespace qsparse {

namespace {
template <typename T>
T* p(uintptr_t v) {
  return reinterpret_cast<T*>(v);
}
}  // namespace

void register_decode(py::module_& m) {
  m.def(
      "embedding_gather",
      [](uintptr_t table, int dtype, uintptr_t ids, int T, int H, int V, uintptr_t out, uintptr_t stream) {
        require_gpu();
        embedding_gather(p<const void>(table), dtype, p<const int32_t>(ids), T, H, V, p<float>(out),
                         as_stream(stream));
      },
      "out[t] = float(table[ids[t]])");
  m.def(
      "rmsnorm",
      [](uintptr_t x, uintptr_t w, uintptr_t out, int T, int H, float eps, uintptr_t stream) {
        require_gpu();
        rmsnorm(p<const float>(x), p<const float>(w), p<float>(out), T, H, eps, as_stream(stream));
      },
      "fp32 RMSNorm over rows of x");
  m.def(
      "rope_append",
      [](uintptr_t qkv, int stride, int T, int nq, int nkv, int hd, uintptr_t cos_t, uintptr_t sin_t,
         uintptr_t start, uintptr_t kc, uintptr_t vc, int cache_dtype, int max_len, uintptr_t stream) {
        require_gpu();
        rope_append(p<float>(qkv), stride, T, nq, nkv, hd, p<const float>(cos_t), p<const float>(sin_t),
                    p<const int32_t>(start), p<void>(kc), p<void>(vc), cache_dtype, max_len, as_stream(stream));
      },
      "rotate q in place, write rotated k and v into the KV cache at *start + t");
  m.def(
      "attention",
      [](uintptr_t qkv, int stride, int T, int nq, int nkv, int hd, uintptr_t kc, uintptr_t vc, int cache_dtype,
         int max_len, uintptr_t start, uintptr_t out, uintptr_t stream) {
        require_gpu();
        attention(p<const float>(qkv), stride, T, nq, nkv, hd, p<const void>(kc), p<const void>(vc), cache_dtype,
                  max_len, p<const int32_t>(start), p<float>(out), as_stream(stream));
      },
      "causal GQA attention of T query tokens over the KV cache (prefill)");
  m.def("attention_tiled_workspace_floats", &attention_tiled_workspace_floats,
        "fp32 workspace of attention_tiled for T query tokens (0 when one key split covers max_len)");
  m.def(
      "attention_tiled",
      [](uintptr_t qkv, int stride, int T, int t_base, int nq, int nkv, int hd, uintptr_t kc, uintptr_t vc,
         int cache_dtype, int max_len, uintptr_t start, uintptr_t out, uintptr_t ws, size_t ws_floats,
         uintptr_t stream) {
        require_gpu();
        attention_tiled(p<const float>(qkv), stride, T, t_base, nq, nkv, hd, p<const void>(kc), p<const void>(vc),
                        cache_dtype, max_len, p<const int32_t>(start), p<float>(out), p<float>(ws), ws_floats,
                        as_stream(stream));
      },
      "causal GQA prefill attention, variant 2: query tiles x key splits (query t at *start + t_base + t)");
  m.def(
      "attention_tiled_chunks",
      [](uintptr_t qkv, int stride, uintptr_t tiles, int ntiles, int ws_row0, int ws_rows, int nq, int nkv, int hd,
         uintptr_t kpool, uintptr_t vpool, int cache_dtype, int max_len, size_t slot_stride, uintptr_t start,
         uintptr_t out, uintptr_t ws, size_t ws_floats, uintptr_t stream) {
        require_gpu();
        if (ntiles > 0 && (!qkv || !tiles || !kpool || !vpool || !start || !out)) {
          throw std::invalid_argument("attention_tiled_chunks: null device pointer");
        }
        attention_tiled_chunks(p<const float>(qkv), stride, p<const int32_t>(tiles), ntiles, ws_row0, ws_rows, nq,
                               nkv, hd, p<const void>(kpool), p<const void>(vpool), cache_dtype, max_len, slot_stride,
                               p<const int32_t>(start), p<float>(out), p<float>(ws), ws_floats, as_stream(stream));
      },
      "variant 2 over several prompts' chunks in one launch (tiles int32 [n][4]: row, tokens, slot, offset)");
  m.def(
      "rope_append_batch",
      [](uintptr_t qkv, int stride, int B, int nq, int nkv, int hd, uintptr_t cos_t, uintptr_t sin_t,
         uintptr_t positions, uintptr_t slots, uintptr_t kc, uintptr_t vc, int cache_dtype, int num_slots,
         int max_len, uintptr_t stream) {
        require_gpu();
        if (B > 0 && (!qkv || !cos_t || !sin_t || !positions || !slots || !kc || !vc)) {
          throw std::invalid_argument("rope_append_batch: null device pointer");
        }
        rope_append_batch(p<float>(qkv), stride, B, nq, nkv, hd, p<const float>(cos_t), p<const float>(sin_t),
                          p<const int32_t>(positions), p<const int32_t>(slots), p<void>(kc), p<void>(vc),
                          cache_dtype, num_slots, max_len, as_stream(stream));
      },
      "row b: rotate q in place, write rotated k and v into cache slot slots[b] at positions[b]");
  m.def(
      "attention_decode",
      [](uintptr_t qkv, int stride, int B, int nq, int nkv, int hd, uintptr_t kc, uintptr_t vc, int cache_dtype,
         int num_slots, int max_len, uintptr_t positions, uintptr_t slots, uintptr_t cos_t, uintptr_t sin_t,
         uintptr_t out, uintptr_t ws, uintptr_t counters, int max_splits, int min_chunk, uintptr_t stream) {
        require_gpu();
        if (B > 0 && (!qkv || !kc || !vc || !positions || !slots || !out)) {
          throw std::invalid_argument("attention_decode: null device pointer");
        }
        attention_decode(p<const float>(qkv), stride, B, nq, nkv, hd, p<void>(kc), p<void>(vc), cache_dtype,
                         num_slots, max_len, p<const int32_t>(positions), p<const int32_t>(slots),
                         p<const float>(cos_t), p<const float>(sin_t), p<float>(out), p<float>(ws), p<int>(counters),
                         max_splits, min_chunk, as_stream(stream));
      },
      "batched split-K decode attention: row b over positions [0, positions[b]] of cache slot slots[b]; "
      "cos_t/sin_t (0 = none) fuse RoPE + KV append in");
  m.def(
      "lm_head",
      [](uintptr_t x, uintptr_t norm_w, float eps, uintptr_t W, int wdtype, int T, int V, int H, uintptr_t logits,
         uintptr_t stream) {
        require_gpu();
        lm_head(p<const float>(x), p<const float>(norm_w), eps, p<const void>(W), wdtype, T, V, H, p<float>(logits),
                as_stream(stream));
      },
      "logits = RMSNorm(x) @ W^T (norm skipped when norm_w == 0)");
  m.def(
      "lm_head_mma",
      [](uintptr_t x, uintptr_t norm_w, float eps, uintptr_t W, int T, int V, int H, uintptr_t logits, uintptr_t ws,
         uintptr_t stream) {
        require_gpu();
        lm_head_mma(p<const float>(x), p<const float>(norm_w), eps, p<const void>(W), T, V, H, p<float>(logits),
                    p<void>(ws), as_stream(stream));
      },
      "logits = RMSNorm(x) @ W^T on tensor cores, W bf16 [V, H], H % 32 == 0; ws: 2*T*H bf16 scratch");
  m.def("lm_head_mma_supported", &lm_head_mma_supported, "Whether the tensor-core head serves hidden size H.");
  m.def(
      "lm_head_int8",
      [](uintptr_t x, uintptr_t norm_w, float eps, uintptr_t Q, uintptr_t scales, int T, int V, int H,
         uintptr_t logits, uintptr_t stream) {
        require_gpu();
        lm_head_int8(p<const float>(x), p<const float>(norm_w), eps, p<const int8_t>(Q), p<const float>(scales), T, V,
                     H, p<float>(logits), as_stream(stream));
      },
      "logits = scales * (RMSNorm(x) @ Q^T), Q int8 [V, H] (norm skipped when norm_w == 0)");
  m.def(
      "sample",
      [](uintptr_t logits, int V, uintptr_t seen, uintptr_t fparams, uintptr_t iparams, uintptr_t rng, uintptr_t pos,
         int advance, uintptr_t token, uintptr_t history, int hist_len, uintptr_t stream) {
        require_gpu();
        sample(p<const float>(logits), V, p<uint8_t>(seen), p<const float>(fparams), p<const int32_t>(iparams),
               p<int64_t>(rng), p<int32_t>(pos), advance, p<int32_t>(token), p<int32_t>(history), hist_len,
               as_stream(stream));
      },
      "sample one token on the GPU (greedy / temperature / top-k / top-p / repetition penalty)");
  m.def(
      "sample_batch",
      [](uintptr_t logits, int B, int V, uintptr_t slots, uintptr_t seen, uintptr_t fparams, uintptr_t iparams,
         uintptr_t rng, uintptr_t pos, int advance, uintptr_t token, uintptr_t history, int hist_len,
         uintptr_t counts, uintptr_t penalties, uintptr_t stream) {
        require_gpu();
        sample_batch(p<const float>(logits), B, V, p<const int32_t>(slots), p<uint8_t>(seen), p<const float>(fparams),
                     p<const int32_t>(iparams), p<int64_t>(rng), p<int32_t>(pos), advance, p<int32_t>(token),
                     p<int32_t>(history), hist_len, p<int32_t>(counts), p<const float>(penalties),
                     as_stream(stream));
      },
      "sample one token per row on the GPU, each row with the state of sequence slots[b] (one block per row); "
      "counts / penalties (0 = none): generated-token counts and OpenAI's presence/frequency penalties");
}

}  // namespace qsparse
