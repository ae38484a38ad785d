"""Text generation: `generate`, `stream`, `chat` and the `qsparse generate` command.

One token loop serves every entry point: `generate` joins the pieces `stream` yields, so both give the
same text for the same settings and seed by construction (and the tests check it end to end).
Stops on an EOS token, on a stop string (the returned text ends before it; text that could still turn
into a stop string is held back while streaming) or after max_new_tokens. Backends: the GPU decoder
(GpuModel: prefill + CUDA-graph steps, sampling on the GPU) or, without a GPU, the CPU reference model
with a KV cache and the same sampling rules in sampling.py.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Iterator, Sequence

import torch

from .sampling import SamplingSettings, sample_cpu


# ---------------------------------------------------------------------------------------------
# Backends: start(ids) -> first sampled token, step() -> next token, room() -> steps left
# ---------------------------------------------------------------------------------------------


class _GpuBackend:
    def __init__(self, engine: Any) -> None:
        self.gpu = engine.gpu

    def check(self, ids: Sequence[int]) -> None:
        self.gpu.check_ids(ids)

    def start(self, ids: Sequence[int], settings: SamplingSettings, seed: int) -> int:
        return self.gpu.prefill(ids, settings, seed)

    def step(self) -> int:
        return self.gpu.step()

    def room(self) -> int:
        return self.gpu.max_len - self.gpu.length


class _CpuBackend:
    _warned = False

    def __init__(self, engine: Any, max_new_tokens: int) -> None:
        if not _CpuBackend._warned and not getattr(engine, "auto_cpu_fallback", False):
            warnings.warn("generating on the CPU with the reference model (slow); use a CUDA GPU for speed",
                          stacklevel=4)
            _CpuBackend._warned = True
        self.model = engine.model
        self.cfg = engine.config
        self.max_new = max_new_tokens

    def check(self, ids: Sequence[int]) -> None:
        v = self.cfg.vocab_size
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {v})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than the context of {self.cfg.max_seq_len}")

    @torch.no_grad()
    def start(self, ids: Sequence[int], settings: SamplingSettings, seed: int) -> int:
        from .reference import KVCache

        self.settings, self.seed, self.n = settings, seed, 0
        self.max_len = min(self.cfg.max_seq_len, len(ids) + self.max_new)
        self.cache = KVCache.empty(self.cfg, self.max_len)
        self.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool)
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        self.seen[t] = True
        logits = self.model(t, self.cache, 0)[-1]
        self.pos = len(ids)
        return self._sample(logits)

    def _sample(self, logits: torch.Tensor) -> int:
        tok = sample_cpu(logits, self.settings, self.seen, self.seed, self.n)
        self.n += 1
        self.seen[tok] = True
        self.last = tok
        return tok

    @torch.no_grad()
    def step(self) -> int:
        logits = self.model(torch.tensor([self.last]), self.cache, self.pos)[-1]
        self.pos += 1
        return self._sample(logits)

    def room(self) -> int:
        return self.max_len - self.pos


def _backend(engine: Any, max_new_tokens: int):
    return _GpuBackend(engine) if getattr(engine, "gpu", None) is not None else _CpuBackend(engine, max_new_tokens)


# ---------------------------------------------------------------------------------------------
# The token loop
# ---------------------------------------------------------------------------------------------


def _prompt_ids(engine: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError("a prompt must be a str or a sequence of int token ids, not bytes: decode it first "
                        "(e.g. prompt.decode('utf-8'))")
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass the prompt as a list of token ids")
        return engine.tokenizer.encode(prompt)
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    ids = list(prompt)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("a prompt must be a str or a sequence of int token ids")
    return ids


def _stops(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    return stops


def generate_tokens(engine: Any, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.8,
                    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    seed: int | None = None, stop_at_eos: bool = True) -> Iterator[int]:
    """Yield generated token ids (EOS not included) until EOS, max_new_tokens or the end of the context."""
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty, seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    ids = _prompt_ids(engine, prompt)
    backend = _backend(engine, max_new_tokens)
    backend.check(ids)  # before any state changes: a bad prompt leaves the engine as it was
    if max_new_tokens == 0:
        return
    eos = set(engine.tokenizer.eos_ids) if (stop_at_eos and engine.tokenizer is not None) else set()
    tok = backend.start(ids, settings, settings.resolved_seed())
    for i in range(max_new_tokens):
        if tok in eos:
            return
        yield tok
        if i == max_new_tokens - 1 or backend.room() <= 0:
            return
        tok = backend.step()


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream(engine: Any, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
           stop: str | Sequence[str] | None = None) -> Iterator[str]:
    """Yield text pieces as they are produced; their concatenation is generate()'s text."""
    stops = _stops(stop)
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot produce text: generate token ids with "
                         "generate_tokens (CLI: qsparse generate --ids)")
    tokens = generate_tokens(engine, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    dec = engine.tokenizer.incremental_decoder()
    pending = ""
    for tok in tokens:
        pending += dec.push(tok)
        if stops:
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut:
                    yield pending[:cut]
                tokens.close()
                return
            keep = _held_back(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            out, pending = pending, ""
        if out:
            yield out
    pending += dec.flush()
    if stops:
        cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            pending = pending[:cut]
    if pending:
        yield pending


def generate(engine: Any, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: str | Sequence[str] | None = None) -> str:
    """Generate text (the prompt excluded)."""
    return "".join(stream(engine, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop))


def chat(engine: Any, messages: list[dict[str, Any]], **kw: Any) -> str:
    """Reply to a conversation through the tokenizer's chat template. Returns the assistant's text."""
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot chat")
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(engine, engine.tokenizer.encode(text), **kw)


# ---------------------------------------------------------------------------------------------
# qsparse generate
# ---------------------------------------------------------------------------------------------


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
                   help="override the file's ratios: one value or attn,o,mlp,down (e.g. 0.6 or 0.5,0.5,0.6,0.6)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if there is one, else the CPU")


def run(args: argparse.Namespace) -> int:
    from .engine import Engine

    prompt = _cli_prompt(args)
    engine = Engine.load(args.model, device=args.device, sparsity=args.sparsity)
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
    for piece in stream(engine, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
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
