"""What goes into the scheduler and what comes out of it: the request, the events a request's sink receives,
and the per-token log-probabilities. The HTTP layer (api.py) builds these; runners never see them.

Log-probabilities are the model's own distribution: log_softmax of the raw fp32 logits, before temperature,
penalties and top-k / top-p, so they match a teacher-forced `Engine.logits(ids).log_softmax(-1)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..generate.sampling import SamplingSettings

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI caps top_logprobs


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass
class TokenLogprob:
    """One position: the token there, its log-probability, and the `top` most likely tokens at that position as
    (token id, logprob), most likely first (equal logprobs: the lower id first). `top` may or may not contain
    token_id itself, as in OpenAI's top_logprobs."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int | None = None  # None: until EOS, a stop rule or the end of the context; 0: no new token
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # finish with reason "stop" when one of these is sampled; like EOS, it is counted but not shown as text
    stop_token_ids: list[int] = field(default_factory=list)
    # None: no logprobs; k in 0..MAX_LOGPROBS: per generated token its logprob and the k most likely tokens
    logprobs: int | None = None
    # echo: the logprob of each prompt token given the ones before it (the first has none), delivered with the
    # request's first Delta; the top alternatives per prompt position are `logprobs` (0 when None)
    prompt_logprobs: bool = False


@dataclass
class Delta:
    """Text that may be shown now ("" while a piece is held back), the token ids sampled since the last Delta,
    their logprobs (aligned with token_ids; None unless the request asked), and on the request's first Delta
    (only when it asked for prompt_logprobs) one entry per prompt token, None for the first."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Finished:
    reason: str  # "stop" (EOS, a stop token or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Finished
Sink = Callable[[Event], None]
# Optional: receives all (sink, event) pairs of one scheduler step in one call (for example to hop onto an event
# loop once per step instead of once per event). Without it the scheduler calls each sink itself.
Dispatch = Callable[[list[tuple[Sink, Event]]], None]
