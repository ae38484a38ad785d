"""Text generation: `generate`, `stream` and `chat` for one sequence (the `qsparse generate` command is
cli_generate.py; batches of prompts go through the serving scheduler, serving/batch.py).

One token loop serves every entry point: `generate` joins the pieces `stream` yields, so both give the
same text for the same settings and seed by construction (and the tests check it end to end).
Stops on an EOS token, on a stop string (the returned text ends before it; text that could still turn
into a stop string is held back while streaming) or after max_new_tokens. Backends: the GPU decoder
(GpuModel: prefill + CUDA-graph steps, sampling on the GPU) or, without a GPU, the CPU reference model
with a KV cache and the same sampling rules in sampling.py.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator, Sequence

import torch

from .sampling import SamplingSettings, sample_cpu
from .textstream import TextAssembler, held_back, parse_stops

_held_back = held_back  # old private names, kept for callers of this module
_stops = parse_stops


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
        from ..model.reference import KVCache

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


def stream(engine: Any, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
           stop: str | Sequence[str] | None = None) -> Iterator[str]:
    """Yield text pieces as they are produced; their concatenation is generate()'s text."""
    stops = parse_stops(stop)
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot produce text: generate token ids with "
                         "generate_tokens (CLI: qsparse generate --ids)")
    tokens = generate_tokens(engine, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    text = TextAssembler(engine.tokenizer, stops)
    for tok in tokens:
        out = text.push(tok)
        if out:
            yield out
        if text.stopped:
            tokens.close()
            return
    out = text.finish()
    if out:
        yield out


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
