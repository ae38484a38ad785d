"""The serving scheduler: admits requests into the runner's slots, builds each step (the prefill chunks of
arriving prompts within a token budget, mixed with one decode row per running request), applies the
per-request stop rules (EOS, stop token ids, stop strings, max_tokens, end of the context), detokenizes
incrementally and hands the text, token ids and logprobs to the request's sink.

Threading: `submit` and `cancel` may be called from any thread; everything that touches the runner runs in
the thread that calls `step` (the background thread of `start`, or the caller of `run_until_idle`). Sinks are
called from that thread (or, with `dispatch`, handed over once per step), so an asyncio caller hops onto its
loop with `loop.call_soon_threadsafe`.

One `step`: drop cancelled requests (freeing their slots); admit waiting requests (FIFO) into free slots;
plan one runner step: a decode row for every request that has a sampled token to feed and may still grow,
and prefill chunks of at most `prefill_chunk` prompt tokens in all, oldest request first (a long prompt takes
several steps, short ones share one, all in the same runner call as the decode rows); launch it. While any
request decodes, a prompt longer than `prefill_chunk` gets at most `long_prefill_chunk` tokens per step (vLLM's
long_prefill_token_threshold): the decoding streams' step grows by a small chunk, not a large one.

Overlap (asynchronous runners, i.e. the GPU): `launch` returns once the step is enqueued on the device, and
the scheduler then reads the *previous* step's tokens (pinned memory + an event), runs the stop rules,
detokenizes and calls the sinks while the GPU works on the step just launched. Plans are therefore made one
step ahead of the results: a request that ends on EOS / a stop token / a stop string / cancellation may have
one more row in flight (two for a stop string found after the next launch); that row's token is dropped,
never emitted. max_tokens and the context end are known when a step is planned, so they cost nothing
extra: the scheduler counts the tokens and positions it has launched per request. A freed slot may be handed
to a new request at once: the runner orders the new request's reset after the work still in flight there.
"""
from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..generate.textstream import TextAssembler, parse_stops
from .requests import (MAX_LOGPROBS, Delta, Dispatch, Event, Finished, GenerationRequest, QueueFull, Sink,
                       TokenLogprob)
from .runner import ModelRunner, PrefillChunk, StepHandle, StepPlan

log = logging.getLogger("qsparse.serve")

__all__ = ["Delta", "Finished", "GenerationRequest", "QueueFull", "Scheduler", "Ticket", "TokenLogprob"]

_WAITING, _PREFILL, _DECODE, _DRAIN, _DONE = "waiting", "prefill", "decode", "drain", "done"
# The interpreter's thread switch interval while the scheduler runs (default 5 ms): when the event loop's
# thread holds the GIL as a GPU step ends, the scheduler waits at most this long to launch the next one.
SWITCH_INTERVAL_S = 0.0005


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
        self.prefilled = 0  # prompt tokens launched
        self.prompt_received = 0  # prompt tokens whose chunk came back
        self.positions = 0  # cache positions launched (prompt + fed tokens)
        self.launched = 0  # sampled tokens launched
        self.generated = 0  # sampled tokens received
        self.cancelled = False
        # echo: logprobs of the prompt tokens, the first has none; delivered with the first Delta
        self.prompt_lps: list[TokenLogprob | None] | None = [None] if request.prompt_logprobs else None
        self.stop_ids = frozenset(request.stop_token_ids)

    @property
    def done(self) -> bool:
        return self.state == _DONE


@dataclass
class _Launched:
    """A launched step: its handle and which ticket each chunk / decode row belongs to."""
    handle: StepHandle
    plan: StepPlan
    chunk_tickets: list[Ticket] = field(default_factory=list)
    decode_tickets: list[Ticket] = field(default_factory=list)

    def tickets(self) -> list[Ticket]:
        return self.chunk_tickets + self.decode_tickets


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: Any = None, *, max_queue: int = 64,
                 prefill_chunk: int = 256, long_prefill_chunk: int | None = None,
                 dispatch: Dispatch | None = None) -> None:
        if long_prefill_chunk is None:
            long_prefill_chunk = max(16, prefill_chunk // 8)
        if max_queue < 0 or prefill_chunk < 1 or long_prefill_chunk < 1:
            raise ValueError("max_queue must be >= 0, prefill_chunk and long_prefill_chunk >= 1")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        # a prompt longer than prefill_chunk takes at most this many tokens per step while others decode (as
        # vLLM's long_prefill_token_threshold), so that one long prompt cannot stall the decoding streams
        self.long_prefill_chunk = min(long_prefill_chunk, prefill_chunk)
        self.dispatch = dispatch
        self.asynchronous = bool(getattr(runner, "asynchronous", False))
        self.eos = frozenset(tokenizer.eos_ids) if tokenizer is not None else frozenset()
        self._cv = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._free = list(range(runner.max_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._active: list[Ticket] = []  # admission order; touched only by the stepping thread
        self._pending: _Launched | None = None  # launched, results not read yet (asynchronous runners)
        self._outbox: list[tuple[Sink, Event]] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._old_switch: float | None = None
        self.counters = {"requests": 0, "finished": 0, "rejected_queue_full": 0, "prompt_tokens": 0,
                         "completion_tokens": 0, "errors": 0, "steps": 0, "mixed_steps": 0}

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

        def bad_id(i: Any) -> bool:
            return isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < v

        if not ids:
            raise ValueError("the prompt is empty")
        if any(bad_id(i) for i in ids):
            raise ValueError(f"token id {next(i for i in ids if bad_id(i))!r} is not an integer in the "
                             f"vocabulary [0, {v})")
        if len(ids) > self.context_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the context of {self.context_len}")
        if req.max_tokens is not None and (isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int)
                                           or req.max_tokens < 0):
            raise ValueError(f"max_tokens must be an integer >= 0, got {req.max_tokens!r}")
        parse_stops(req.stop)
        if req.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        if not isinstance(req.stop_token_ids, (list, tuple)) or any(bad_id(i) for i in req.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids in the vocabulary [0, {v})")
        if req.logprobs is not None and (isinstance(req.logprobs, bool) or not isinstance(req.logprobs, int)
                                         or not 0 <= req.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {req.logprobs!r}")
        if not isinstance(req.prompt_logprobs, bool):
            raise ValueError(f"prompt_logprobs must be a bool, got {req.prompt_logprobs!r}")

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
        return bool(self._waiting or self._active or self._pending)

    def step(self) -> bool:
        """One scheduling round (see the module docstring). Returns False when there was nothing to do."""
        plan, chunk_tickets, decode_tickets = self._plan()
        launched = None
        if plan:
            launched = self._launch(plan, chunk_tickets, decode_tickets)
        previous, self._pending = self._pending, None
        if self.asynchronous:
            self._pending = launched
            if previous is not None:
                self._process(previous)
        elif launched is not None:
            self._process(launched)
        self._flush()
        return launched is not None or previous is not None

    def run_until_idle(self) -> None:
        """Step in the calling thread until no request is waiting or running (batch use, tests)."""
        while self.has_work():
            self.step()

    def _can_decode(self, t: Ticket) -> bool:
        mt = t.request.max_tokens
        return (t.state == _DECODE and not t.cancelled and (mt is None or t.launched < mt)
                and t.positions < self.runner.max_len)

    def _plan(self) -> tuple[StepPlan, list[Ticket], list[Ticket]]:
        with self._cv:
            for t in [t for t in self._waiting if t.cancelled]:
                self._waiting.remove(t)
                self._finish(t, "cancelled")
            admitted = []
            while self._waiting and (self._free or self._no_work(self._waiting[0])):
                t = self._waiting.popleft()
                if self._no_work(t):
                    admitted.append(t)
                    continue
                t.slot, t.state = self._free.pop(), _PREFILL
                admitted.append(t)
        for t in [t for t in self._active if t.cancelled]:
            self._finish(t, "cancelled")
        for t in admitted:
            if t.slot is None:  # max_tokens == 0 and no prompt logprobs: nothing to compute
                self._finish(t, "length")
                continue
            self._active.append(t)
            self._guard([t], lambda t=t: self.runner.begin(t.slot, t.request.settings, t.seed, t.request.logprobs))
        decode = [t for t in self._active if self._can_decode(t)]
        chunks: list[Ticket] = []
        plan = StepPlan()
        budget = self.prefill_chunk
        for t in self._active:
            if budget <= 0:
                break
            if t.state != _PREFILL or t.done:
                continue
            req = t.request
            ids = req.prompt_ids
            cap = budget
            if decode and len(ids) > self.prefill_chunk:
                cap = min(cap, self.long_prefill_chunk)
            n = min(cap, len(ids) - t.prefilled)
            a, b = t.prefilled, t.prefilled + n
            end = b == len(ids)
            sample = end and req.max_tokens != 0
            targets = ids[a + 1:b + 1] if req.prompt_logprobs else None
            plan.prefills.append(PrefillChunk(t.slot, ids[a:b], sample, targets, req.logprobs or 0))
            chunks.append(t)
            t.prefilled = t.positions = b
            if end:
                t.state = _DECODE if sample else _DRAIN
                t.launched += sample
            budget -= n
        for t in decode:
            plan.decode.append(t.slot)
            t.positions += 1
            t.launched += 1
        return plan, chunks, decode

    @staticmethod
    def _no_work(t: Ticket) -> bool:
        return t.request.max_tokens == 0 and not t.request.prompt_logprobs

    def _launch(self, plan: StepPlan, chunks: list[Ticket], decode: list[Ticket]) -> _Launched | None:
        try:
            handle = self.runner.launch(plan)
        except Exception as e:  # an engine bug must not take the server down
            self._fail(chunks + decode, e)
            return None
        self.counters["steps"] += 1
        self.counters["mixed_steps"] += bool(plan.prefills and plan.decode)
        return _Launched(handle, plan, chunks, decode)

    def _fail(self, tickets: list[Ticket], e: Exception) -> None:
        log.error("model runner failed (%s: %s); ending %d request(s) with an error", type(e).__name__, e,
                  len(tickets), exc_info=e)
        for t in tickets:
            if not t.done:
                self._finish(t, "error", error=f"{type(e).__name__}: {e}")

    def _guard(self, tickets: list[Ticket], fn: Callable[[], None]) -> None:
        """Run model work; if it raises, those requests end with an error and the loop goes on."""
        try:
            fn()
        except Exception as e:
            self._fail(tickets, e)

    def _process(self, step: _Launched) -> None:
        """Read a launched step's results and apply them to its requests (dropping those already done)."""
        try:
            res = step.handle.result()
        except Exception as e:
            self._fail(step.tickets(), e)
            return
        for i, (t, chunk) in enumerate(zip(step.chunk_tickets, step.plan.prefills)):
            if t.done:
                continue
            t.prompt_received += len(chunk.ids)
            self.counters["prompt_tokens"] += len(chunk.ids)
            if t.prompt_lps is not None and res.prompt_logprobs[i] is not None:
                t.prompt_lps.extend(res.prompt_logprobs[i])
            if chunk.sample:
                self._on_token(t, res.prefill_tokens[i], res.prefill_logprobs[i])
            elif t.state == _DRAIN and t.prompt_received == len(t.request.prompt_ids):
                self._emit_prompt_logprobs(t)  # max_tokens == 0: echo only
                self._finish(t, "length")
        for t, tok, tok_lp in zip(step.decode_tickets, res.decode_tokens, res.decode_logprobs):
            if not t.done:
                self._on_token(t, tok, tok_lp)

    def _emit_prompt_logprobs(self, t: Ticket) -> None:
        if t.prompt_lps is not None:
            self._emit(t, Delta("", [], [] if t.request.logprobs is not None else None, t.prompt_lps))
            t.prompt_lps = None

    def _on_token(self, t: Ticket, tok: int, tok_lp: TokenLogprob | None) -> None:
        t.generated += 1
        self.counters["completion_tokens"] += 1
        if (tok in self.eos and not t.request.ignore_eos) or tok in t.stop_ids:
            self._emit_prompt_logprobs(t)
            self._finish(t, "stop", flush=True)
            return
        text = t.text.push(tok) if t.text is not None else ""
        wants = t.request.logprobs is not None
        self._emit(t, Delta(text, [tok], [tok_lp] if wants else None, t.prompt_lps))
        t.prompt_lps = None
        mt = t.request.max_tokens
        if t.text is not None and t.text.stopped:
            self._finish(t, "stop")
        elif (mt is not None and t.generated >= mt) or (t.generated == t.launched
                                                         and t.positions >= self.runner.max_len):
            self._finish(t, "length", flush=True)

    def _finish(self, t: Ticket, reason: str, flush: bool = False, error: str | None = None) -> None:
        if t.done:
            return
        if flush and t.text is not None:
            tail = t.text.finish()
            if tail:
                self._emit(t, Delta(tail, [], [] if t.request.logprobs is not None else None))
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
        self._outbox.append((t.sink, event))

    def _flush(self) -> None:
        """Hand this step's events over: to `dispatch` in one call, else sink by sink."""
        out, self._outbox = self._outbox, []
        if not out:
            return
        if self.dispatch is not None:
            try:
                self.dispatch(out)
            except Exception:
                log.exception("the event dispatcher raised; %d event(s) lost", len(out))
            return
        broken: set[int] = set()
        for sink, event in out:
            if id(sink) in broken:
                continue
            try:
                sink(event)
            except Exception:
                log.exception("a request's sink raised; cancelling it")
                broken.add(id(sink))
        if broken:
            for t in list(self._active) + list(self._waiting):
                if id(t.sink) in broken:
                    t.cancelled = True

    # -- background thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a background thread (idle while there is no request)."""
        if self._thread is None:
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._old_switch, SWITCH_INTERVAL_S))
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
                self._outbox.clear()
        if self._pending is not None:
            try:
                self._pending.handle.result()  # let the device finish before the slots are dropped
            except Exception:
                pass
            self._pending = None
        for t in list(self._active):
            self._finish(t, "cancelled")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for t in waiting:
            self._finish(t, "cancelled")
        self._flush()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            if self._old_switch is not None:
                sys.setswitchinterval(self._old_switch)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            active = list(self._active)
            return {"max_slots": self.runner.max_slots, "active": len(active), "waiting": len(self._waiting),
                    "free_slots": len(self._free), "max_queue": self.max_queue,
                    "prefill_chunk": self.prefill_chunk, "long_prefill_chunk": self.long_prefill_chunk,
                    "context_len": self.context_len,
                    "kv_used_positions": sum(t.positions for t in active),
                    "kv_total_positions": self.runner.max_slots * self.runner.max_len, **self.counters}
