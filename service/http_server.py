"""The gateway's HTTP server: uvicorn on the app's event loop, as a start/stop component.

It runs on the same loop as the gRPC server and the batcher (one process, one core), binds
its own socket (so port 0 works and the real port is known before the first request), and
leaves signals to the app that owns it: uvicorn's own handlers would swallow the SIGTERM
that should drain the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the owning app handles signals and calls stop()


class HttpServer:
    def __init__(self, app: ASGIApp, *, host: str, port: int, grace_s: float = 10.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host = self.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, self.port), family=family, reuse_port=False)
        # asyncio turns Nagle off only on sockets made with proto=IPPROTO_TCP, which these are
        # not; accepted sockets inherit it from the listener. Left on, each response's body
        # waits behind its headers for the client's delayed ACK: ~40 ms on every call.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, round(self.grace_s)))
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve([sock]), name="http")
        while not self._server.started:  # uvicorn offers no startup event; this runs once
            if self._task.done():
                await self._task  # raise what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP gateway listening on http://%s:%d", self.host, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let open requests finish (uvicorn's graceful timeout), then return."""
        if self._server is None or self._task is None:
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = max(1, round(grace_s))
        self._server.should_exit = True
        await self._task
        self._server = self._task = None
