"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (both with SSE streaming),
/v1/models, /health, /metrics (Prometheus text) and /metrics/json. It knows only the scheduler's API:
requests go in through `submit`, events come back through a thread-safe hop onto the event loop
(generations.py), and a client that goes away cancels its request.

Layers of one HTTP request, outside in: RequestLog (one log line; added by whoever runs the server) ->
ResponseCounter (metrics) -> RequestGuard (Content-Type, body limit while reading: guards.py) -> FastAPI
(strict pydantic bodies: protocol.py) -> the routes below. Work that can take long on a large input
(tokenization, chat templates) runs in a small thread pool, never on the event loop, so /health answers while
a 10 MB prompt is tokenized.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate.sampling import SamplingSettings
from . import metrics as metrics_mod
from .generations import Choice, Generations
from .guards import RequestGuard
from .logprob_format import ChatLogprobs, CompletionLogprobs, TokenStrings
from .protocol import APIError, ChatRequest, CompletionRequest, MAX_CHOICES, printable
from .scheduler import Delta, Finished, GenerationRequest, Scheduler

log = logging.getLogger("qsparse.serve")

DEFAULT_MAX_REQUEST_BYTES = 8 * 2 ** 20
INLINE_TOKENIZE_CHARS = 4096  # shorter prompts are tokenized on the event loop (a thread hop costs more)


def create_app(scheduler: Scheduler, model_name: str, *, info: dict[str, Any] | None = None,
               memory: Callable[[], dict[str, Any]] | None = None, reset_peak: Callable[[], None] | None = None,
               manage_scheduler: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               body_timeout: float = 30.0, tokenizer_threads: int = 2) -> FastAPI:
    """The app for one model. With manage_scheduler the app starts the scheduler's thread on startup and
    stops it on shutdown. `memory()` adds device memory figures to /health and /metrics/json. Bodies
    larger than max_request_bytes get a 413, bodies that stall for body_timeout seconds a 408."""
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    pool = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="qsparse-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ours = manage_scheduler and scheduler.dispatch is None
        if ours:  # one hop onto the event loop per scheduler step, not one per event
            scheduler.dispatch = event_hop(asyncio.get_running_loop())
        if manage_scheduler:
            scheduler.start()
        yield
        if manage_scheduler:
            scheduler.shutdown()
        if ours:
            scheduler.dispatch = None
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qsparse-infer", lifespan=lifespan)
    app.state.scheduler = scheduler
    metrics = metrics_mod.ServingMetrics(model_name, scheduler.stats)
    app.state.metrics = metrics
    app.add_middleware(RequestGuard, max_body_bytes=max_request_bytes, body_timeout=body_timeout)
    app.add_middleware(metrics_mod.ResponseCounter, metrics=metrics)
    created = int(time.time())
    vocab = getattr(scheduler.runner, "vocab_size", None)
    strings = TokenStrings(scheduler.tokenizer)

    async def off_loop(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- errors: always the OpenAI shape, never a traceback --------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(e.errors()).body(), status_code=400)

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
    async def prometheus_metrics() -> Response:
        if metrics.disabled:
            raise APIError(503, "Prometheus metrics need prometheus-client: pip install prometheus-client "
                                "(the same figures as JSON: /metrics/json)", "server_error")
        payload, ctype = metrics.render()
        return Response(payload, media_type=ctype)

    @app.get("/metrics/json")
    async def metrics_json() -> dict[str, Any]:
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

    # -- request checks ----------------------------------------------------------------------------

    def check_common(body: CompletionRequest | ChatRequest) -> None:
        if body.model != model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           "not_found_error", "model", "model_not_found")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if body.stop_token_ids and vocab is not None:
            bad = [i for i in body.stop_token_ids if i >= vocab]
            if bad:
                raise APIError(400, f"stop_token_ids: {bad[0]} is not a token id of this model (vocabulary of "
                                    f"{vocab})", param="stop_token_ids")

    def settings_for(body: CompletionRequest | ChatRequest, seed: int | None) -> SamplingSettings:
        try:
            return SamplingSettings(body.temperature, max(body.top_k, 0), body.top_p, body.repetition_penalty, seed,
                                    presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def requests_for(body: CompletionRequest | ChatRequest, prompts: list[list[int]], max_tokens: int | None,
                     logprobs: int | None, prompt_logprobs: bool) -> list[GenerationRequest]:
        """n requests per prompt, with distinct seeds (seed + i when a seed is given, else each its own)."""
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n = {body.n} is more than {MAX_CHOICES} choices "
                                f"in one request", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        out = []
        for ids in prompts:
            for i in range(body.n):
                seed = None if body.seed is None else (body.seed + i) & ((1 << 64) - 1)
                out.append(GenerationRequest(ids, settings_for(body, seed), max_tokens, stop, body.ignore_eos,
                                             stop_token_ids=list(body.stop_token_ids or []), logprobs=logprobs,
                                             prompt_logprobs=prompt_logprobs))
        return out

    async def tokenize(prompt: str) -> list[int]:
        try:
            if len(prompt) <= INLINE_TOKENIZE_CHARS:
                return scheduler.encode(prompt)
            return await off_loop(scheduler.encode, prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def completion_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [await tokenize(prompt)]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]
        return [await tokenize(p) if isinstance(p, str) else list(p) for p in prompt]

    # -- generation ------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_common(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported (only best_of = n)", param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)",
                           param="max_tokens")
        prompts = await completion_prompts(body.prompt)
        echo_texts = [decode(scheduler, p) for p in prompts] if body.echo else None
        want_lp = body.logprobs is not None
        reqs = requests_for(body, prompts, body.max_tokens, body.logprobs, prompt_logprobs=body.echo and want_lp)
        gens = Generations(scheduler, metrics, reqs, request.is_disconnected)
        rid = f"cmpl-{uuid.uuid4().hex}"
        formats = [CompletionLogprobs(strings) for _ in reqs] if want_lp else None

        def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def prompt_of(c: Choice) -> list[int]:
            return prompts[c.index // body.n]

        def head(c: Choice) -> tuple[str, dict[str, list] | None]:
            """What comes before the choice's generated text: the echoed prompt and its logprobs."""
            ids = prompt_of(c)
            lp = None
            if formats is not None:
                fmt = formats[c.index]
                if body.echo:
                    lp = fmt.add(c.prompt_logprobs or [None] * len(ids), ids)
                else:
                    fmt.prev = ids[-1]  # the first generated token's string reads in the prompt's context
            return (echo_texts[c.index // body.n] if echo_texts is not None else ""), lp

        def body_logprobs(c: Choice, entries: list, ids: list[int]) -> dict[str, list] | None:
            return formats[c.index].add(entries, ids) if formats is not None else None

        if body.stream:
            started: set[int] = set()

            def chunk_for(c: Choice, text: str, entries: list, ids: list[int], finish: str | None) -> dict[str, Any]:
                lp_parts = []
                if c.index not in started:
                    started.add(c.index)
                    prefix, lp = head(c)
                    text = prefix + text
                    if lp is not None:
                        lp_parts.append(lp)
                if formats is not None and ids:
                    lp_parts.append(body_logprobs(c, entries, ids))
                out = {"index": c.index, "text": text,
                       "logprobs": CompletionLogprobs.join(lp_parts) if lp_parts else None, "finish_reason": finish}
                if body.return_token_ids:
                    out["token_ids"] = ids
                return envelope([out])

            def delta_chunk(c: Choice, d: Delta) -> dict[str, Any]:
                return chunk_for(c, d.text, d.logprobs or [], d.token_ids, None)

            def finish_chunk(c: Choice, f: Finished) -> dict[str, Any]:
                return chunk_for(c, "", [], [], f.reason)

            return sse(gens, delta_chunk, finish_chunk, lambda u: envelope([], u), include_usage(body), prompts,
                       request)
        choices = await gens.collect()
        note_usage(request, gens, prompts)
        out = []
        for c in choices:
            prefix, lp = head(c)
            if formats is not None:
                lp = CompletionLogprobs.join(([lp] if lp is not None else []) +
                                             [body_logprobs(c, c.logprobs, c.token_ids)])
            ch = {"index": c.index, "text": prefix + "".join(c.text), "logprobs": lp, "finish_reason": c.end.reason}
            if body.return_token_ids:
                ch["token_ids"] = c.token_ids
            out.append(ch)
        return envelope(out, gens.usage(prompts))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{**m.model_dump(exclude_none=True),
                     "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in body.messages]
        ids = await chat_prompt(messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reqs = requests_for(body, [ids], max_tokens, logprobs, False)
        gens = Generations(scheduler, metrics, reqs, request.is_disconnected)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        formats = [ChatLogprobs(strings, prev=ids[-1]) for _ in reqs] if body.logprobs else None

        def content_logprobs(c: Choice, entries: list, tokens: list[int]) -> dict[str, Any] | None:
            if formats is None or not tokens:
                return None
            return {"content": formats[c.index].add(entries, tokens)}

        def chunk(index: int, delta: dict[str, Any], finish: str | None, tokens: list[int] | None = None,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if body.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [c]}

        if body.stream:
            started: set[int] = set()

            def delta_chunk(c: Choice, d: Delta) -> dict[str, Any]:
                content = {"content": d.text}
                if c.index not in started:
                    started.add(c.index)
                    content = {"role": "assistant", "content": d.text}
                return chunk(c.index, content, None, d.token_ids, content_logprobs(c, d.logprobs or [], d.token_ids))

            def finish_chunk(c: Choice, f: Finished) -> dict[str, Any]:
                delta: dict[str, Any] = {}
                if c.index not in started:
                    started.add(c.index)
                    delta = {"role": "assistant", "content": ""}
                return chunk(c.index, delta, f.reason)

            def usage_chunk(u: dict[str, int]) -> dict[str, Any]:
                return {**chunk(0, {}, None), "choices": [], "usage": u}

            return sse(gens, delta_chunk, finish_chunk, usage_chunk, include_usage(body), [ids], request)
        choices = await gens.collect()
        note_usage(request, gens, [ids])
        out = []
        for c in choices:
            lp = content_logprobs(c, c.logprobs, c.token_ids)
            if formats is not None and lp is None:
                lp = {"content": []}
            ch: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                                  "logprobs": lp, "finish_reason": c.end.reason}
            if body.return_token_ids:
                ch["token_ids"] = c.token_ids
            out.append(ch)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": out, "usage": gens.usage([ids])}

    async def chat_prompt(messages: list[dict[str, Any]]) -> list[int]:
        """The conversation as token ids through the model's chat template. A template that raises (many
        HF templates call raise_exception for a role or an order they do not accept) is the client's
        error: a 400 that quotes the template's message."""
        try:
            return await off_loop(scheduler.chat_ids, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # jinja2.TemplateError and whatever else a template's code raises
            raise APIError(400, f"the model's chat template rejected these messages: {type(e).__name__}: {e}",
                           param="messages", code="chat_template_error") from None

    return app


def event_hop(loop: asyncio.AbstractEventLoop) -> Callable[[list], None]:
    """A scheduler dispatch: the step's (sink, event) pairs are delivered on `loop`, in one callback."""

    def deliver(pairs: list) -> None:
        for sink, event in pairs:
            try:
                sink(event)
            except Exception:
                log.exception("a request's sink raised")

    def hop(pairs: list) -> None:
        try:
            loop.call_soon_threadsafe(deliver, pairs)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
            pass
    return hop


def validation_error(errs: list[dict[str, Any]]) -> APIError:
    """pydantic's most telling error as one OpenAI-shaped 400: `param` is the top-level field, the message
    names the path inside it. A union (`stop`: a string or a list) reports one error per branch; the telling
    one is not a plain type mismatch of a branch the input never was, and reaches deepest into the input."""
    if not errs:
        return APIError(400, "invalid request body")
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        return APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', '')}")

    def path(e: dict[str, Any]) -> list[str]:
        return [str(p) for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]

    best = max(errs, key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(path(e))))
    parts = path(best)
    msg = best.get("msg", "invalid value")
    if best.get("type") == "extra_forbidden":
        msg = "unknown field (not part of this API)"
    where = ".".join(parts) or "body"
    return APIError(400, f"{where}: {msg}", param=parts[0] if parts else None)


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or part.startswith(("list[", "dict[", "function-after[", "constrained-",
                                                          "json-or-", "tagged-union[", "nullable[")))


def decode(scheduler: Scheduler, ids: list[int]) -> str:
    tok = scheduler.tokenizer
    return tok.decode(ids) if tok is not None else ""


def include_usage(body: CompletionRequest | ChatRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def note_usage(request: Request, gens: Generations, prompts: list[list[int]]) -> None:
    u = gens.usage(prompts)
    request.state.usage = (u["prompt_tokens"], u["completion_tokens"])


def sse(gens: Generations, delta_chunk: Callable[[Choice, Delta], dict], final_chunk: Callable[[Choice, Finished], dict],
        usage_chunk: Callable[[dict], dict], include_usage: bool, prompts: list[list[int]],
        request: Request) -> StreamingResponse:
    """Server-sent events: the choices' chunks interleaved as they come (each names its index), a finish
    chunk per choice, optionally a usage chunk with no choices, then [DONE]."""

    def event_text(c: Choice, event: Delta | Finished) -> str:
        if isinstance(event, Delta):
            return f"data: {json.dumps(delta_chunk(c, event))}\n\n"
        if event.reason == "error":
            return f"data: {json.dumps(APIError(500, f'generation failed: {event.error}', 'server_error').body())}\n\n"
        return f"data: {json.dumps(final_chunk(c, event))}\n\n"

    async def body() -> AsyncIterator[str]:
        async for batch in gens.batches():
            yield "".join(event_text(c, event) for c, event in batch)
        note_usage(request, gens, prompts)
        if include_usage:
            yield f"data: {json.dumps(usage_chunk(gens.usage(prompts)))}\n\n"
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
            log.info("%s %s %d %.3fs%s", scope.get("method"), printable(scope.get("path", "")), status[0],
                     time.perf_counter() - t0, tokens)
