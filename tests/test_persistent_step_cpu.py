"""What the persistent decode step refuses before it needs the GPU (gpu/persistent.unsupported_for)."""
from __future__ import annotations

import torch

from qsparse_infer.gpu.persistent import unsupported_for
from qsparse_infer.gpu.weights import TopK
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.random_model import SHAPES


def test_full_precision_models_run_the_multi_kernel_step():
    cfg = SHAPES["llama8b-bf16"]
    why = unsupported_for(cfg, TopK.of(cfg, SparsityConfig.uniform(0.5)), torch.bfloat16)
    assert why is not None and "ternary models only" in why


def test_distinct_gate_and_up_counts_are_refused():
    cfg = SHAPES["2b4t"]
    k = TopK.of(cfg, SparsityConfig(attn=0.5, o=0.5, mlp=0.6, down=0.5, up=0.4))
    assert isinstance(k.gate_up, tuple)
    why = unsupported_for(cfg, k, torch.bfloat16)
    assert why is not None and "one top-K count" in why
