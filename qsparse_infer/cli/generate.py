"""`qsparse generate PROMPT` (or `--ids 1,17,42`): stream generated text to the terminal."""
from __future__ import annotations

import argparse
import sys

from ..engine import Engine
from ..generate.generation import generate_tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text (or give --ids)")
    p.add_argument("--ids", default=None,
                   help="the prompt as token ids, e.g. 1,17,42 (for a model without a tokenizer, the generated ids "
                        "are printed)")
    p.add_argument("--model", default=None, help="engine file (default: the built-in model)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generate at most this many tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens seen so far")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--sparsity", default=None,
                   help="override the file's ratios: one value, attn,o,mlp,down, attn,o,gate,up,down or named "
                        "(e.g. 0.6, 0.5,0.5,0.6,0.6 or attn=0.5,gate=0.6,up=0.4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if there is one, else the CPU")
    p.add_argument("--lm-head", choices=("bf16", "int8"), default=None,
                   help="LM head precision (default: what the file has); int8 is quantized at load time if needed")
    p.add_argument("--decode-kernel", choices=("multi", "persistent", "auto"), default="multi",
                   help="GPU decode step: a chain of kernels, its layers as one persistent kernel (same tokens), "
                        "or auto (persistent where supported)")


def run(args: argparse.Namespace) -> int:
    prompt = _cli_prompt(args)
    engine = Engine.load(args.model, device=args.device, sparsity=args.sparsity, lm_head=args.lm_head,
                         decode_kernel=args.decode_kernel)
    if engine.tokenizer is None:
        if isinstance(prompt, str):
            raise ValueError("this model has no tokenizer: give the prompt as token ids, e.g. --ids 1,17,42")
        tokens = generate_tokens(engine, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                 seed=args.seed)
        for i, tok in enumerate(tokens):
            sys.stdout.write(f" {tok}" if i else str(tok))
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for piece in engine.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cli_prompt(args: argparse.Namespace) -> str | list[int]:
    """The prompt text, or the token ids given with --ids (exactly one of the two)."""
    if (args.prompt is None) == (args.ids is None):
        raise ValueError("give either a prompt text or --ids (not both)")
    if args.ids is None:
        return args.prompt
    try:
        return [int(x) for x in args.ids.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids must be integers separated by commas or spaces, got {args.ids!r}") from None
