"""The |q|-keyed top-K of the lab script bench/qkey_fidelity.py (issue 16): quantize first, keep the k largest
int8 magnitudes with ties to the lower index, and the swap into the reference is undone afterwards."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from qsparse_infer.model import quant

_PATH = Path(__file__).resolve().parents[2] / "bench" / "qkey_fidelity.py"
_spec = importlib.util.spec_from_file_location("qkey_fidelity", _PATH)
qkey = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qkey)


def test_keeps_the_k_largest_codes_ties_to_the_lower_index():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 301, generator=gen)
    k = 120
    q, gamma = qkey.quantize_then_topk(x, k)
    full, gamma_full = quant.quantize_int8(x)
    assert torch.equal(gamma, gamma_full)
    for row in range(3):
        kept = q[row] != 0
        # the reference order: |code| descending, then index ascending (a stable sort of the codes)
        order = torch.sort(full[row].abs().int(), descending=True, stable=True).indices[:k]
        want = torch.zeros(301, dtype=torch.bool)
        want[order] = True
        assert torch.equal(kept | (want & (full[row] == 0)), want)  # a kept zero code stays 0
        assert torch.equal(q[row][want], full[row][want])


def test_differs_from_the_contract_only_where_codes_tie():
    x = torch.tensor([[1.0, 0.999, 0.5, -0.998, 0.1]])  # 1.0, 0.999 and 0.998 all quantize to |q| = 127
    q_x, _ = quant.quantize_sparse_int8(x, 2)
    q_q, _ = qkey.quantize_then_topk(x, 2)
    assert q_x.tolist() == [[127, 127, 0, 0, 0]]
    assert q_q.tolist() == [[127, 127, 0, 0, 0]]  # lower index wins among the tied codes
    x2 = torch.tensor([[0.998, 0.5, 1.0, 0.999]])  # |x| keeps channels 2 and 3, |q| the first two 127s
    assert quant.quantize_sparse_int8(x2, 2)[0].tolist() == [[0, 0, 127, 127]]
    assert qkey.quantize_then_topk(x2, 2)[0].tolist() == [[127, 0, 127, 0]]


def test_the_swap_is_undone():
    original = quant.quantize_sparse_int8
    with qkey.keyed_on_q():
        assert quant.quantize_sparse_int8 is qkey.quantize_then_topk
    assert quant.quantize_sparse_int8 is original
    try:
        with qkey.keyed_on_q():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert quant.quantize_sparse_int8 is original
