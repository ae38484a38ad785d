"""The request guard (ASGI middleware, innermost layer before FastAPI): a POST to the JSON API must say
`Content-Type: application/json` (else 415) and its body must fit `max_body_bytes` (else 413).

The limit is enforced while the body is read, never after: a declared Content-Length over the limit is
answered before a byte of the body is read, and a chunked body is counted as it arrives and cut off at the
limit. Until the application asks for the body, the server reads only its flow-control window (uvicorn
pauses the socket at 64 KiB), so an oversized upload costs the server that much memory, not its size. An
early answer carries `Connection: close`, and the server then reads and discards what the client is still
sending for up to LINGER_SECONDS / LINGER_BYTES before it closes (a "lingering close", as nginx does: closing
a socket with unread data resets the connection, and the client may lose the answer it was sent). A client
that waits for `100 Continue` is never invited to send the body. A body that stalls longer than
`body_timeout` seconds between chunks is answered 408.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from .protocol import APIError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 2 ** 20


class RequestGuard:
    def __init__(self, app: Any, *, max_body_bytes: int, body_timeout: float = 30.0,
                 json_paths: tuple[str, ...] = ("/v1/",),
                 on_reject: Callable[[int], None] | None = None) -> None:
        if max_body_bytes < 1 or body_timeout <= 0:
            raise ValueError("max_body_bytes must be >= 1 and body_timeout > 0")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.json_paths = json_paths
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" \
                or not scope.get("path", "").startswith(self.json_paths):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            shown = ctype.decode("latin-1") or "none"
            await self._reject(send, APIError(415, f"Content-Type must be application/json, got {shown}",
                                              code="unsupported_media_type"))
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                n = -1
            if n < 0:
                await self._reject(send, APIError(400, "invalid Content-Length header"))
                return
            if n > self.max_body_bytes:
                expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
                await self._reject(send, self._too_large(f"{n} bytes"), None if expects_continue else receive)
                return
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                await self._reject(send, APIError(408, f"the request body stalled for more than "
                                                       f"{self.body_timeout:g} s", code="request_timeout"))
                return
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                del body[:]
                more = message.get("more_body", False)
                await self._reject(send, self._too_large(f"more than {self.max_body_bytes} bytes"),
                                   receive if more else None)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body ({size}) is larger than this server's limit of "
                             f"{self.max_body_bytes} bytes (qsparse serve --max-request-bytes)",
                        code="request_too_large")

    async def _reject(self, send: Send, err: APIError, linger: Receive | None = None) -> None:
        """Answer `err` and end the connection; with `linger`, drain the unread body before closing."""
        if self.on_reject is not None:
            self.on_reject(err.status)
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload, "more_body": linger is not None})
        if linger is not None:
            await _drain(linger)
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, within LINGER_SECONDS and LINGER_BYTES."""
    loop = asyncio.get_running_loop()
    deadline, left = loop.time() + LINGER_SECONDS, LINGER_BYTES
    while left > 0:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        left -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the application the body already read, then the connection's own messages
    (so that a disconnect is still seen while a response streams)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
