"""A real uvicorn server in a background thread, for the HTTP tests: the same hardened server as
`qsparse serve` (serving/server.py: connection limit, header timeout, rate-limited logs)."""
from __future__ import annotations

import socket
import threading
import time

from qsparse_infer.serving.api import RequestLog
from qsparse_infer.serving.server import ConnectionLimits, make_server


class ServerThread:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app, limits: ConnectionLimits | None = None, protocol_base: type | None = None) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(RequestLog(app), limits or ConnectionLimits(), log_level="warning",
                                  protocol_base=protocol_base, lifespan="on")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
