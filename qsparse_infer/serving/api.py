"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (both with SSE streaming),
/v1/models, /health and /metrics. It knows only the scheduler's API: requests go in through `submit`, events
come back through a thread-safe hop onto the event loop, and a client that goes away cancels its request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate.sampling import SamplingSettings
from .protocol import APIError, ChatRequest, CompletionRequest
from .scheduler import Delta, Finished, GenerationRequest, QueueFull, Scheduler

log = logging.getLogger("qsparse.serve")


def create_app(scheduler: Scheduler, model_name: str, *, info: dict[str, Any] | None = None,
               memory: Callable[[], dict[str, Any]] | None = None, reset_peak: Callable[[], None] | None = None,
               manage_scheduler: bool = True) -> FastAPI:
    """The app for one model. With manage_scheduler the app starts the scheduler's thread on startup and
    stops it on shutdown. `memory()` adds device memory figures to /health and /metrics."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_scheduler:
            scheduler.start()
        yield
        if manage_scheduler:
            scheduler.shutdown()

    app = FastAPI(title="qsparse-infer", lifespan=lifespan)
    app.state.scheduler = scheduler
    created = int(time.time())

    # -- errors: always the OpenAI shape, never a traceback --------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            err = APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            param = ".".join(loc) or None
            err = APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, "internal server error", "server_error").body(), status_code=500)

    # -- info ------------------------------------------------------------------------------------

    def status() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **(info or {}), "scheduler": scheduler.stats(),
                "memory": memory() if memory else {}}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return status()

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return status()

    @app.post("/metrics/reset_peak")
    async def metrics_reset_peak() -> dict[str, Any]:
        if reset_peak:
            reset_peak()
        return status()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "qsparse-infer", "max_model_len": scheduler.context_len}]}

    # -- generation ------------------------------------------------------------------------------

    def check_common(body: CompletionRequest | ChatRequest) -> None:
        if body.model != model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           "not_found_error", "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) != 0:
                raise APIError(400, f"{name} is not supported (only 0); use the extension field "
                                    f"repetition_penalty (multiplicative) instead", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")

    def make_request(body: CompletionRequest | ChatRequest, ids: list[int], max_tokens: int | None) -> GenerationRequest:
        try:
            settings = SamplingSettings(body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return GenerationRequest(ids, settings, max_tokens, stop, body.ignore_eos)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_common(body)
        if body.echo or body.suffix or (body.best_of or 1) != 1:
            raise APIError(400, "echo, suffix and best_of are not supported")
        ids = prompt_ids(scheduler, body.prompt)
        gen = _submit(scheduler, make_request(body, ids, body.max_tokens), request)
        rid = f"cmpl-{uuid.uuid4().hex}"

        def choice(text: str, finish: str | None, tokens: list[int]) -> dict[str, Any]:
            c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if body.return_token_ids:
                c["token_ids"] = tokens
            return c

        def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            return _sse(gen, lambda d: envelope([choice(d.text, None, d.token_ids)]),
                        lambda f: envelope([choice("", f.reason, [])]),
                        lambda u: envelope([], u), body.stream_options and body.stream_options.include_usage)
        text, tokens, end = await gen.collect()
        return envelope([choice(text, end.reason, tokens)], _usage(end))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_common(body)
        messages = [{**m.model_dump(exclude_none=True),
                     "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in body.messages]
        try:
            ids = scheduler.chat_ids(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        gen = _submit(scheduler, make_request(body, ids, max_tokens), request)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, Any], finish: str | None, tokens: list[int] | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if body.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [c]}

        if body.stream:
            first = [True]

            def delta(d: Delta) -> dict[str, Any]:
                content = {"role": "assistant", "content": d.text} if first[0] else {"content": d.text}
                first[0] = False
                return chunk(content, None, d.token_ids)

            def usage_chunk(u: dict[str, int]) -> dict[str, Any]:
                return {**chunk({}, None), "choices": [], "usage": u}

            return _sse(gen, delta, lambda f: chunk({}, f.reason), usage_chunk,
                        body.stream_options and body.stream_options.include_usage)
        text, tokens, end = await gen.collect()
        message = {"role": "assistant", "content": text}
        c = {"index": 0, "message": message, "logprobs": None, "finish_reason": end.reason}
        if body.return_token_ids:
            c["token_ids"] = tokens
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [c], "usage": _usage(end)}

    return app


def prompt_ids(scheduler: Scheduler, prompt: Any) -> list[int]:
    """A completions prompt (text, token ids, or a one-element list of either) as token ids."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    try:
        return scheduler.encode(prompt) if isinstance(prompt, str) else list(prompt)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None


def _usage(end: Finished) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


class _Generation:
    """One submitted request seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, scheduler: Scheduler, ticket_fn: Callable[[Callable], Any], request: Request) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.scheduler = scheduler
        self.request = request
        self.ticket = ticket_fn(self._sink)
        self.finished = False

    def _sink(self, event: Delta | Finished) -> None:  # called on the scheduler's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def _note_usage(self, end: Finished) -> None:
        self.request.state.usage = (end.prompt_tokens, end.completion_tokens)

    async def events(self) -> AsyncIterator[Delta | Finished]:
        """The request's events; leaving early (a disconnected client) cancels the request."""
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, Finished):
                    self.finished = True
                    self._note_usage(event)
                yield event
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.scheduler.cancel(self.ticket)

    async def collect(self) -> tuple[str, list[int], Finished]:
        """Wait for the whole result; cancels the request if the client disconnects meanwhile."""
        pieces, tokens = [], []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await self.request.is_disconnected():
                        raise APIError(499, "client disconnected") from None
                    continue
                if isinstance(event, Delta):
                    pieces.append(event.text)
                    tokens.extend(event.token_ids)
                    continue
                self.finished = True
                self._note_usage(event)
                if event.reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                return "".join(pieces), tokens, event
        finally:
            if not self.finished:
                self.scheduler.cancel(self.ticket)


def _submit(scheduler: Scheduler, req: GenerationRequest, request: Request) -> _Generation:
    try:
        return _Generation(scheduler, lambda sink: scheduler.submit(req, sink), request)
    except QueueFull as e:
        raise APIError(503, str(e), "server_busy", code="queue_full") from None
    except ValueError as e:
        param = "max_tokens" if "max_tokens" in str(e) else "stop" if "stop" in str(e) else "prompt"
        raise APIError(400, str(e), param=param,
                       code="context_length_exceeded" if "context" in str(e) else None) from None


def _sse(gen: _Generation, delta_chunk: Callable[[Delta], dict], final_chunk: Callable[[Finished], dict],
         usage_chunk: Callable[[dict], dict], include_usage: bool | None) -> StreamingResponse:
    """Server-sent events: one chunk per step, the finish chunk, optionally usage, then [DONE]."""

    async def body() -> AsyncIterator[str]:
        async for event in gen.events():
            if isinstance(event, Delta):
                yield f"data: {json.dumps(delta_chunk(event))}\n\n"
            elif event.reason == "error":
                err = APIError(500, f"generation failed: {event.error}", "server_error").body()
                yield f"data: {json.dumps(err)}\n\n"
            else:
                yield f"data: {json.dumps(final_chunk(event))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(usage_chunk(_usage(event)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class RequestLog:
    """ASGI middleware: one log line per HTTP request, written when its response has ended (streams
    included): method, path, status, latency and the request's prompt/completion tokens."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [0]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            usage = state.get("usage")
            tokens = f" prompt_tokens={usage[0]} completion_tokens={usage[1]}" if usage else ""
            log.info("%s %s %d %.3fs%s", scope.get("method"), scope.get("path"), status[0],
                     time.perf_counter() - t0, tokens)
