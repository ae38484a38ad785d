"""`Engine.generate` on a list of prompts: every prompt is a request to one scheduler, stepped in the calling
thread until all are done. Each text equals what `generate` gives for that prompt alone (same settings,
same seed), because the runners sample each slot with its own seed and step counter."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..generate.sampling import SamplingSettings
from ..generate.textstream import parse_stops
from . import DEFAULT_MAX_SLOTS, make_runner
from .scheduler import Delta, Finished, GenerationRequest, Scheduler


def _ids(engine: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    ids = list(prompt)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("each prompt must be a str or a sequence of int token ids")
    return ids


def generate_batch(engine: Any, prompts: Sequence[Any], max_new_tokens: int = 256, temperature: float = 0.8,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                   stop: str | Sequence[str] | None = None, max_batch: int | None = None,
                   prefill_chunk: int | None = None) -> list[str]:
    """Texts for `prompts`, decoded `max_batch` at a time (default: 8 on the CPU, 64 on the GPU). Without a
    seed each prompt draws its own random seed. prefill_chunk (default: the whole prompt at once) splits
    long prompts' prefill."""
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer: use generation.generate_tokens with token ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty, seed)
    stops = parse_stops(stop)
    ids = [_ids(engine, p) for p in prompts]
    if max_new_tokens == 0 or not ids:
        for i in ids:
            if not i:
                raise ValueError("the prompt is empty")
        return ["" for _ in ids]
    device = "cuda" if getattr(engine, "gpu", None) is not None else "cpu"
    slots = max(1, min(len(ids), max_batch or DEFAULT_MAX_SLOTS[device]))
    runner = make_runner(engine, slots, engine.config.max_seq_len)
    sched = Scheduler(runner, engine.tokenizer, max_queue=len(ids),
                      prefill_chunk=prefill_chunk or engine.config.max_seq_len)
    requests = [GenerationRequest(i, settings, max_new_tokens, stops) for i in ids]
    for r in requests:
        sched.validate(r)  # every prompt checked before any work starts
    texts: list[list[str]] = [[] for _ in ids]
    ends: list[Finished | None] = [None] * len(ids)

    def sink_for(k: int):
        def sink(ev: Delta | Finished) -> None:
            if isinstance(ev, Delta):
                texts[k].append(ev.text)
            else:
                ends[k] = ev
        return sink

    for k, r in enumerate(requests):
        sched.submit(r, sink_for(k))
    sched.run_until_idle()
    for end in ends:
        if end is None or end.reason == "error":
            raise RuntimeError(f"generation failed: {end.error if end else 'no result'}")
    return ["".join(t) for t in texts]
