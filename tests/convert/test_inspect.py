"""`qsparse inspect`: sizes and bytes read per token, checked against a count done by hand."""
from __future__ import annotations

from builders import engine_tensors, random_reference, tiny_config

from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.format import read_engine, write_engine
from qsparse_infer.convert.inspect import bytes_per_token, report, size_table


def test_bytes_per_token_by_hand(tmp_path):
    # H=64, q=64, kv=2*16=32, M=96, V=100, 2 layers, untied fp32 head.
    cfg = tiny_config(vocab_size=100)
    sp = SparsityConfig(attn=0.5, o=0.25, mlp=0.75, down=0.5, lm_head=0.5)
    path = write_engine(tmp_path / "m.qsp", cfg, sp, engine_tensors(random_reference(cfg)))
    ef = read_engine(path)
    # packed row bytes: qkv 64+16+16=96 -> 128 cols = 32 B; o 64 -> 16 B; gate_up 2*96=192 -> 48 B; down 64 -> 16 B
    want = {"qkv": 2 * (32 * 32 + 12), "o": 2 * (48 * 16 + 4), "gate_up": 2 * (16 * 48 + 8),
            "down": 2 * (48 * 16 + 4), "norms": 4 * (64 + 2 * (64 + 64 + 64 + 96)),
            "embedding row": 64 * 4, "lm_head": 100 * 32 * 4}
    assert dict(bytes_per_token(ef, sp)) == want
    dense = bytes_per_token(ef, SparsityConfig())
    assert dense["qkv"] == 2 * (64 * 32 + 12) and dense["lm_head"] == 100 * 64 * 4
    table = size_table(ef)
    assert table["qkv"] == (4, 2 * (64 * 32 + 12)) and table["lm_head"] == (1, 100 * 64 * 4)
    assert sum(b for _, b in table.values()) == ef.nbytes()
    text = report(ef, str(path))
    assert "attn=0.5, o=0.25, mlp=0.75, down=0.5, lm_head=0.5" in text and "of dense" in text
