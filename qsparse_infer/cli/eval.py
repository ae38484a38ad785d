"""`qsparse eval [MODEL] [--text FILE] [--sparsity S ...]`: held-out perplexity and tokens/s, one row per sparsity.

Without --text it reads the works held out from the shipped Shakespeare corpus (train/data.py: the split the
built-in model's validation loss was measured on; each work starts with BOS, as in training). --sparsity may be
given several times (each one ratio, four, five or named ratios, as `qsparse convert` takes them); the default is
the file's own. Windows and the measure: bench/perplexity.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..bench.perplexity import evaluate, save_table, windows
from ..engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.data import DEFAULT_VAL_WORKS

    p.add_argument("model", nargs="?", default=None, help="engine file (default: the built-in model)")
    p.add_argument("--text", default=None,
                   help="a UTF-8 text file to measure on (default: the held-out works of --corpus)")
    p.add_argument("--corpus", default=None,
                   help="corpus whose held-out works are measured when no --text is given (default: the shipped "
                        "Shakespeare corpus)")
    p.add_argument("--val-works", default=",".join(DEFAULT_VAL_WORKS),
                   help="the held-out works of --corpus (default: %(default)s, as `qsparse train`)")
    p.add_argument("--sparsity", action="append", default=None,
                   help="a sparsity to measure at (repeatable: one table row each; default: the file's)")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: the model's context, at most 512)")
    p.add_argument("--max-windows", type=int, default=None, help="measure at most this many windows")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if there is one, else the CPU")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _held_out_tokens(engine: Engine, corpus: str | None, val_works: str) -> tuple[list[int], str]:
    from ..train import data as td

    works = td.load_works(corpus or td.BUILTIN_CORPUS)
    _, val = td.split_works(works, [n.strip() for n in val_works.split(",") if n.strip()])
    bos = engine.tokenizer.bos_id
    ids: list[int] = []
    for w in val:
        ids += ([bos] if bos is not None else []) + engine.tokenizer.encode(w.text, add_bos=False)
    return ids, "held-out works " + ", ".join(w.name for w in val)


def _text_tokens(engine: Engine, path: str) -> tuple[list[int], str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text: {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return engine.tokenizer.encode(text, add_bos=False), p.name


def run(args: argparse.Namespace) -> int:
    if args.window is not None and args.window < 2:
        raise ValueError(f"--window must be at least 2, got {args.window}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be positive, got {args.max_windows}")
    specs = args.sparsity or [None]
    first = Engine.load(args.model, device=args.device, sparsity=specs[0])
    if first.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot read a text")
    ids, what = (_text_tokens(first, args.text) if args.text
                 else _held_out_tokens(first, args.corpus, args.val_works))
    cfg = first.config
    window = args.window or min(512, cfg.max_seq_len)
    if window > cfg.max_seq_len:
        raise ValueError(f"--window {window} exceeds the model's context of {cfg.max_seq_len}")
    inputs, targets = windows(ids, window, first.tokenizer.bos_id, args.max_windows)
    name = args.model or "built-in model"
    print(f"{name} ({cfg.precision}, {cfg.num_layers} layers, hidden {cfg.hidden_size}) on {first.device}; "
          f"{what}: {len(ids):,} tokens, {inputs.shape[0]} windows of {window}", flush=True)
    print(f"{'sparsity':<52} {'tokens':>9} {'nll':>8} {'ppl':>10} {'tok/s':>9}", flush=True)
    rows = []
    for i, spec in enumerate(specs):
        engine = first if i == 0 else Engine.load(args.model, device=args.device, sparsity=spec)
        result = evaluate(engine, inputs, targets, progress=not args.no_progress, desc=f"eval S={spec or 'file'}")
        rows.append({"sparsity": engine.sparsity.to_dict(), "describe": engine.sparsity.describe(),
                     **result.to_dict()})
        print(f"{engine.sparsity.describe():<52} {result.tokens:>9,} {result.nll:>8.4f} {result.ppl:>10.3f} "
              f"{result.tokens_per_s:>9,.0f}", flush=True)
        if engine is not first:
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if args.json:
        save_table(args.json, {"model": name, "text": what, "window": window, "windows": int(inputs.shape[0]),
                               "device": first.device, "config": cfg.to_dict(), "rows": rows})
    return 0
