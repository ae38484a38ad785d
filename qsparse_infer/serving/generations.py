"""The choices of one HTTP request as seen from the event loop: n generations per prompt submitted to the
scheduler together, their events merged onto one asyncio queue (tagged with the choice's index), and every
unfinished one cancelled when the client goes away or one of them cannot be queued.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .metrics import RequestTimer, ServingMetrics
from .protocol import APIError
from .scheduler import Delta, Finished, GenerationRequest, QueueFull, Scheduler


@dataclass
class Choice:
    """One generation's result, filled in as its events arrive."""
    index: int
    request: GenerationRequest
    timer: RequestTimer
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # TokenLogprob per generated token, when asked for
    prompt_logprobs: list[Any] | None = None
    end: Finished | None = None


class Generations:
    def __init__(self, scheduler: Scheduler, metrics: ServingMetrics, requests: list[GenerationRequest],
                 is_disconnected: Callable[[], Any]) -> None:
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Delta | Finished]] = asyncio.Queue()
        self.is_disconnected = is_disconnected
        self.choices = [Choice(i, r, metrics.start_request()) for i, r in enumerate(requests)]
        self.tickets: list[Any] = []
        self.open = len(requests)
        try:
            for c in self.choices:
                self.tickets.append(scheduler.submit(c.request, self._sink(c.index)))
        except QueueFull as e:
            self.cancel()
            raise APIError(503, str(e), "server_busy", code="queue_full") from None
        except ValueError as e:
            self.cancel()
            msg = str(e)
            param = next((p for p in ("max_tokens", "stop_token_ids", "stop", "logprobs") if p in msg), "prompt")
            raise APIError(400, msg, param=param,
                           code="context_length_exceeded" if "context" in msg else None) from None
        except RuntimeError as e:  # shutting down
            self.cancel()
            raise APIError(503, str(e), "server_busy") from None

    def _sink(self, index: int) -> Callable[[Delta | Finished], None]:
        loop_thread = threading.get_ident()

        def sink(event: Delta | Finished) -> None:
            if threading.get_ident() == loop_thread:  # handed over by the app's per-step dispatch
                self.queue.put_nowait((index, event))
            else:  # called on the scheduler's thread
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return sink

    def cancel(self) -> None:
        for c, t in zip(self.choices, self.tickets):
            if c.end is None:
                self.scheduler.cancel(t)

    def _note(self, index: int, event: Delta | Finished) -> Choice:
        c = self.choices[index]
        if isinstance(event, Delta):
            c.text.append(event.text)
            c.token_ids.extend(event.token_ids)
            lp = getattr(event, "logprobs", None)
            if lp:
                c.logprobs.extend(lp)
            plp = getattr(event, "prompt_logprobs", None)
            if plp is not None:
                c.prompt_logprobs = list(plp)
            c.timer.tokens(len(event.token_ids), len(c.request.prompt_ids))
        else:
            c.end = event
            self.open -= 1
            c.timer.finished(event.reason, event.prompt_tokens)
        return c

    async def batches(self, poll_disconnect: bool = False) -> AsyncIterator[list[tuple[Choice, Delta | Finished]]]:
        """Every choice's events in arrival order, in batches: whatever arrived while the previous batch was
        being written goes out together (one write instead of one per event when the stream falls behind).
        Leaving early cancels what is unfinished. With poll_disconnect a client that goes away while nothing
        arrives ends the wait with a 499."""
        try:
            while self.open:
                if poll_disconnect:
                    try:
                        first = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await self.is_disconnected():
                            raise APIError(499, "client disconnected") from None
                        continue
                else:
                    first = await self.queue.get()
                batch = [first]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                yield [(self._note(index, event), event) for index, event in batch]
        finally:
            if self.open:
                self.cancel()

    async def collect(self) -> list[Choice]:
        """Wait for every choice to finish (a 500 if one failed in the model)."""
        async for batch in self.batches(poll_disconnect=True):
            for _, event in batch:
                if isinstance(event, Finished) and event.reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
        return self.choices

    def usage(self, prompts: list[list[int]]) -> dict[str, int]:
        """OpenAI's usage: each prompt counted once (not once per choice), every choice's tokens."""
        prompt = sum(len(p) for p in prompts)
        completion = sum(c.end.completion_tokens if c.end else len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
