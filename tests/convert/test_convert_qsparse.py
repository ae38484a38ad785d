"""The training tool's checkpoint layout (QSparseForCausalLM) converts to the same model the latent weights define."""
from __future__ import annotations

import pytest
import torch
from builders import make_qsparse_folder, sentencepiece_model, tiny_config

import qsparse_infer
from qsparse_infer import Engine
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.quant import ternarize_absmean
from qsparse_infer.model.reference import Transformer


@pytest.mark.parametrize("tied, sub_norms", [(False, True), (True, False)])
def test_qsparse_checkpoint(tmp_path, tied, sub_norms):
    cfg = tiny_config(vocab_size=400, tie_word_embeddings=tied, attn_sub_norm=sub_norms, ffn_sub_norm=sub_norms,
                      activation="silu")
    recorded = SparsityConfig(attn=0.5, o=0.25, mlp=0.6, down=0.4)
    src, sd = make_qsparse_folder(tmp_path / "ckpt", cfg, recorded)
    dst = qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)
    engine = Engine.load(dst, device="cpu")
    assert engine.config == cfg and engine.sparsity == recorded
    assert engine.tokenizer.kind == "sentencepiece" and engine.file.tokenizer_bytes == sentencepiece_model()

    # Independent expectation: the reference model with the latent weights ternarized here.
    want = Transformer(cfg, recorded)
    with torch.no_grad():
        want.embed.copy_(sd["embed"])
        want.norm.weight.copy_(sd["norm.weight"])
        if not tied:
            want.lm_head.copy_(sd["lm_head"])
        for name, buf in list(want.named_parameters()) + list(want.named_buffers()):
            if name.endswith(".ternary"):
                t, beta = ternarize_absmean(sd[name[: -len("ternary")] + "weight"])
                buf.copy_(t)
                dict(want.named_buffers())[name[: -len("ternary")] + "beta"].fill_(float(beta))
            elif name in sd and name not in ("embed", "lm_head", "norm.weight"):
                buf.copy_(sd[name])
    ids = engine.tokenizer.encode("The king and the queen, by the river.")
    with torch.no_grad():
        assert torch.equal(engine.logits(ids), want(torch.tensor(ids)))
