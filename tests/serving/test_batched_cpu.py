"""CPU checks of the batched-decode pieces that need no GPU: the torch peer's batch dimension, the runner's
path policy and seed handling, and ternary_linear's path override validation."""
from __future__ import annotations

import pytest
import torch

from qsparse_infer.kernels import linear as lk
from qsparse_infer.model.config import ModelConfig
from qsparse_infer.serving.gpu_runner import BUCKETS, LinearPolicy, _signed64
from qsparse_infer.bench.torch_peer import TorchPeer

CFG = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_seq_len=64, rope_theta=10000.0, activation="relu2", attn_sub_norm=True,
                  ffn_sub_norm=True, tie_word_embeddings=True)


def test_torch_peer_batch_rows_equal_single():
    """Each sequence of a batch gets exactly the single-sequence peer's logits and greedy steps (fp32, CPU)."""
    single = TorchPeer(CFG, 40, device="cpu", dtype=torch.float32)
    batched = TorchPeer(CFG, 40, device="cpu", dtype=torch.float32, batch=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (3, 10), generator=g)
    pos = torch.arange(10)
    many = batched.forward(ids, pos)
    assert many.shape == (3, 10, CFG.vocab_size)
    for b in range(3):
        assert torch.allclose(single.forward(ids[b], pos), many[b], rtol=1e-5, atol=1e-5)
    first = batched.prefill(ids)
    assert first == [single.prefill(ids[b]) for b in range(3)]
    nxt = batched._step(torch.tensor(first).view(3, 1), torch.tensor([10]))
    for b in range(3):
        single.prefill(ids[b])
        assert int(nxt[b]) == int(single._step(torch.tensor([[first[b]]]), torch.tensor([10])))


def test_linear_policy_paths():
    p = LinearPolicy()
    assert [p.path(b) for b in (1, 2, 8, 16, 17, 64)] == ["t1", "gemm", "gemm", "gemm", "gemm", "gemm"]
    p = LinearPolicy(gemv_max_rows=16, t1_single_row=False)
    assert [p.path(b) for b in (1, 2, 16, 17)] == ["gemv", "gemv", "gemv", "gemm"]
    assert list(BUCKETS[:7]) == [1, 2, 4, 8, 16, 32, 64]


def test_signed64_keeps_the_bits():
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1):
        s = _signed64(seed)
        assert -(2**63) <= s < 2**63
        assert s & (2**64 - 1) == seed & (2**64 - 1)


def test_ternary_linear_rejects_unknown_path():
    w = lk.PackedTernary.from_ternary([torch.zeros(8, 16, dtype=torch.int8)], [1.0], device="cpu")
    with pytest.raises(ValueError, match="_path"):
        lk.ternary_linear(torch.zeros(2, 16), w, 4, _path="union")
