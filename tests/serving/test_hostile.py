"""Hostile load against a real server on loopback (issue 17): bad input gets one clear error, the server
loses nothing and stays up. The whole battery of bench/hostile.py runs here (with small limits so that the
CPU suite stays fast), plus what a client cannot see from outside: the server's memory during a 100 MB
upload, its event loop during a large tokenization, and its log during a connection flood."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from qsparse_infer.serving.api import create_app  # noqa: E402
from qsparse_infer.serving.runner import CpuRunner  # noqa: E402
from qsparse_infer.serving.scheduler import Scheduler  # noqa: E402
from qsparse_infer.serving.server import ConnectionLimits, RateLimitFilter, install_log_rate_limit  # noqa: E402
from serving_helpers import ServerThread  # noqa: E402

MODEL = "bard"
SLOTS = 2
MAX_BODY = 2 ** 20
LIMITS = ConnectionLimits(max_connections=64, header_timeout=0.5, keep_alive_timeout=0.5, max_header_bytes=16384)
BODY_TIMEOUT = 0.5
pytestmark = pytest.mark.filterwarnings("ignore:.*CPU.*:UserWarning")


def _load_bench(name: str):
    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


hostile = _load_bench("hostile")


@pytest.fixture(scope="module")
def engine(chat_engine):
    return chat_engine


class LogCapture(logging.Handler):
    """Every record that the server's loggers let through (after their rate limit)."""

    NAMES = ("uvicorn", "uvicorn.error", "asyncio", "qsparse.serve", "qsparse.serve.http")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "LogCapture":
        self.records.clear()
        install_log_rate_limit().reset()  # a fresh interval: what earlier tests logged does not count
        for n in self.NAMES:
            logging.getLogger(n).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for n in self.NAMES:
            logging.getLogger(n).removeHandler(self)

    def warnings(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def server(engine):
    sched = Scheduler(CpuRunner(engine, SLOTS), engine.tokenizer, max_queue=8, prefill_chunk=64)
    app = create_app(sched, MODEL, max_request_bytes=MAX_BODY, body_timeout=BODY_TIMEOUT)
    with ServerThread(app, LIMITS) as s:
        s.scheduler = sched
        yield s


def limits() -> "hostile.Limits":
    return hostile.Limits(max_request_bytes=MAX_BODY, header_timeout=LIMITS.header_timeout,
                          keep_alive_timeout=LIMITS.keep_alive_timeout, max_connections=LIMITS.max_connections,
                          body_timeout=BODY_TIMEOUT)


def wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        st = server.scheduler.stats()
        if (st["active"], st["waiting"], st["free_slots"]) == (0, 0, SLOTS) or time.time() > deadline:
            return st
        time.sleep(0.05)


def test_the_whole_battery(server, engine):
    with LogCapture() as logs:
        results = asyncio.run(hostile.run_battery(server.url, MODEL, limits=limits()))
    assert len(results) == len(hostile.LIGHT) + 1
    assert not hostile.problems(results), "\n".join(hostile.problems(results))
    # nothing is lost: every slot is free again and a normal request still gets the right answer
    st = wait_idle(server)
    assert (st["active"], st["waiting"], st["free_slots"], st["errors"]) == (0, 0, SLOTS, 0)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == engine.generate("ROMEO:", max_new_tokens=5, temperature=0)
    assert not [r for r in logs.records if r.exc_info], "a traceback was logged"


def test_chat_template_error_is_a_400_quoting_the_template(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "wizard", "content": "hi"}]}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "Unknown role: wizard" in err["message"] and err["param"] == "messages"
    assert err["code"] == "chat_template_error"


def test_lone_surrogate_model_is_a_400_naming_the_field(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "\\ud800", "prompt": "x"}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "Unicode" in r.json()["error"]["message"]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_100mb_upload_is_cut_off_without_buffering(server):
    """The server runs in this process: its memory must not grow by the upload's size, the answer is a 413
    that comes before the body has been sent, and a declared 100 MB Content-Length is answered at once."""
    t = hostile.Target(server.url, MODEL, limits())
    before = _rss_bytes()
    problem = asyncio.run(hostile._chunked_upload(t, 100 * 2 ** 20))
    grown = _rss_bytes() - before
    assert problem == ""
    assert grown < 32 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.0f} MB during a 100 MB upload"
    t0 = time.perf_counter()
    assert asyncio.run(hostile.declared_body_too_large(None, t)) == ""
    assert time.perf_counter() - t0 < 2


def test_large_prompt_is_tokenized_off_the_event_loop(engine):
    """A 2 MB prompt (the built-in tokenizer takes about a second on it) under a raised body limit: /health
    answers in well under that meanwhile, and the prompt gets its 400 (far past the context)."""
    sched = Scheduler(CpuRunner(engine, 1), engine.tokenizer)
    app = create_app(sched, MODEL, max_request_bytes=8 * 2 ** 20)
    prompt = "ROMEO: wherefore art thou " * (2 * 2 ** 20 // 26)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            big = asyncio.ensure_future(ac.post("/v1/completions", json={"model": MODEL, "prompt": prompt}))
            await asyncio.sleep(0.2)  # let the body arrive and the tokenization start
            gaps = []
            while not big.done():
                t0 = time.perf_counter()
                assert (await ac.get("/health")).status_code == 200
                gaps.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)
            return await big, gaps

    with ServerThread(app) as s:
        t0 = time.perf_counter()
        r, gaps = asyncio.run(go(s.url))
        took = time.perf_counter() - t0
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    assert len(gaps) >= 3, f"the prompt took only {took:.2f} s: too fast to show anything"
    assert max(gaps) < 0.25 * took, f"/health took up to {max(gaps):.2f} s during a {took:.2f} s tokenization"


def test_connection_flood_is_bounded_and_logged_once(server):
    """Ten times the connection limit in half-open connections: the server keeps at most its limit open
    (evicting the oldest head-less ones), /health still answers, the log has a line or two per kind of
    event and no traceback, and once the flood stops the header timeout closes what is left."""
    host, port = "127.0.0.1", server.port
    socks = []
    with LogCapture() as logs:
        try:
            for _ in range(10 * LIMITS.max_connections):
                s = socket.create_connection((host, port), timeout=5)
                socks.append(s)
            time.sleep(0.3)
            assert server.open_connections <= LIMITS.max_connections + 1
            r = httpx.get(server.url + "/health", timeout=10)
            assert r.status_code == 200
            for s in socks[:5]:  # the oldest were evicted: the server closed them
                s.settimeout(5)
                assert s.recv(100) == b""
        finally:
            for s in socks:
                s.close()
        deadline = time.time() + 5 * LIMITS.header_timeout
        while server.open_connections and time.time() < deadline:
            time.sleep(0.1)
        assert server.open_connections == 0
    warnings = logs.warnings()
    assert warnings and len(warnings) <= 4, [r.getMessage() for r in warnings]
    assert not [r for r in logs.records if r.exc_info]
    kinds = {r.msg for r in warnings}
    assert any("oldest connections" in k for k in kinds)
    assert server.server.guard_counters["evicted"] >= 9 * LIMITS.max_connections - 5


def test_busy_connections_over_the_limit_get_a_503(engine):
    """When every connection is in the middle of a request, a new one is answered 503 and closed."""
    sched = Scheduler(CpuRunner(engine, 1), engine.tokenizer)
    app = create_app(sched, MODEL, body_timeout=5.0)
    tight = ConnectionLimits(max_connections=4, header_timeout=5.0)
    with ServerThread(app, tight) as s:
        busy = []
        for _ in range(4):  # each sends a whole head, then half of its body: busy, not evictable
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(hostile.post_head("/v1/completions", 100) + b'{"model"')
            busy.append(c)
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        for c in busy + [extra]:
            c.close()
        deadline = time.time() + 5
        while s.open_connections and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200


def test_keep_alive_connection_is_closed_when_idle(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += c.recv(4096)
        assert data.startswith(b"HTTP/1.1 200")
        t0 = time.perf_counter()
        while c.recv(4096):
            pass
        took = time.perf_counter() - t0
    assert LIMITS.keep_alive_timeout * 0.5 < took < LIMITS.keep_alive_timeout + 3


def test_rate_limit_filter_counts_and_strips_connection_tracebacks():
    flt = RateLimitFilter(interval=60)
    lg = logging.getLogger("qsparse.test.ratelimit")

    def record(msg, exc=None):
        r = lg.makeRecord(lg.name, logging.ERROR, __file__, 1, msg, (), (type(exc), exc, None) if exc else None)
        return r

    first = record("socket.accept() out of system resource", OSError(24, "Too many open files"))
    assert flt.filter(first) and first.exc_info is None and "Too many open files" in first.getMessage()
    assert not any(flt.filter(record("socket.accept() out of system resource")) for _ in range(1000))
    assert flt.filter(record("another kind of event"))
    flt.interval = 0.0
    again = record("socket.accept() out of system resource")
    assert flt.filter(again) and "1000 more" in again.getMessage()
    bug = record("Exception in ASGI application", ValueError("a real bug"))
    assert flt.filter(bug) and bug.exc_info is not None  # a program error keeps its traceback
    info = lg.makeRecord(lg.name, logging.INFO, __file__, 1, "GET /health 200", (), None)
    assert all(RateLimitFilter(60).filter(info) for _ in range(3))


def test_battery_on_the_other_http_implementation(engine):
    """uvicorn runs on httptools when it is installed, else on h11; the other tests use that default, this
    one the other implementation (when it is installed): the guard must hold on both."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if AutoHTTPProtocol is H11Protocol:
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        base = H11Protocol
    sched = Scheduler(CpuRunner(engine, SLOTS), engine.tokenizer, max_queue=8, prefill_chunk=64)
    app = create_app(sched, MODEL, max_request_bytes=MAX_BODY, body_timeout=BODY_TIMEOUT)
    with ServerThread(app, LIMITS, protocol_base=base) as s:
        quick = set(hostile.LIGHT) - {"big_prompt_does_not_block"}  # the tokenizer is not the protocol's
        results = asyncio.run(hostile.run_battery(s.url, MODEL, limits=limits(), only=quick))
        assert not hostile.problems(results), "\n".join(hostile.problems(results))
        socks = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(3 * LIMITS.max_connections)]
        try:
            assert httpx.get(s.url + "/health", timeout=10).status_code == 200
            assert s.open_connections <= LIMITS.max_connections + 1
        finally:
            for c in socks:
                c.close()
        assert s.server.guard_counters["evicted"] >= 2 * LIMITS.max_connections - 5
