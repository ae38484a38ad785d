"""The hostile-input battery of issue 17 as client code: each case sends one kind of bad input to a running
`qsparse serve` and checks the answer (one clear JSON error with the right status, or a closed connection
where that is the answer), and that the server still answers /health afterwards.

    python bench/hostile.py --url http://127.0.0.1:8000            # the light cases (seconds)
    python bench/hostile.py --url http://127.0.0.1:8000 --heavy    # + 100 MB bodies, 5000 half-open connections
    python bench/hostile.py --launch --device cuda --heavy --json out.json
        # starts `qsparse serve` itself, and also checks its RSS (flat through the 100 MB uploads) and its log
        # (no traceback, a bounded number of lines)

From Python (bench/soak.py mixes it into its load; tests/serving/test_hostile.py runs it on every CI run):

    results = asyncio.run(run_battery(url, model))
    assert not problems(results)

Every case is bounded in bytes and in time, and talks only to the given URL (a loopback server in the
tests and benchmarks). The cases that need the server's limits (body size, header timeout) read them from
`Limits`; pass the values the server was started with.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import httpx


@dataclass
class Limits:
    """What the server was started with (qsparse serve's defaults)."""
    max_request_bytes: int = 8 * 2 ** 20
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 4096
    body_timeout: float = 30.0


@dataclass
class CaseResult:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Target:
    url: str
    model: str
    limits: Limits = field(default_factory=Limits)

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.url)
        return u.hostname or "127.0.0.1", u.port or 80


# -- checks ----------------------------------------------------------------------------------------


def error_problem(r: httpx.Response | "RawResponse", status: int | tuple[int, ...], param: str | None = "?") -> str:
    """"" if `r` is an OpenAI-shaped JSON error with this status (and param, unless "?"), else what is wrong."""
    want = (status,) if isinstance(status, int) else status
    if r.status_code not in want:
        return f"status {r.status_code}, expected {want}: {r.text[:200]!r}"
    if "Traceback" in r.text:
        return "the answer contains a traceback"
    try:
        err = json.loads(r.text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error body: {r.text[:200]!r}"
    if set(err) != {"message", "type", "param", "code"} or not err["message"]:
        return f"error body lacks the OpenAI fields: {err!r}"
    if param != "?" and err["param"] != param:
        return f"param {err['param']!r}, expected {param!r}"
    return ""


@dataclass
class RawResponse:
    status_code: int
    text: str


async def raw_exchange(t: Target, data: bytes, *, read_timeout: float = 10.0,
                       body_source: Callable[[], Any] | None = None) -> RawResponse | None:
    """Send raw bytes (then, optionally, what body_source yields until the server answers or closes) and
    return the parsed response, or None when the server closed the connection without one."""
    host, port = t.host_port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        answer = asyncio.ensure_future(_read_response(reader, read_timeout))
        if body_source is not None:
            async for chunk in body_source():
                if answer.done():
                    break
                try:
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 5)
                except (ConnectionError, asyncio.TimeoutError):
                    break
        raw = await answer
    except ConnectionError:
        return None
    finally:
        writer.close()
    if not raw:
        return None
    line, _, rest = raw.partition(b"\r\n")
    try:
        status = int(line.split()[1])
    except (IndexError, ValueError):
        return RawResponse(0, raw[:200].decode("latin-1"))
    return RawResponse(status, rest.partition(b"\r\n\r\n")[2].decode("utf-8", "replace"))


async def _read_response(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Bytes up to the end of one response (its Content-Length), EOF, a reset or the timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = b""
    while not _complete(data):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            more = await asyncio.wait_for(reader.read(65536), remaining)
        except (asyncio.TimeoutError, ConnectionError):
            break
        if not more:
            break
        data += more
    return data


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def post_head(path: str, content_length: int | None, ctype: str = "application/json", chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Type: {ctype}"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- the cases ---------------------------------------------------------------------------------------

Case = Callable[[httpx.AsyncClient, Target], Awaitable[str]]
LIGHT: dict[str, Case] = {}
HEAVY: dict[str, Case] = {}


def case(table: dict[str, Case]):
    def register(fn: Case) -> Case:
        table[fn.__name__] = fn
        return fn
    return register


def _json_case(name: str, path: str, body: dict[str, Any] | str, status: int, param: str | None = "?") -> None:
    async def run(ac: httpx.AsyncClient, t: Target) -> str:
        payload = body.replace("MODEL", json.dumps(t.model)) if isinstance(body, str) else \
            json.dumps({"model": t.model, **body} if "model" not in body else body)
        r = await ac.post(path, content=payload.encode("utf-8", "surrogatepass"),
                          headers={"content-type": "application/json"})
        return error_problem(r, status, param)
    run.__name__ = name
    LIGHT[name] = run


C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
_json_case("max_tokens_true", C, {"prompt": "x", "max_tokens": True}, 400, "max_tokens")
_json_case("max_tokens_string", C, {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens")
_json_case("max_tokens_float", C, {"prompt": "x", "max_tokens": 10.0}, 400, "max_tokens")
_json_case("max_tokens_negative", C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens")
_json_case("max_tokens_zero_without_echo", C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens")
_json_case("temperature_infinity", C, '{"model": MODEL, "prompt": "x", "temperature": Infinity}', 400, "temperature")
_json_case("temperature_nan", C, '{"model": MODEL, "prompt": "x", "temperature": NaN}', 400, "temperature")
_json_case("temperature_overflow", C, '{"model": MODEL, "prompt": "x", "temperature": 1e400}', 400, "temperature")
_json_case("temperature_string", C, {"prompt": "x", "temperature": "0.5"}, 400, "temperature")
_json_case("top_p_bool", C, {"prompt": "x", "top_p": True}, 400, "top_p")
_json_case("seed_too_large", C, {"prompt": "x", "seed": 2 ** 70}, 400, "seed")
_json_case("top_k_too_large", C, {"prompt": "x", "top_k": 2 ** 40}, 400, "top_k")
_json_case("stream_string", C, {"prompt": "x", "stream": "yes"}, 400, "stream")
_json_case("n_zero", C, {"prompt": "x", "n": 0}, 400, "n")
_json_case("n_huge", C, {"prompt": "x", "n": 100000}, 400, "n")
_json_case("logprobs_huge", C, {"prompt": "x", "logprobs": 1000}, 400, "logprobs")
_json_case("penalty_out_of_range", C, {"prompt": "x", "presence_penalty": 5.0}, 400, "presence_penalty")
_json_case("unknown_field", C, {"prompt": "x", "max_token": 5}, 400, "max_token")
_json_case("missing_prompt", C, {}, 400, "prompt")
_json_case("prompt_wrong_type", C, {"prompt": {"text": "x"}}, 400, "prompt")
_json_case("prompt_float_ids", C, {"prompt": [1.0, 2.0]}, 400, "prompt")
_json_case("prompt_ids_out_of_vocab", C, {"prompt": [2 ** 40]}, 400, "prompt")
_json_case("prompt_empty_list", C, {"prompt": []}, 400, "prompt")
_json_case("prompt_lone_surrogate", C, '{"model": MODEL, "prompt": "ab\\ud800cd"}', 400, "prompt")
_json_case("model_lone_surrogate", C, '{"model": "\\ud800", "prompt": "x"}', 400, "model")
_json_case("model_unknown", C, {"model": "no-such-model", "prompt": "x"}, 404, "model")
_json_case("model_not_a_string", C, {"model": 7, "prompt": "x"}, 400, "model")
_json_case("stop_too_many", C, {"prompt": "x", "stop": [f"s{i}" for i in range(1000)]}, 400, "stop")
_json_case("stop_too_long", C, {"prompt": "x", "stop": "y" * 100_000}, 400, "stop")
_json_case("stop_empty_string", C, {"prompt": "x", "stop": [""]}, 400, "stop")
_json_case("stop_token_ids_too_many", C, {"prompt": "x", "stop_token_ids": list(range(10_000))}, 400, "stop_token_ids")
_json_case("stop_token_ids_out_of_vocab", C, {"prompt": "x", "stop_token_ids": [2 ** 40]}, 400, "stop_token_ids")
_json_case("logit_bias", C, {"prompt": "x", "logit_bias": {"5": 100.0}}, 400, "logit_bias")
_json_case("stream_options_without_stream", C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
           "stream_options")
_json_case("chat_no_messages", CHAT, {"messages": []}, 400, "messages")
_json_case("chat_message_not_an_object", CHAT, {"messages": ["hi"]}, 400, "messages")
_json_case("chat_content_number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages")
_json_case("chat_role_lone_surrogate", CHAT, '{"model": MODEL, "messages": [{"role": "\\udfff", "content": "x"}]}',
           400, "messages")
_json_case("chat_top_logprobs_without_logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs")
_json_case("chat_max_completion_tokens_bool", CHAT, {"messages": USER, "max_completion_tokens": False}, 400,
           "max_completion_tokens")


@case(LIGHT)
async def chat_unknown_role(ac: httpx.AsyncClient, t: Target) -> str:
    """Templates often raise for a role they do not know: a 400, never a 500 (a 200 is fine too, for a
    template that accepts any role)."""
    r = await ac.post(CHAT, json={"model": t.model, "messages": [{"role": "wizard", "content": "x"}],
                                  "max_tokens": 1})
    return "" if r.status_code == 200 else error_problem(r, 400, "messages")


@case(LIGHT)
async def invalid_json(ac: httpx.AsyncClient, t: Target) -> str:
    r = await ac.post(C, content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
    return error_problem(r, 400)


@case(LIGHT)
async def deeply_nested_json(ac: httpx.AsyncClient, t: Target) -> str:
    r = await ac.post(C, content=b"[" * 200_000 + b"]" * 200_000, headers={"content-type": "application/json"})
    return error_problem(r, (400, 413))


@case(LIGHT)
async def body_not_utf8(ac: httpx.AsyncClient, t: Target) -> str:
    r = await ac.post(C, content=b'{"model": "\xff\xfe", "prompt": "x"}', headers={"content-type": "application/json"})
    return error_problem(r, 400)


@case(LIGHT)
async def content_type_text(ac: httpx.AsyncClient, t: Target) -> str:
    r = await ac.post(C, content=json.dumps({"model": t.model, "prompt": "x"}), headers={"content-type": "text/plain"})
    return error_problem(r, 415)


@case(LIGHT)
async def content_type_form(ac: httpx.AsyncClient, t: Target) -> str:
    r = await ac.post(C, data={"model": t.model, "prompt": "x"})
    return error_problem(r, 415)


@case(LIGHT)
async def content_type_missing(ac: httpx.AsyncClient, t: Target) -> str:
    res = await raw_exchange(t, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    return "no answer" if res is None else error_problem(res, 415)


@case(LIGHT)
async def unknown_path(ac: httpx.AsyncClient, t: Target) -> str:
    return error_problem(await ac.get("/v1/nothing-here"), 404)


@case(LIGHT)
async def wrong_method(ac: httpx.AsyncClient, t: Target) -> str:
    return error_problem(await ac.get(C), 405)


@case(LIGHT)
async def declared_body_too_large(ac: httpx.AsyncClient, t: Target) -> str:
    """Content-Length past the limit, body never sent: the answer must come without waiting for it."""
    t0 = time.perf_counter()
    res = await raw_exchange(t, post_head(C, 100 * 2 ** 20), read_timeout=5)
    if res is None:
        return "the server closed the connection without an answer"
    took = time.perf_counter() - t0
    return error_problem(res, 413) or ("" if took < 3 else f"the 413 took {took:.1f} s")


@case(LIGHT)
async def invalid_content_length(ac: httpx.AsyncClient, t: Target) -> str:
    res = await raw_exchange(t, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: -5\r\n\r\n")
    return "" if res is None or res.status_code == 400 else f"status {res.status_code}, expected 400 or a close"


async def _chunked_upload(t: Target, total: int) -> str:
    """A chunked body of `total` bytes (more than the limit): a 413 must come before it is all sent."""
    sent = [0]
    piece = b"x" * 65536
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    async def chunks():
        start = b'{"model": "m", "prompt": "'
        yield f"{len(start):x}\r\n".encode() + start + b"\r\n"
        while sent[0] < total:
            sent[0] += len(piece)
            yield frame
    res = await raw_exchange(t, post_head(C, None, chunked=True), read_timeout=10, body_source=chunks)
    if res is None:
        return "the server closed the connection without an answer"
    if sent[0] >= total:
        return f"the server read the whole {total} byte body before answering"
    return error_problem(res, 413)


@case(LIGHT)
async def chunked_body_too_large(ac: httpx.AsyncClient, t: Target) -> str:
    return await _chunked_upload(t, t.limits.max_request_bytes + 16 * 2 ** 20)


@case(HEAVY)
async def chunked_body_100mb(ac: httpx.AsyncClient, t: Target) -> str:
    return await _chunked_upload(t, 100 * 2 ** 20)


@case(LIGHT)
async def huge_header(ac: httpx.AsyncClient, t: Target) -> str:
    """A 1 MB header: a 4xx or a closed connection, and the server stays up."""
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2 ** 20 + b"\r\n\r\n"
    try:
        res = await raw_exchange(t, data, read_timeout=10)
    except (ConnectionError, OSError):
        res = None
    if res is not None and not 400 <= res.status_code < 500:
        return f"status {res.status_code} for a 1 MB header"
    return ""


@case(LIGHT)
async def garbage_request_line(ac: httpx.AsyncClient, t: Target) -> str:
    res = await raw_exchange(t, b"\x00\x01\x02 NOT HTTP\r\n\r\n", read_timeout=5)
    return "" if res is None or res.status_code == 400 else f"status {res.status_code} for garbage"


@case(LIGHT)
async def big_prompt_does_not_block(ac: httpx.AsyncClient, t: Target) -> str:
    """A prompt of ~3/4 of the body limit (far over the context): 400, and /health keeps answering while it
    is tokenized."""
    size = min(t.limits.max_request_bytes * 3 // 4, 4 * 2 ** 20)
    big = asyncio.ensure_future(ac.post(C, json={"model": t.model, "prompt": "ROMEO: wherefore " * (size // 17),
                                                 "max_tokens": 1}))
    worst = 0.0
    while not big.done():
        t0 = time.perf_counter()
        r = await ac.get("/health")
        worst = max(worst, time.perf_counter() - t0)
        if r.status_code != 200:
            return f"/health answered {r.status_code} meanwhile"
        await asyncio.sleep(0.05)
    problem = error_problem(await big, 400, "prompt")
    return problem or ("" if worst < 1.0 else f"/health took {worst:.2f} s while the big prompt was tokenized")


@case(LIGHT)
async def half_open_connections(ac: httpx.AsyncClient, t: Target, count: int = 200) -> str:
    """Connections that never send a request: /health must still answer while they are open."""
    host, port = t.host_port
    socks = []
    try:
        for _ in range(count):
            try:
                socks.append(await asyncio.wait_for(asyncio.open_connection(host, port), 5))
            except (OSError, asyncio.TimeoutError):
                break
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=t.url, timeout=10) as fresh:
            r = await fresh.get("/health")
        took = time.perf_counter() - t0
        if r.status_code != 200:
            return f"/health answered {r.status_code} with {len(socks)} half-open connections"
        return "" if took < 2 else f"/health took {took:.1f} s with {len(socks)} half-open connections"
    finally:
        for _, w in socks:
            w.close()


@case(HEAVY)
async def half_open_flood(ac: httpx.AsyncClient, t: Target) -> str:
    """More half-open connections than the server's limit."""
    _raise_own_fd_limit(t.limits.max_connections + 2000)
    return await half_open_connections(ac, t, count=t.limits.max_connections + 1000)


@case(LIGHT)
async def partial_head_times_out(ac: httpx.AsyncClient, t: Target) -> str:
    """Half a request head, then silence: the server must close the connection after its header timeout."""
    host, port = t.host_port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        t0 = time.perf_counter()
        try:
            data = await asyncio.wait_for(reader.read(), t.limits.header_timeout + 5)
        except asyncio.TimeoutError:
            return f"still open {t.limits.header_timeout + 5:g} s later (header timeout {t.limits.header_timeout:g} s)"
        except ConnectionError:
            data = b""
        took = time.perf_counter() - t0
        if data and not data.startswith(b"HTTP/1.1 4"):
            return f"answered {data[:40]!r}"
        return "" if took >= t.limits.header_timeout * 0.5 else f"closed after {took:.2f} s, before the timeout"
    finally:
        writer.close()


@case(LIGHT)
async def slow_body_times_out(ac: httpx.AsyncClient, t: Target) -> str:
    """A body that stops halfway: 408 (or a close), not a connection held forever."""
    host, port = t.host_port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(post_head(C, 1000) + b'{"model": ')
        await writer.drain()
        wait = t.limits.body_timeout + 10
        try:
            data = await asyncio.wait_for(reader.read(), wait)
        except asyncio.TimeoutError:
            return f"no answer within {wait:g} s to a stalled body"
        except ConnectionError:
            data = b""
        return "" if not data or data.startswith(b"HTTP/1.1 408") else f"answered {data[:40]!r}"
    finally:
        writer.close()


def _raise_own_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard != resource.RLIM_INFINITY else need, hard))


# -- running -----------------------------------------------------------------------------------------

SLOW = {"partial_head_times_out", "slow_body_times_out"}  # they wait for the server's timeouts


async def run_battery(url: str, model: str, *, limits: Limits | None = None, heavy: bool = False,
                      only: set[str] | None = None, skip: set[str] = frozenset()) -> list[CaseResult]:
    """Run the cases one after the other; each result says whether the answer was the expected one, and a
    final "server_still_up" case checks /health."""
    t = Target(url.rstrip("/"), model, limits or Limits())
    cases = {**LIGHT, **(HEAVY if heavy else {})}
    results = []
    async with httpx.AsyncClient(base_url=t.url, timeout=httpx.Timeout(60.0)) as ac:
        for name, fn in cases.items():
            if (only is not None and name not in only) or name in skip:
                continue
            t0 = time.perf_counter()
            try:
                problem = await asyncio.wait_for(fn(ac, t), 120)
            except Exception as e:  # a case's own failure (e.g. the server is gone) is a result too
                problem = f"{type(e).__name__}: {e}"
            results.append(CaseResult(name, not problem, problem, time.perf_counter() - t0))
        t0 = time.perf_counter()
        try:
            r = await ac.get("/health")
            problem = "" if r.status_code == 200 and r.json().get("status") == "ok" else f"/health: {r.status_code}"
        except Exception as e:
            problem = f"/health failed: {type(e).__name__}: {e}"
        results.append(CaseResult("server_still_up", not problem, problem, time.perf_counter() - t0))
    return results


def problems(results: list[CaseResult]) -> list[str]:
    return [f"{r.name}: {r.detail}" for r in results if not r.ok]


class LaunchedServer:
    """`qsparse serve` in a subprocess on a free loopback port, its log in a file; stopped on exit."""

    def __init__(self, device: str, limits: Limits, extra: list[str]) -> None:
        import socket
        import subprocess
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hostile-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "qsparse_infer.cli", "serve", "--port", str(self.port), "--device", device,
               "--log-level", "warning", "--max-request-bytes", str(limits.max_request_bytes),
               "--timeout-header", str(limits.header_timeout), "--max-connections", str(limits.max_connections),
               "--timeout-body", str(limits.body_timeout),
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "LaunchedServer":
        deadline = time.time() + 300
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"qsparse serve did not come up: {self.log_text()[-2000:]}")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--launch", action="store_true", help="start `qsparse serve` (the built-in model) itself")
    p.add_argument("--device", default="auto", help="with --launch (default: %(default)s)")
    p.add_argument("--model", default=None, help="the served model id (default: ask /health)")
    p.add_argument("--heavy", action="store_true", help="also the 100 MB body and the connection flood")
    p.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes)
    p.add_argument("--timeout-header", type=float, default=Limits.header_timeout)
    p.add_argument("--max-connections", type=int, default=Limits.max_connections)
    p.add_argument("--timeout-body", type=float, default=Limits.body_timeout)
    p.add_argument("--skip-slow", action="store_true", help="skip the cases that wait for the server's timeouts")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    limits = Limits(args.max_request_bytes, args.timeout_header, max_connections=args.max_connections,
                    body_timeout=args.timeout_body)
    skip = SLOW if args.skip_slow else frozenset()
    extra: dict[str, Any] = {}
    if args.launch:
        with LaunchedServer(args.device, limits, []) as server:
            model = httpx.get(server.url + "/health", timeout=30).json()["model"]
            rss0 = server.rss_bytes()
            results = asyncio.run(run_battery(server.url, model, limits=limits, heavy=args.heavy, skip=skip))
            rss1 = server.rss_bytes()
            server.__exit__()
            log = server.log_text()
        lines = log.splitlines()
        extra = {"rss_before_mb": rss0 / 2 ** 20, "rss_after_mb": rss1 / 2 ** 20, "log_lines": len(lines),
                 "log_tracebacks": log.count("Traceback")}
        results.append(CaseResult("server_log_has_no_traceback", extra["log_tracebacks"] == 0,
                                  "" if extra["log_tracebacks"] == 0 else log[log.index("Traceback"):][:500], 0.0))
        results.append(CaseResult("server_log_is_short", len(lines) <= 200,
                                  "" if len(lines) <= 200 else f"{len(lines)} log lines", 0.0))
        grown = (rss1 - rss0) / 2 ** 20
        results.append(CaseResult("server_rss_flat", grown < 128,
                                  "" if grown < 128 else f"RSS grew by {grown:.0f} MB", 0.0))
    else:
        model = args.model or httpx.get(args.url + "/health", timeout=30).json()["model"]
        results = asyncio.run(run_battery(args.url, model, limits=limits, heavy=args.heavy, skip=skip))
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:36s} {r.seconds:6.2f} s  {r.detail}")
    for k, v in extra.items():
        print(f"     {k}: {v:.1f}" if isinstance(v, float) else f"     {k}: {v}")
    bad = problems(results)
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [r.__dict__ for r in results], **extra, "heavy": args.heavy}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
