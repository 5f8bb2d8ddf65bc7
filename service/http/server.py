"""The HTTP server: uvicorn on the app's event loop, as a start/stop component.

It runs on the same loop as the gRPC server and the batcher (one process, one core), binds
its own socket (so port 0 works and the real port is known before the first request), and
leaves signals to the app that owns it: uvicorn's own handlers would swallow the SIGTERM
that should drain the whole server.

``EdgeProtocol`` is uvicorn's h11 protocol with the limits uvicorn lacks or answers in plain
text (``service.edge.EdgeLimits``): a deadline for the request head (uvicorn has none, so a
connection that sends nothing, or a byte a minute, is held forever), a connection cap whose
refusal is the API's JSON 503 (``edge.EdgeGuard`` answers it), and JSON for the errors
the server answers itself (a malformed request, a head over ``--http-max-header-bytes``).
uvicorn's per-request warnings (one per malformed request) are rate-limited while the
server runs (``service.lograte.FloodFilter`` on the ``uvicorn.error`` logger).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.edge import EdgeLimits
from service.http.edge import OVER_CAPACITY, error_response
from service.lograte import FloodFilter

log = logging.getLogger(__name__)
uvicorn_log = logging.getLogger("uvicorn.error")  # where uvicorn's protocols log
_CUT_FLUSH_S = 1.0  # after the grace period: time for cut calls to send their 503


class EdgeProtocol(H11Protocol):
    limits = EdgeLimits()  # a subclass per server sets its own (``HttpServer``)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self.app_state = {**self.app_state, OVER_CAPACITY: True}  # this connection's calls get 503
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self._await_head()  # part of a request head has come: the rest is due by the deadline
            return
        self._cancel_head_deadline()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
            # answered, and the body nobody reads is still coming (e.g. a GET with a body): a
            # slow sender would hold the connection past every deadline, so it is let go
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self._answer_and_close(408, f"no complete request head within {self.limits.header_timeout_s:g} s")

    def send_400_response(self, msg: str) -> None:
        buffered = len(self.conn.trailing_data[0])
        if buffered > self.limits.max_header_bytes:
            self._answer_and_close(431, f"the request head (request line and headers) is over this server's "
                                        f"limit of {self.limits.max_header_bytes} bytes")
        else:
            self._answer_and_close(400, "malformed HTTP/1.1 request")

    def _answer_and_close(self, status: int, message: str) -> None:
        """A JSON error written straight to the socket: no request cycle to answer through."""
        if self.transport.is_closing():
            return
        response = error_response(status, message)
        head = [f"HTTP/1.1 {status} {h11_reason(status)}".encode(), b"connection: close",
                *(k + b": " + v for k, v in response.raw_headers)]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + bytes(response.body))
        self.transport.close()


def h11_reason(status: int) -> str:
    return {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(status, "Error")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the owning app handles signals and calls stop()


class HttpServer:
    def __init__(self, app: ASGIApp, *, host: str, port: int, grace_s: float = 10.0,
                 limits: EdgeLimits | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self.limits = limits or EdgeLimits()
        self.log_flood = FloodFilter()  # on uvicorn's logger from start to stop
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
        protocol = type("EdgeProtocol", (EdgeProtocol,), {"limits": self.limits})
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", http=protocol,
                                timeout_graceful_shutdown=max(1, round(self.grace_s)),
                                timeout_keep_alive=self.limits.idle_timeout_s,  # type: ignore[arg-type]
                                h11_max_incomplete_event_size=self.limits.max_header_bytes)
        self._server = _Server(config)
        uvicorn_log.addFilter(self.log_flood)
        self._task = asyncio.get_running_loop().create_task(self._server.serve([sock]), name="http")
        while not self._server.started:  # uvicorn offers no startup event; this runs once
            if self._task.done():
                uvicorn_log.removeFilter(self.log_flood)
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
        # calls cut at the end of the grace period answer 503 (edge.EdgeGuard) as they unwind
        tasks = self._server.server_state.tasks
        deadline = asyncio.get_running_loop().time() + _CUT_FLUSH_S
        while tasks and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        uvicorn_log.removeFilter(self.log_flood)
        self.log_flood.flush(uvicorn_log)
        self._server = self._task = None
