"""Lab (issue 16): would keying the top-K on |q| instead of |x| move the built-in model's held-out loss?

The engine's contract keeps the K largest |x| (ties: the lower index), then quantizes the kept values
(quant.quantize_sparse_int8). The paper's "quantized top-K" can also be read as quantize first, then keep the K
largest |q| of the int8 codes (ties: the lower index). That order would let every selection be a single
128-bin histogram pass over int8 magnitudes, the issue's O(1) selection; this script measures what it does to
the model before anyone changes the contract (which would also need the training STE and the docs changed).
It runs the pure-PyTorch reference on the CPU, so it needs no GPU, with the |q| rule swapped in for the
duration of one measurement only (the contract itself is untouched).

    python bench/qkey_fidelity.py --sparsity 0.5 --sparsity 0.6 --sparsity 0.8 --json bench/results/qkey-fidelity-cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from qsparse_infer.bench.perplexity import windows
from qsparse_infer.cli.eval import _held_out_tokens
from qsparse_infer.engine import Engine
from qsparse_infer.model import quant
from qsparse_infer.train.data import DEFAULT_VAL_WORKS


def quantize_then_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of all of x (the same gamma: absmax is kept either way), then only the k largest |q| kept,
    ties (many: 128 levels) to the lower index."""
    q, gamma = quant.quantize_int8(x)
    if k < x.shape[-1]:
        q = torch.where(quant.topk_mask(q.float(), k), q, torch.zeros_like(q))
    return q, gamma


@contextlib.contextmanager
def keyed_on_q() -> Iterator[None]:
    """quant.bitlinear (hence every ternary projection of the reference model) selects by |q| inside."""
    original = quant.quantize_sparse_int8
    quant.quantize_sparse_int8 = quantize_then_topk
    try:
        yield
    finally:
        quant.quantize_sparse_int8 = original


def window_nll(engine: Engine, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window (fp64), as bench/perplexity.evaluate sums it, kept per window so the two rules
    can be compared pairwise (the same windows, hence a standard error of the difference)."""
    out = torch.empty(inputs.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(inputs, targets)):
            out[i] = float(F.cross_entropy(engine.logits(x).float().cpu(), y, reduction="sum"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", action="append", default=None, help="repeatable; default 0.6 (as trained)")
    ap.add_argument("--max-windows", type=int, default=None, help="at most this many windows of 512 tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for spec in args.sparsity or ["0.6"]:
        engine = Engine.load(None, device="cpu", sparsity=spec)
        if engine.config.precision != "ternary":
            print("the |q| rule is a ternary (int8 activations) question", file=sys.stderr)
            return 1
        ids, what = _held_out_tokens(engine, None, ",".join(DEFAULT_VAL_WORKS))
        inputs, targets = windows(ids, min(512, engine.config.max_seq_len), engine.tokenizer.bos_id,
                                  args.max_windows)
        per_rule = {}
        for rule in ("|x| (contract)", "|q|"):
            with keyed_on_q() if rule == "|q|" else contextlib.nullcontext():
                per_rule[rule] = window_nll(engine, inputs, targets)
            nll = float(per_rule[rule].sum()) / targets.numel()
            rows.append({"sparsity": spec, "rule": rule, "tokens": int(targets.numel()), "nll": nll,
                         "ppl": float(torch.exp(torch.tensor(nll)))})
            print(f"S={spec:<6} {rule:<16} tokens {targets.numel():>7,}  nll {nll:.4f}  ppl {rows[-1]['ppl']:.3f}",
                  flush=True)
        d = (per_rule["|q|"] - per_rule["|x| (contract)"]) / targets.shape[1]  # per token, per window
        se = float(d.std(unbiased=True)) / d.numel() ** 0.5 if d.numel() > 1 else float("nan")
        rows[-1].update(delta_nll=float(d.mean()), delta_se=se)
        print(f"S={spec}: |q| - |x| = {float(d.mean()):+.4f} +- {se:.4f} nats per token (paired over "
              f"{d.numel()} windows; {what})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "built-in", "device": "cpu", "windows": args.max_windows, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
