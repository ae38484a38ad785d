"""Issue 10 on the GPU decoder: a temperature at or below 1e-39 acts greedy instead of overflowing."""
from __future__ import annotations

import pytest
import torch
from builders import VOCAB
from conftest import requires_gpu

from qsparse_infer.model.config import ModelConfig, SparsityConfig
from qsparse_infer.engine import Engine
from qsparse_infer.model.format import write_engine
from qsparse_infer.generate.generation import generate_tokens
from qsparse_infer.model.random_model import random_tensors

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-7])
def test_tiny_temperature_is_greedy_on_the_gpu(tmp_path, temperature):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=224, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_seq_len=64, activation="relu2")
    path = write_engine(tmp_path / "t.qsp", cfg, SparsityConfig.uniform(0.4),
                        random_tensors(cfg, seed=5, float_dtype=torch.bfloat16, embed_std=0.5))
    eng = Engine.load(path, device="cuda")
    greedy = list(generate_tokens(eng, [3, 7, 11], max_new_tokens=24, temperature=0, stop_at_eos=False))
    tiny = list(generate_tokens(eng, [3, 7, 11], max_new_tokens=24, temperature=temperature, seed=9,
                                stop_at_eos=False))
    assert tiny == greedy
