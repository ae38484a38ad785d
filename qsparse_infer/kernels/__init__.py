"""Python wrappers of the CUDA kernels, framework-free below them: `_ext` (the compiled `_C`, with clear errors
where it or a GPU is missing), `linear` (packing, int8 quantize + top-K, ternary GEMV/GEMM), `decode` (norms,
embedding, RoPE + KV append, attention, LM heads, sampling) and `ceilings` (the streaming-read ceiling).
They take tensors and know no model: nothing here imports `model/` or anything above it."""
