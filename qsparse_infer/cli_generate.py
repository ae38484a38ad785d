"""`qsparse generate PROMPT`: stream generated text to the terminal."""
from __future__ import annotations

import argparse
import sys

from .engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, help="engine file (default: the built-in model)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--sparsity", default=None,
                   help="override the file's ratios: one value or attn,o,mlp,down (e.g. 0.6 or 0.5,0.5,0.6,0.6)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--lm-head", choices=("bf16", "int8"), default=None,
                   help="LM head precision (default: what the file has); int8 is quantized at load time if needed")


def run(args: argparse.Namespace) -> int:
    engine = Engine.load(args.model, device=args.device, sparsity=args.sparsity, lm_head=args.lm_head)
    for piece in engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
