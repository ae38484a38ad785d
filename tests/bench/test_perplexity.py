"""`qsparse eval` and its measure (bench/perplexity.py): the windows are the trainer's validation windows, the
NLL is the mean cross-entropy of engine.logits, and the command prints one row per sparsity."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qsparse_infer import Engine
from qsparse_infer.bench.perplexity import evaluate, windows
from qsparse_infer.cli.main import main
from qsparse_infer.train.data import TokenStream

pytestmark = pytest.mark.filterwarnings("ignore:.*CPU")


@pytest.mark.parametrize("bos", [1, None])
def test_windows_are_the_trainers(bos):
    tokens = torch.randint(3, 100, (1000,), generator=torch.Generator().manual_seed(0))
    x, y = windows(tokens, 64, bos)
    ex, ey = TokenStream(tokens, 64, bos).windows()
    assert torch.equal(x, ex) and torch.equal(y, ey)
    assert torch.equal(windows(tokens, 64, bos, max_windows=3)[0], ex[:3])
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(tokens[:10], 64, bos)


class _Fixed:
    """An engine-like object with known logits."""

    def __init__(self, vocab: int) -> None:
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1))

    def logits(self, ids):
        return self.table[torch.as_tensor(ids)]


def test_evaluate_is_the_mean_cross_entropy():
    eng = _Fixed(50)
    x, y = windows(torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(2)), 20, 0)
    r = evaluate(eng, x, y, progress=False)
    expected = F.cross_entropy(eng.table[x.reshape(-1)], y.reshape(-1)).item()
    assert r.tokens == y.numel() and r.nll == pytest.approx(expected, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(expected)) and r.tokens_per_s > 0


def test_eval_command_rows_per_sparsity(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20)
    out = tmp_path / "e.json"
    assert main(["eval", "--text", str(text), "--window", "32", "--max-windows", "2", "--device", "cpu",
                 "--sparsity", "0", "--sparsity", "0.6", "--json", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "2 windows of 32" in lines[0]
    rows = json.loads(out.read_text())["rows"]
    assert [r["sparsity"]["attn"] for r in rows] == [0.0, 0.6]
    engine = Engine.load(device="cpu", sparsity=0.6)
    ids = engine.tokenizer.encode(text.read_text(), add_bos=False)
    x, y = windows(ids, 32, engine.tokenizer.bos_id, 2)
    assert rows[1]["nll"] == pytest.approx(evaluate(engine, x, y, progress=False).nll, rel=1e-6)


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    assert main(["eval", "--text", str(tmp_path / "missing.txt"), "--device", "cpu"]) == 1
    assert "is not a file" in capsys.readouterr().err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    assert main(["eval", "--text", str(tmp_path / "bin.txt"), "--device", "cpu"]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert main(["eval", "--window", "4096", "--device", "cpu", "--max-windows", "1"]) == 1
    assert "exceeds the model's context of 512" in capsys.readouterr().err
