"""The reference model: KV-cache decode equals the full-sequence forward (dense and sparse)."""
from __future__ import annotations

import pytest
import torch
from builders import random_reference, tiny_config

from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.reference import KVCache


@pytest.mark.parametrize("sparsity, tied, act", [
    (SparsityConfig(), False, "relu2"),
    (SparsityConfig(attn=0.5, o=0.3, mlp=0.6, down=0.4), True, "silu"),
    (SparsityConfig(attn=0.25, o=0.25, mlp=0.25, down=0.25, lm_head=0.5), False, "relu2"),
])
def test_kv_cache_decode_equals_full_forward(sparsity, tied, act):
    cfg = tiny_config(tie_word_embeddings=tied, activation=act, num_kv_heads=2)
    model = random_reference(cfg, seed=2, sparsity=sparsity)
    ids = torch.randint(0, cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(cfg, cfg.max_seq_len)
        parts = [model(ids[:5], cache, 0)]  # prefill 5 tokens, then decode one at a time
        for t in range(5, len(ids)):
            parts.append(model(ids[t:t + 1], cache, t))
        assert cache.length == len(ids)
    stepped = torch.cat(parts)
    assert stepped.shape == full.shape == (13, cfg.vocab_size)
    # Same math on different matmul shapes: equal up to fp32 rounding.
    assert float((stepped - full).norm() / full.norm()) < 1e-5


def test_sparsity_sets_topk_per_group():
    cfg = tiny_config()
    model = random_reference(cfg, sparsity=SparsityConfig(attn=0.5, o=0.25, mlp=0.75, down=0.1))
    ks = {name: lin.k for i, name, lin in model.projections() if i == 0}
    assert ks == {"q": 32, "k": 32, "v": 32, "o": 48, "gate": 16, "up": 16, "down": 86}
