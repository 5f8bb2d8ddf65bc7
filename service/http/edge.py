"""The HTTP edge: the ASGI middleware every call passes before (and after) the app's routes.

* ``EdgeGuard`` checks, in order, before the app reads a body or sees a call: the connection
  cap, the head's size, the key (before the body is read), the body's encoding, size and
  time (at most ``Limits.max_request_bytes``: larger is 413) and that it is UTF-8;
* ``JsonByDefault`` reads every POST body as JSON, whatever its Content-Type says;
* ``Observe`` counts every call under a bounded label and writes one access line per API call.

Invalid UTF-8 fails JSON decoding (400); a byte-order mark or NUL bytes (UTF-16/32, which
Python's decoder would guess) are refused before it. Lone surrogates (``"\\ud800"``) decode to Python
strings that pydantic accepts and the core refuses (400), so they are checked in one place.
A new HTTP limit goes here (its knob in ``service.edge.EdgeLimits``); the limits the server's
protocol applies before ASGI are ``service.http.server``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.edge import BodyBudget, CheckedOnce, EdgeLimits, bearer_token
from service.errors import Code, ServiceError
from service.logs import write_access
from service.metrics import Metrics

_MAX_DETAIL_CHARS = 1000
_API_PATHS = ("/v1/", "/v2/", "/rerank")  # calls of the API: each writes an access line
_DRAIN_CAP_BYTES = 64 * 2**20  # read and drop at most this much of an oversized body, then close


# -- errors ---------------------------------------------------------------------------------
def error_response(status: int, message: str, *, retry_after_s: float | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rerank"'
    if retry_after_s is not None or status == 503:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s or 1)))
    return JSONResponse({"detail": printable(message, _MAX_DETAIL_CHARS)}, status, headers=headers)


def printable(text: str, limit: int) -> str:
    """Encodable as UTF-8 whatever the client sent (lone surrogates escaped), and bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- ASGI middleware --------------------------------------------------------------------------
class JsonByDefault:
    """Every POST body of this API is JSON, whatever its Content-Type says.

    The documented call is ``curl URL -H "Authorization: Bearer $KEY" -d '{...}'``, and
    ``curl -d`` labels its body ``application/x-www-form-urlencoded``; callers also omit the
    header. Reading such bodies as JSON makes that call work as written; a body that is not
    JSON still gets a clear 400."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            declared = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), b"")
            if b"json" not in declared.lower():
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


OVER_CAPACITY = "rerank.over_capacity"  # scope state set by server.EdgeProtocol past --http-max-connections
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # their bodies, if any, are never read
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")  # UTF-8, and UTF-16 (UTF-32's start the same)


class EdgeGuard:
    """Everything the edge checks, in order, before the app reads a body or sees a call:

    1. a connection past ``--http-max-connections`` is answered 503 and closed; a request head
       over ``--http-max-header-bytes`` is 431;
    2. methods that carry a body: an ``Authorization`` header that is not ``Bearer <key>``
       is 401 saying why (``service.edge.bearer_token``), and the key is checked before one
       byte of the body is read, so an unauthenticated caller can make the server buffer
       nothing; a ``Content-Encoding`` other than identity is 415;
    3. the body is read whole, at most ``max_bytes`` (larger is 413, also when only declared),
       within ``--http-body-timeout-s`` (408), and counted against the shared
       ``--http-max-body-bytes-in-flight`` (over it: 429, retry);
    4. the body must be UTF-8: a byte-order mark or a NUL byte (UTF-16, UTF-32) is 400, before
       the JSON decoder could guess another encoding;
    5. a call still running when the server's grace period ends at shutdown is cut with a
       JSON 503 and ``Retry-After`` (an ``Idempotency-Key`` retry is billed at most once),
       not left to the server's plain-text 500.

    Errors are the API's JSON errors (``error_response``)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, limits: EdgeLimits, auth: CheckedOnce) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = limits
        self.auth = auth
        self.budget = BodyBudget(limits.max_body_bytes_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, watched)
        except asyncio.CancelledError:
            # uvicorn cancels the calls still running when its graceful shutdown times out
            if started:
                raise
            cut = ServiceError(Code.UNAVAILABLE, "the server is shutting down and cut this call before it "
                               "finished; retry (with the same Idempotency-Key it is billed at most once)",
                               retry_after_s=1.0)
            await _send_error(scope, receive, send, cut, close=True)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # answered: the cancellation has done its work

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("state", {}).get(OVER_CAPACITY):
            busy = ServiceError(Code.UNAVAILABLE, f"this server holds its limit of {self.limits.max_connections} "
                                "connections; retry", retry_after_s=1.0)
            await _send_error(scope, receive, send, busy, close=True)
            return
        head = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4
                                                                          for k, v in scope["headers"])
        if head > self.limits.max_header_bytes:  # the server checks only heads that arrive in pieces
            await _send_error(scope, receive, send, close=True, status=431, message=(
                f"the request head (request line and headers) is over this server's limit of "
                f"{self.limits.max_header_bytes} bytes"))
            return
        if scope["method"] in _NO_BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            await self.auth.check_request(bearer_token(headers.get("authorization")))
        except ServiceError as exc:
            await _send_error(scope, receive, send, exc, close=True)
            return
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await _send_error(scope, receive, send, close=True, status=415, message=(
                f"Content-Encoding {printable(encoding, 40)!r} is not supported: send the body uncompressed"))
            return
        declared = _content_length(headers)
        if declared is not None and declared > self.max_bytes:
            await self._refuse_large(scope, receive, send, 0, True)
            return
        reserved = declared or 0
        if not self.budget.take(reserved):
            await _send_error(scope, receive, send, _BUSY_RECEIVING, close=True)
            return
        try:
            body, reserved = await self._read(scope, receive, send, reserved)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
        finally:
            self.budget.give_back(reserved)

    async def _read(self, scope: Scope, receive: Receive, send: Send, reserved: int) -> tuple[bytes | None, int]:
        """The whole body (None once an error is answered) and the bytes now reserved for it."""
        chunks: list[bytes] = []
        size, more = 0, True
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, reserved  # the client went away before sending its body
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = bool(message.get("more_body", False))
                    if size > self.max_bytes:
                        await self._refuse_large(scope, receive, send, size, more)
                        return None, reserved
                    if size > reserved:
                        if not self.budget.take(size - reserved):
                            await _send_error(scope, receive, send, _BUSY_RECEIVING, close=True)
                            return None, reserved
                        reserved = size
                    chunks.append(chunk)
        except TimeoutError:
            await _send_error(scope, receive, send, close=True, status=408, message=(
                f"the body did not arrive within {self.limits.body_timeout_s:g} s; send it at once"))
            return None, reserved
        body = b"".join(chunks)
        problem = _not_utf8(body)
        if problem:
            await _send_error(scope, receive, send, status=400, message=problem)
            return None, reserved
        return body, reserved

    async def _refuse_large(self, scope: Scope, receive: Receive, send: Send, size: int, more: bool) -> None:
        """413; what is still coming is read and dropped up to a cap (and within the body
        timeout), so a client that is still sending gets the answer, not a reset connection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.body_timeout_s):
                while more and size <= _DRAIN_CAP_BYTES:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message["type"] == "http.request" and bool(message.get("more_body", False))
        await _send_error(scope, receive, send, close=True, status=413, message=(
            f"the body is larger than this server's limit of {self.max_bytes} bytes: send fewer or "
            "shorter documents per call"))


_BUSY_RECEIVING = ServiceError(Code.OVERLOADED, "the server is receiving too many request bodies at once; retry",
                               retry_after_s=1.0)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnects, as the server reports them
    return replay


def _content_length(headers: Headers) -> int | None:
    raw = headers.get("content-length")
    return int(raw) if raw is not None and raw.isdigit() else None  # the server refuses other values


def _not_utf8(body: bytes) -> str | None:
    """Why ``body`` is not UTF-8 JSON text that Python's decoder would also read as UTF-8."""
    if body.startswith(_BOMS):
        return "the body starts with a byte-order mark: send UTF-8 JSON without one"
    nul = body.find(b"\x00")
    if nul >= 0:
        return f"the body has a NUL byte at byte {nul} (UTF-16 or UTF-32?): send UTF-8 JSON"
    return None


async def _send_error(scope: Scope, receive: Receive, send: Send, error: ServiceError | None = None, *,
                      status: int = 0, message: str = "", close: bool = False) -> None:
    """The JSON error for ``error`` (or ``status`` and ``message``); ``close`` ends the
    connection after it, for a body left unread or a caller to be let go of."""
    if error is not None:
        status, message = error.code.http_status, error.message
    headers = {"Connection": "close"} if close else None
    response = error_response(status, message, retry_after_s=error.retry_after_s if error else None,
                              headers=headers)
    await response(scope, receive, send)


class Observe:
    """Counts and logs every HTTP call once: metrics by route template and status, one access line.

    Labels are bounded whatever a client sends: a call that matches a route (method and
    path) is labelled by the route's template (``POST /v1/rerank``); any other method or
    path is ``other``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def label(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return f"{scope['method']} {getattr(route, 'path', '')}"
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, label = time.perf_counter(), self.label(scope)
        api = label.split(" ")[-1].startswith(_API_PATHS)
        # an API call's span is current until its access line is written (a log formatter finds it)
        with _front_span(scope, label) if api else _NO_SPAN:
            await self._observed(scope, receive, send, started, label, api)

    async def _observed(self, scope: Scope, receive: Receive, send: Send, started: float, label: str,
                        api: bool) -> None:
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe_request(label, str(status), seconds)
            if api:
                tracing.outcome("http.response.status_code", status, status >= 500)
                client = scope.get("client") or ("-", 0)
                write_access({"http": label, "status": status, "ms": round(1000 * seconds, 1),
                              "peer": f"{client[0]}:{client[1]}", **scope.get("state", {}).get("access", {})})


_NO_SPAN = contextlib.nullcontext(None)


def _front_span(scope: Scope, label: str) -> contextlib.AbstractContextManager[object]:
    """The call's server span, named by its route (``POST /v1/rerank``)."""
    if not tracing.enabled():
        return _NO_SPAN
    method, _, route = label.partition(" ")
    return tracing.front_span(label, scope["headers"], "SERVER", {
        "http.request.method": method, "http.route": route, "url.path": scope["path"]})

