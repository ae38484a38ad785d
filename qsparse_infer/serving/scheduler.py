"""The serving scheduler: admits requests into the runner's slots, interleaves chunked prefill with batched
decode steps, applies the per-request stop rules (EOS, stop strings, max_tokens, end of the context),
detokenizes incrementally and hands each step's text to the request's sink.

Threading: `submit` and `cancel` may be called from any thread; everything that touches the runner runs in
the thread that calls `step` (the background thread of `start`, or the caller of `run_until_idle`). Sinks are
called from that thread, so an asyncio caller wraps its sink in `loop.call_soon_threadsafe`.

One `step`: admit waiting requests (FIFO) into free slots; drop cancelled requests (freeing their slots);
prefill at most `prefill_chunk` prompt tokens in all, oldest request first (a long prompt takes several
steps, short ones may share a step); then one decode step for every request that was already decoding. A
long prompt therefore delays the running requests' next tokens by one chunk at a time, not by its whole
prefill.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..generate.sampling import SamplingSettings
from ..generate.textstream import TextAssembler, parse_stops
from .runner import ModelRunner

log = logging.getLogger("qsparse.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int | None = None  # None: until EOS, a stop string or the end of the context
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Delta:
    """Text that may be shown now ("" while a piece is held back) and the token ids sampled this step."""
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Finished
Sink = Callable[[Event], None]

_WAITING, _PREFILL, _DECODE, _DONE = "waiting", "prefill", "decode", "done"


class Ticket:
    """A submitted request's handle (pass it to `Scheduler.cancel`)."""

    def __init__(self, rid: int, request: GenerationRequest, sink: Sink, seed: int, text: TextAssembler | None):
        self.id = rid
        self.request = request
        self.sink = sink
        self.seed = seed
        self.text = text
        self.state = _WAITING
        self.slot: int | None = None
        self.prefilled = 0
        self.generated = 0
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.state == _DONE


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: Any = None, *, max_queue: int = 64,
                 prefill_chunk: int = 256) -> None:
        if max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_queue must be >= 0 and prefill_chunk >= 1")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.eos = frozenset(tokenizer.eos_ids) if tokenizer is not None else frozenset()
        self._cv = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._free = list(range(runner.max_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._active: list[Ticket] = []  # admission order; touched only by the stepping thread
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {"requests": 0, "finished": 0, "rejected_queue_full": 0, "prompt_tokens": 0,
                         "completion_tokens": 0, "errors": 0}

    # -- prompts ---------------------------------------------------------------------------------

    @property
    def context_len(self) -> int:
        return self.runner.max_len

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send the prompt as a list of token ids")
        return self.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot chat")
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions with plain text")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    # -- requests --------------------------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> None:
        ids, v = req.prompt_ids, self.runner.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < v for i in ids):
            bad = next(i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < v)
            raise ValueError(f"token id {bad!r} is not an integer in the vocabulary [0, {v})")
        if len(ids) > self.context_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the context of {self.context_len}")
        if req.max_tokens is not None and (isinstance(req.max_tokens, bool) or req.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        parse_stops(req.stop)
        if req.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")

    def submit(self, req: GenerationRequest, sink: Sink) -> Ticket:
        """Queue a request; raises ValueError for a bad one, QueueFull when the queue is at its limit."""
        self.validate(req)
        text = TextAssembler(self.tokenizer, req.stop) if self.tokenizer is not None else None
        with self._cv:
            if self._stopping:
                raise RuntimeError("the scheduler is shutting down")
            # slots freed but not yet handed out (admission happens at the next step) take a waiter each
            if len(self._waiting) - len(self._free) >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"all {self.runner.max_slots} slots are busy and {len(self._waiting)} "
                                f"requests are waiting; try again later")
            ticket = Ticket(next(self._ids), req, sink, req.settings.resolved_seed(), text)
            self._waiting.append(ticket)
            self.counters["requests"] += 1
            self._cv.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (a disconnected client): its slot is freed at the start of the next step."""
        with self._cv:
            ticket.cancelled = True
            self._cv.notify_all()

    # -- the loop --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def step(self) -> bool:
        """One scheduling round (see the module docstring). Returns False when there was nothing to do."""
        with self._cv:
            for t in [t for t in self._waiting if t.cancelled]:
                self._waiting.remove(t)
                self._finish(t, "cancelled")
            admitted = []
            while self._waiting and self._free:
                t = self._waiting.popleft()
                t.slot, t.state = self._free.pop(), _PREFILL
                admitted.append(t)
        for t in [t for t in self._active if t.cancelled]:
            self._finish(t, "cancelled")
        for t in admitted:
            self._active.append(t)
            self._guard([t], lambda t=t: self.runner.begin(t.slot, t.request.settings, t.seed))
        if not self._active:
            return False
        decoding = [t for t in self._active if t.state == _DECODE]
        budget = self.prefill_chunk
        for t in [t for t in self._active if t.state == _PREFILL]:
            if budget <= 0:
                break
            n = min(budget, len(t.request.prompt_ids) - t.prefilled)
            self._guard([t], lambda t=t, n=n: self._prefill_chunk(t, n))
            budget -= n
        if decoding:
            self._guard(decoding, lambda: self._decode(decoding))
        return True

    def run_until_idle(self) -> None:
        """Step in the calling thread until no request is waiting or running (batch use, tests)."""
        while self.has_work():
            self.step()

    def _prefill_chunk(self, t: Ticket, n: int) -> None:
        ids = t.request.prompt_ids
        chunk = ids[t.prefilled:t.prefilled + n]
        last = t.prefilled + len(chunk) == len(ids)
        tok = self.runner.prefill(t.slot, chunk, last)
        t.prefilled += len(chunk)
        self.counters["prompt_tokens"] += len(chunk)
        if last:
            t.state = _DECODE
            self._on_token(t, tok)

    def _decode(self, tickets: list[Ticket]) -> None:
        toks = self.runner.decode([t.slot for t in tickets])
        for t, tok in zip(tickets, toks):
            self._on_token(t, tok)

    def _guard(self, tickets: list[Ticket], fn: Callable[[], None]) -> None:
        """Run model work; if it raises, those requests end with an error and the loop goes on."""
        try:
            fn()
        except Exception as e:  # an engine bug must not take the server down
            log.exception("model runner failed; ending %d request(s) with an error", len(tickets))
            for t in tickets:
                if not t.done:
                    self._finish(t, "error", error=f"{type(e).__name__}: {e}")

    def _on_token(self, t: Ticket, tok: int) -> None:
        t.generated += 1
        self.counters["completion_tokens"] += 1
        if tok in self.eos and not t.request.ignore_eos:
            self._finish(t, "stop", flush=True)
            return
        text = t.text.push(tok) if t.text is not None else ""
        self._emit(t, Delta(text, [tok]))
        if t.text is not None and t.text.stopped:
            self._finish(t, "stop")
        elif (t.request.max_tokens is not None and t.generated >= t.request.max_tokens) \
                or self.runner.length(t.slot) >= self.runner.max_len:
            self._finish(t, "length", flush=True)

    def _finish(self, t: Ticket, reason: str, flush: bool = False, error: str | None = None) -> None:
        if t.done:
            return
        if flush and t.text is not None:
            tail = t.text.finish()
            if tail:
                self._emit(t, Delta(tail, []))
        if t.slot is not None:
            try:
                self.runner.release(t.slot)
            except Exception:
                log.exception("runner.release(%d) failed", t.slot)
            with self._cv:
                self._free.append(t.slot)
            t.slot = None
        if t in self._active:
            self._active.remove(t)
        t.state = _DONE
        self.counters["finished"] += 1
        self.counters["errors"] += reason == "error"
        self._emit(t, Finished(reason, len(t.request.prompt_ids), t.generated, error))

    def _emit(self, t: Ticket, event: Event) -> None:
        try:
            t.sink(event)
        except Exception:
            log.exception("a request's sink raised; cancelling it")
            t.cancelled = True

    # -- background thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a background thread (idle while there is no request)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qsparse-scheduler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # step guards the model calls; this is a scheduler bug: log it, keep serving
                log.exception("scheduler step failed")
        for t in list(self._active):
            self._finish(t, "cancelled")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for t in waiting:
            self._finish(t, "cancelled")

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {"max_slots": self.runner.max_slots, "active": len(self._active), "waiting": len(self._waiting),
                    "free_slots": len(self._free), "max_queue": self.max_queue,
                    "prefill_chunk": self.prefill_chunk, "context_len": self.context_len, **self.counters}
