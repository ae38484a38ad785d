"""uvicorn, hardened for hostile connections: a connection limit, a header timeout, a cap on the bytes of a
request head, uvicorn's keep-alive timeout, and logs that say each kind of trouble once per interval
instead of once per connection.

Why not uvicorn's own options alone: `limit_concurrency` answers 503 only once a request head arrived, so
connections that never send one still take a file descriptor each; and uvicorn has no header timeout, so a
client that opens a connection and sends nothing (or half a head) holds it forever. 20k such connections
exhaust the descriptors, and every failed accept() then logs a traceback.

Here, at `max_connections` open connections a new one first evicts the oldest connection that is waiting
for a request head (a half-open one, or an idle keep-alive one); only when every connection is busy with a
request is the new one answered 503 and closed. A connection that has not completed its request head within
`header_timeout` seconds (counted from when it opened, or from its previous response) is closed, as is one
whose head grows past `max_header_bytes`. The server is the same uvicorn server otherwise (h11 or
httptools, whichever uvicorn picks).
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import uvicorn

log = logging.getLogger("qsparse.serve.http")

# Descriptors kept free for everything that is not a client connection (model files, the listening socket,
# logs, torch / tokenizer threads' files).
FD_RESERVE = 256
DEFAULT_MAX_CONNECTIONS = 4096


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = 10.0  # seconds to complete a request head
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's option)
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_connections", "header_timeout", "keep_alive_timeout", "max_header_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")


# -- logs: one line per kind of event and interval -------------------------------------------------


class RateLimitFilter(logging.Filter):
    """Lets the first record of each kind (logger + message template) through per `interval` seconds and
    counts the rest; the next record let through says how many were suppressed. Connection-level errors
    (OSError and its subclasses: resets, broken pipes, EMFILE) lose their traceback: a flood of them is
    one line, never a traceback per connection. Records below WARNING pass untouched (the request log)."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__("qsparse-rate-limit")
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def reset(self) -> None:
        with self._lock:
            self._last.clear()
            self._suppressed.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        if record.exc_info and isinstance(record.exc_info[1], OSError):
            e = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()}: {type(e).__name__}: {e}", None
            record.exc_info = record.exc_text = None
        if skipped:
            record.msg, record.args = f"{record.getMessage()} (and {skipped} more like it in the last " \
                                      f"{self.interval:g} s)", None
        return True


RATE_LIMITED_LOGGERS = ("uvicorn", "uvicorn.error", "asyncio", "qsparse.serve", "qsparse.serve.http")


def install_log_rate_limit(interval: float = 10.0) -> RateLimitFilter:
    """Put one RateLimitFilter on the loggers that hostile traffic writes to (idempotent)."""
    for name in RATE_LIMITED_LOGGERS:
        lg = logging.getLogger(name)
        for f in lg.filters:
            if isinstance(f, RateLimitFilter):
                return f
    flt = RateLimitFilter(interval)
    for name in RATE_LIMITED_LOGGERS:
        logging.getLogger(name).addFilter(flt)
    return flt


# -- the connection guard --------------------------------------------------------------------------


def _busy_response() -> bytes:
    body = json.dumps({"error": {"message": "the server has too many open connections; try again later",
                                 "type": "server_busy", "param": None, "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _GuardedConnection:
    """Mixed in before uvicorn's H11Protocol or HttpToolsProtocol (both set `self.cycle` when a request
    head is complete and call `on_response_complete` when its response has been sent)."""

    limits: ConnectionLimits
    waiting_for_head: "OrderedDict[_GuardedConnection, None]"  # oldest first; one per server (class)
    counters: dict[str, int]

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self.counters["connections"] += 1
        if len(self.connections) > self.limits.max_connections and not self._evict_one():  # type: ignore[attr-defined]
            self.counters["refused"] += 1
            log.warning("connection limit (%d) reached and every connection is busy: refusing new connections "
                        "with 503", self.limits.max_connections)
            transport.write(_busy_response())
            transport.close()
            return
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        before = self.cycle  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]
        if self not in self.waiting_for_head:
            return
        if self.cycle is not before:  # type: ignore[attr-defined]
            self._head_done()
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.counters["header_too_large"] += 1
            log.warning("closed connections whose request head exceeded %d bytes", self.limits.max_header_bytes)
            self._close()

    def on_response_complete(self) -> None:
        before = self.cycle  # type: ignore[attr-defined]
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and self.cycle is before:  # type: ignore[attr-defined]
            self._wait_for_head()  # keep-alive: the next request's head is timed from now

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)  # type: ignore[misc]

    # --

    def _wait_for_head(self) -> None:
        self._head_done()
        self._head_bytes = 0
        self.waiting_for_head[self] = None
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self.limits.header_timeout, self._head_timeout)

    def _head_done(self) -> None:
        self.waiting_for_head.pop(self, None)
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self in self.waiting_for_head and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.counters["header_timeouts"] += 1
            log.warning("closed connections that sent no complete request head within %g s",
                        self.limits.header_timeout)
            self._close()

    def _evict_one(self) -> bool:
        """Close the oldest connection that is waiting for a request head; False if there is none."""
        while self.waiting_for_head:
            victim, _ = self.waiting_for_head.popitem(last=False)
            if victim is self or victim.transport.is_closing():
                continue
            self.counters["evicted"] += 1
            log.warning("connection limit (%d) reached: closing the oldest connections that have not sent a "
                        "request", self.limits.max_connections)
            victim._close()
            return True
        return False

    def _close(self) -> None:
        self._head_done()
        self.transport.close()  # type: ignore[attr-defined]


def guarded_protocol(limits: ConnectionLimits, base: type | None = None) -> type:
    """A uvicorn HTTP protocol class with the guard above, over `base` (default: the one uvicorn picks)."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    counters = {"connections": 0, "refused": 0, "evicted": 0, "header_timeouts": 0, "header_too_large": 0}
    return type(f"Guarded{base.__name__}", (_GuardedConnection, base),
                {"limits": limits, "waiting_for_head": OrderedDict(), "counters": counters})


# -- the server --------------------------------------------------------------------------------------


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit_for(requested: int | None, open_files: int) -> int:
    """The connection limit to use: `requested`, which must leave FD_RESERVE descriptors free, or by
    default DEFAULT_MAX_CONNECTIONS lowered to what the open-file limit allows."""
    room = open_files - FD_RESERVE
    if requested is None:
        if room < 1:
            raise ValueError(f"the open-file limit ({open_files}) is too low to serve: raise it (ulimit -n)")
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if requested > room:
        raise ValueError(f"--max-connections {requested} needs more open files than this process may have "
                         f"({open_files}, of which {FD_RESERVE} are kept for the server): raise ulimit -n or "
                         f"lower --max-connections")
    return requested


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind the server's socket now, so that a taken port or a bad host is one clear error before the
    model loads (OSError, with the address in its message)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def make_server(app: Any, limits: ConnectionLimits, *, log_level: str = "info",
                protocol_base: type | None = None, **uvicorn_options: Any) -> uvicorn.Server:
    """A uvicorn.Server for `app` with the connection guard; run it with `.run(sockets=[sock])`."""
    install_log_rate_limit()
    protocol = guarded_protocol(limits, protocol_base)
    config = uvicorn.Config(app, http=protocol, log_level=log_level, access_log=False,
                            timeout_keep_alive=limits.keep_alive_timeout,
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            timeout_graceful_shutdown=10, **uvicorn_options)
    server = uvicorn.Server(config)
    server.guard_counters = protocol.counters  # type: ignore[attr-defined]
    return server
