"""The model-runner protocol the scheduler drives, and its CPU implementation.

A runner holds `max_slots` sequences (KV cache + sampling state per slot). The scheduler calls
`begin(slot, settings, seed, logprobs)` when a request takes a slot, `launch(plan)` once per step with every
prefill chunk and decode row of that step, and `release(slot)` when the request ends. `launch` returns a
handle whose `result()` gives the step's sampled tokens (and logprobs where asked). An asynchronous runner
(`asynchronous = True`: the GPU runner) returns from `launch` as soon as the step is enqueued, so the scheduler
plans and launches step t+1 before it reads step t's tokens; a decode row therefore takes its input token from
the runner's own state (the token the slot sampled last), never from the scheduler. Runners know nothing of
text, stop rules or HTTP.

`CpuRunner` keeps one reference-model KV cache per slot. A step (prefill chunks and decode rows together) is
one forward through the reference model (`Transformer.forward_segments`: stacked projections, attention per
sequence over its own cache), each sequence bit-identical to the one-sequence path, so greedy results equal
`Engine.generate(..., temperature=0)` token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..generate.sampling import SamplingSettings, sample_cpu
from ..model.reference import KVCache
from . import logprobs as lp
from .requests import TokenLogprob


@dataclass
class PrefillChunk:
    """Prompt tokens of one slot, appended at its current length. sample: draw the slot's next token after the
    chunk (the prompt's last chunk, unless the request wants no new token). targets: with prompt logprobs, the
    token each row of the chunk predicts (row j predicts targets[j]; len(ids) - 1 or len(ids) entries), and
    `top` alternatives per row."""
    slot: int
    ids: list[int]
    sample: bool
    targets: list[int] | None = None
    top: int = 0


@dataclass
class StepPlan:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)  # slots that feed their last sampled token

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decode)


@dataclass
class StepResult:
    """Aligned with the plan: per prefill chunk its sampled token (None without `sample`), the sampled token's
    logprob (None unless the slot asked) and the rows' prompt logprobs (None without targets); per decode row
    its token and logprob."""
    prefill_tokens: list[int | None]
    prefill_logprobs: list[TokenLogprob | None]
    prompt_logprobs: list[list[TokenLogprob] | None]
    decode_tokens: list[int]
    decode_logprobs: list[TokenLogprob | None]


class StepHandle(Protocol):
    def result(self) -> StepResult: ...  # waits for the step; raises what the step raised


class ModelRunner(Protocol):
    max_slots: int  # sequences held at once (slots 0 .. max_slots-1)
    max_len: int  # positions per slot (prompt + generated tokens)
    vocab_size: int
    asynchronous: bool  # launch() returns before the step has run

    def begin(self, slot: int, settings: SamplingSettings, seed: int, logprobs: int | None = None) -> None: ...

    def launch(self, plan: StepPlan) -> StepHandle: ...

    def release(self, slot: int) -> None: ...


class DoneHandle:
    """The handle of a step that already ran (synchronous runners)."""

    def __init__(self, result: StepResult) -> None:
        self._result = result

    def result(self) -> StepResult:
        return self._result


def check_plan(plan: StepPlan, max_slots: int) -> None:
    """The shape rules every runner relies on: slots in range, each slot at most once per step."""
    seen: set[int] = set()
    for s in [c.slot for c in plan.prefills] + list(plan.decode):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < max_slots:
            raise ValueError(f"slot must be an integer in [0, {max_slots}), got {s!r}")
        if s in seen:
            raise ValueError(f"slot {s} appears twice in one step")
        seen.add(s)
    for c in plan.prefills:
        if not c.ids:
            raise ValueError("a prefill chunk needs at least one token id")
        if c.targets is not None and not len(c.ids) - 1 <= len(c.targets) <= len(c.ids):
            raise ValueError(f"a chunk of {len(c.ids)} ids needs {len(c.ids) - 1} or {len(c.ids)} targets, "
                             f"got {len(c.targets)}")


@dataclass
class _Sequence:
    settings: SamplingSettings
    seed: int
    seen: torch.Tensor  # bool [vocab]: tokens the repetition penalty applies to (prompt and output)
    counts: torch.Tensor  # int32 [vocab]: generated tokens, for presence/frequency penalties
    logprobs: int | None  # top alternatives per sampled token (None: no logprobs)
    steps: int = 0  # tokens sampled so far (the RNG's step counter)
    last: int = -1  # the last sampled token, fed by the next decode
    sampled: bool = False


class CpuRunner:
    """Reference model on the CPU; `max_len` is capped at the model's context."""

    asynchronous = False

    def __init__(self, engine: Any, max_slots: int, max_len: int | None = None) -> None:
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1:
            raise ValueError(f"max_slots must be an integer >= 1, got {max_slots!r}")
        self.cfg = engine.config
        self.model = engine.model
        self.max_slots = max_slots
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.vocab_size = self.cfg.vocab_size
        self._caches: list[KVCache | None] = [None] * max_slots  # allocated on first use, then reused
        self._seqs: list[_Sequence | None] = [None] * max_slots

    def begin(self, slot: int, settings: SamplingSettings, seed: int, logprobs: int | None = None) -> None:
        if self._caches[slot] is None:
            self._caches[slot] = KVCache.empty(self.cfg, self.max_len)
        self._caches[slot].length = 0
        v = self.vocab_size
        self._seqs[slot] = _Sequence(settings, seed, torch.zeros(v, dtype=torch.bool),
                                     torch.zeros(v, dtype=torch.int32), logprobs)

    @torch.no_grad()
    def launch(self, plan: StepPlan) -> DoneHandle:
        """The whole step (every prefill chunk and decode row) in one forward through the reference model."""
        check_plan(plan, self.max_slots)
        segments = []
        for chunk in plan.prefills:
            seq, cache = self._active(chunk.slot), self._caches[chunk.slot]
            if cache.length + len(chunk.ids) > self.max_len:
                raise ValueError(f"slot {chunk.slot}: {cache.length + len(chunk.ids)} positions exceed max_len "
                                 f"{self.max_len}")
            t = torch.as_tensor(chunk.ids, dtype=torch.int64)
            if int(t.min()) < 0 or int(t.max()) >= self.vocab_size:
                raise ValueError(f"token ids must be in the vocabulary [0, {self.vocab_size})")
            segments.append((t, cache))
        for s in plan.decode:
            seq, cache = self._active(s), self._caches[s]
            if not seq.sampled:
                raise RuntimeError(f"slot {s} has no sampled token to feed (its prompt is not prefilled)")
            if cache.length >= self.max_len:
                raise ValueError(f"slot {s} is full ({self.max_len} positions)")
            segments.append((torch.tensor([seq.last]), cache))
        logits = self.model.forward_segments(segments)
        n = len(plan.prefills)
        res = StepResult([None] * n, [None] * n, [None] * n, [], [])
        for i, chunk in enumerate(plan.prefills):
            seq = self._seqs[chunk.slot]
            seq.seen[segments[i][0]] = True
            if chunk.targets is not None:
                m = len(chunk.targets)
                packed = lp.gather_logprobs(logits[i][:m], torch.as_tensor(chunk.targets, dtype=torch.int64),
                                            chunk.top)
                res.prompt_logprobs[i] = lp.unpack(packed, chunk.targets, chunk.top)
            if chunk.sample:
                res.prefill_tokens[i], res.prefill_logprobs[i] = self._sample(seq, logits[i][-1])
        for j, s in enumerate(plan.decode):
            tok, tok_lp = self._sample(self._seqs[s], logits[n + j][0])
            res.decode_tokens.append(tok)
            res.decode_logprobs.append(tok_lp)
        return DoneHandle(res)

    def prefill(self, slot: int, ids: list[int], last: bool) -> int | None:
        """One prefill chunk outside a step (tests, tools): the sampled token after the last chunk."""
        return self.launch(StepPlan(prefills=[PrefillChunk(slot, list(ids), last)])).result().prefill_tokens[0]

    def decode(self, slots: list[int]) -> list[int]:
        """One token for each slot, decoded as one batch outside a step (tests, tools)."""
        return self.launch(StepPlan(decode=list(slots))).result().decode_tokens

    def release(self, slot: int) -> None:
        self._seqs[slot] = None

    def length(self, slot: int) -> int:
        cache = self._caches[slot]
        return 0 if cache is None or self._seqs[slot] is None else cache.length

    def _active(self, slot: int) -> _Sequence:
        seq = self._seqs[slot]
        if seq is None:
            raise RuntimeError(f"slot {slot} has no sequence (begin() it first)")
        return seq

    @staticmethod
    def _sample(seq: _Sequence, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token by the sampling rules, and its logprob under the raw distribution if asked."""
        tok = sample_cpu(logits, seq.settings, seq.seen, seq.seed, seq.steps, seq.counts)
        tok_lp = None
        if seq.logprobs is not None:
            packed = lp.gather_logprobs(logits.view(1, -1), torch.tensor([tok]), seq.logprobs)
            tok_lp = lp.unpack(packed, [tok], seq.logprobs)[0]
        seq.steps += 1
        seq.seen[tok] = True
        seq.counts[tok] += 1
        seq.last = tok
        seq.sampled = True
        return tok, tok_lp
