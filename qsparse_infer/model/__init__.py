"""The model's spec and its file, with no GPU code: `config` (ModelConfig, SparsityConfig, top-K counts),
`quant` (the quantization math every kernel matches), `reference` (the pure-PyTorch Transformer, the source of
truth), `format` (the engine file's reader and writer), `tokenizer`, `head_int8` (the opt-in int8 LM head) and
`random_model` (random weights of benchmark shapes). Imports nothing of the package above `packing` and
`atomic_io`."""
