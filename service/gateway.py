"""The HTTP/JSON gateway: the billed rerank API as a thin shim over ``RerankCore``.

A route parses JSON into the models of ``service.gateway_schema``, builds a ``RerankCall``,
awaits the same ``RerankCore`` the gRPC servicer uses (auth, limits, idempotent replay, rate
limits, scoring, billing: all there, once) and writes JSON back. What is HTTP's own lives
here and nowhere else:

* the edge's checks come first (``EdgeGuard``): the key is checked before the body is read,
  the body is read whole within its limits (at most ``Limits.max_request_bytes``: larger is
  413) and must be UTF-8; ``Observe`` counts every call under a bounded label;
* the key comes from ``Authorization: Bearer`` (``service.edge.bearer_token``, gRPC's rule
  too), the idempotency key from ``Idempotency-Key``;
* ``ServiceError`` becomes its ``Code.http_status`` with ``{"detail": ...}``, plus
  ``WWW-Authenticate`` on 401 and ``Retry-After`` (whole seconds) where a retry can succeed;
* whatever a client sends ends as a 4xx with a ``detail`` string that is always encodable
  (no echo of lone surrogates or megabytes of input): the 500 handler is for bugs only.

Invalid UTF-8 fails JSON decoding (400); a byte-order mark or NUL bytes (UTF-16/32, which
Python's decoder would guess) are refused before it. Lone surrogates (``"\\ud800"``) decode to Python
strings that pydantic accepts and the core refuses (400), so they are checked in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import Authenticator, RerankCore
from service.edge import BodyBudget, CheckedOnce, EdgeLimits, bearer_token
from service.errors import Code, ServiceError
from service.gateway_compat import AnyRerankRequest, AnyRerankResponse, RerankBody
from service.gateway_schema import (
    ErrorBody,
    IsoDate,
    ModelCard,
    ModelLimits,
    ModelList,
    RerankRequest,
    RerankResponse,
    Status,
    UsageDay,
    UsageResponse,
    UsageTotal,
    document_limits,
)
from service.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger(__name__)
access_log = logging.getLogger("rerank.access")

_MAX_DETAIL_CHARS = 1000
_DRAIN_CAP_BYTES = 64 * 2**20  # read and drop at most this much of an oversized body, then close
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in [
        (400, "Invalid input: the detail says what to change."),
        (401, "Missing or unknown API key."),
        (403, "Revoked API key, or one scoped to other models."),
        (404, "Unknown model."),
        (413, "Body larger than the server's limit."),
        (422, "Body of the wrong shape or types, or an idempotency key reused for another body."),
        (429, "Rate limited, over quota, or overloaded; see Retry-After."),
        (503, "Not ready, draining, or the usage ledger is down; nothing was billed."),
    ]}


# Module level: FastAPI resolves these (string) annotations in the module's namespace.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer rk_live_...`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="Makes a retry return the first result, billed once. "
    "Same key with a different body: 422.")]


def create_app(core: RerankCore, *, metrics: Metrics | None = None,
               ready: Callable[[], bool] = lambda: True, accepting: Callable[[], bool] | None = None,
               edge: EdgeLimits | None = None) -> FastAPI:
    """The gateway as an ASGI app. ``ready`` answers /ready; while ``accepting`` (default:
    ``ready``) is false rerank calls get 503. They differ while draining: NOT ready, still
    accepting (docs/OPERATIONS.md)."""
    metrics = metrics or Metrics()
    # /docs and /redoc from the installed package's own assets, not a CDN: they work offline
    app = FastAPIOffline(title="Qwen3-Reranker API", version="1",
                         description="Billed rerank API; see docs/HTTP_API.md.")
    # the guard checks the key before the body; the core's check of the same request then
    # reuses that answer instead of asking the key table again. The HTTP front's own
    # authenticator: the core (shared with gRPC, whose calls use its auth) is not changed.
    auth = CheckedOnce(core.auth)
    _add_rerank_routes(app, core, auth, accepting or ready)
    _add_info_routes(app, core, auth)
    _add_ops_routes(app, metrics, ready)
    _install_error_handlers(app)
    openapi = app.openapi  # FastAPI caches what it returns; document_limits edits it once, in place
    app.openapi = lambda: app.openapi_schema or document_limits(  # type: ignore[method-assign]
        openapi(), core.limits, sorted(core.accepted_models))
    app.add_middleware(JsonByDefault)
    app.add_middleware(EdgeGuard, max_bytes=core.limits.max_request_bytes, limits=edge or EdgeLimits(),
                       auth=auth)
    app.add_middleware(Observe, metrics=metrics, routes=lambda: app.router.routes)
    return app


def _add_rerank_routes(app: FastAPI, core: RerankCore, auth: Authenticator, accepting: Callable[[], bool]) -> None:
    async def rerank(body: RerankBody, response: Response, request: Request,
                     credentials: Credentials, idempotency_key: IdempotencyKey, api_version: str) -> Any:
        if not accepting():
            raise ServiceError(Code.UNAVAILABLE, "the server is not ready or is draining; retry",
                               retry_after_s=1.0)
        call = body.to_call(_token(request), idempotency_key)
        reply = await _unless_disconnected(request, core.rerank(call, auth=auth))
        request.state.access = (f"request_id={reply.request_id} documents={reply.billed_documents} "
                                f"prompt_tokens={reply.prompt_tokens} replayed={reply.replayed}")
        response.headers["X-Request-Id"] = reply.request_id
        if reply.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return body.response(reply, api_version)

    @app.post("/v1/rerank", response_model_exclude_none=True, responses=_ERRORS, tags=["rerank"])
    async def rerank_v1(body: AnyRerankRequest, response: Response, request: Request, credentials: Credentials,
                        idempotency_key: IdempotencyKey = None) -> AnyRerankResponse:
        """Rerank documents for a query: Cohere v1, Jina, vLLM, TEI or Voyage, by the body's fields."""
        return await rerank(body, response, request, credentials, idempotency_key, "1")  # type: ignore[no-any-return]

    @app.post("/rerank", response_model_exclude_none=True, responses=_ERRORS, tags=["rerank"])
    async def rerank_bare(body: AnyRerankRequest, response: Response, request: Request, credentials: Credentials,
                          idempotency_key: IdempotencyKey = None) -> AnyRerankResponse:
        """The same call on the path Jina/vLLM and TEI clients use (service/gateway_compat.py)."""
        return await rerank(body, response, request, credentials, idempotency_key, "1")  # type: ignore[no-any-return]

    @app.post("/v2/rerank", response_model_exclude_none=True, responses=_ERRORS, tags=["rerank"])
    async def rerank_v2(body: RerankRequest, response: Response, request: Request, credentials: Credentials,
                        idempotency_key: IdempotencyKey = None) -> RerankResponse:
        """The same call on Cohere's v2 route (ClientV2 compatible)."""
        return await rerank(body, response, request, credentials, idempotency_key, "2")  # type: ignore[no-any-return]


def _add_info_routes(app: FastAPI, core: RerankCore, auth: Authenticator) -> None:
    @app.get("/v1/models", tags=["info"])
    async def models() -> ModelList:
        """The served model, its aliases, and the limits a call must respect."""
        info, lim = core.model_info(), core.limits
        card = ModelCard(id=info.model, aliases=sorted(core.accepted_models - {info.model}),
                         max_length=info.max_length, dtype=info.dtype, device=info.device,
                         limits=ModelLimits(**{f: getattr(lim, f) for f in ModelLimits.model_fields}))
        return ModelList(data=[card])

    @app.get("/v1/usage", responses={k: _ERRORS[k] for k in (401, 403, 404, 422, 503)}, tags=["billing"])
    async def usage_report(request: Request, credentials: Credentials,
                           since: Annotated[IsoDate | None, Query(description="First UTC day, YYYY-MM-DD.")] = None,
                           until: Annotated[IsoDate | None, Query(description="Last UTC day, inclusive.")] = None,
                           ) -> UsageResponse:
        """The caller's own billed usage, by UTC day and in total."""
        principal, report = await core.usage(_token(request), since, until, auth=auth)
        days = [UsageDay(date=day, **asdict(totals)) for day, totals in report.days]
        return UsageResponse(key_id=principal.key_id, name=principal.name, days=days,
                             total=UsageTotal(**asdict(report.total)))


def _add_ops_routes(app: FastAPI, metrics: Metrics, ready: Callable[[], bool]) -> None:
    @app.get("/health", tags=["ops"])
    async def health() -> Status:
        """Liveness: the process answers."""
        return Status(status="ok")

    @app.get("/ready", responses={503: _ERRORS[503]}, tags=["ops"])
    async def readiness() -> Status:
        """Readiness: 200 when calls are taken, 503 while loading or draining."""
        if not ready():
            raise ServiceError(Code.UNAVAILABLE, "not ready: loading or draining", retry_after_s=1.0)
        return Status(status="ready")

    @app.get("/metrics", response_class=Response, tags=["ops"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        """Prometheus metrics of this server."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


class ClientGone(Exception):
    """The client closed the connection before its reply was ready."""


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelling it if the client goes away first: as on gRPC, a call its
    caller abandoned is dropped from the queue and not billed. (Once scoring has finished, the
    ledger write is shielded and completes: see docs/HTTP_API.md, "the crash window".)"""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # the body was read before this route ran: only the disconnect is left to come


def _token(request: Request) -> str | None:
    """The key, by the rule gRPC applies too (``Credentials`` documents it in OpenAPI)."""
    return bearer_token(request.headers.get("authorization"))


# -- errors ---------------------------------------------------------------------------------
def error_response(status: int, message: str, *, retry_after_s: float | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rerank"'
    if retry_after_s is not None or status == 503:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s or 1)))
    return JSONResponse({"detail": _printable(message, _MAX_DETAIL_CHARS)}, status, headers=headers)


def _printable(text: str, limit: int) -> str:
    """Encodable as UTF-8 whatever the client sent (lone surrogates escaped), and bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.code.http_status, exc.message, retry_after_s=exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*_validation_detail(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            detail = f"the body is not valid UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start})"
        elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            detail = "the body is not valid JSON for this API: nested too deeply"
        return error_response(exc.status_code, detail, headers=dict(exc.headers or {}))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request", for the log; nobody reads it

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error; see the server log")


def _validation_detail(errors: list[dict[str, Any]]) -> tuple[int, str]:
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, f"the body is not valid JSON: {e.get('ctx', {}).get('error', 'decode error')} " \
                        f"at position {e['loc'][-1]}"
    parts = [f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def _where(loc: Any) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _printable(str(part), 64)
    return out or "body"


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


OVER_CAPACITY = "rerank.over_capacity"  # scope state set by http_server.EdgeProtocol past --http-max-connections
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
                f"Content-Encoding {_printable(encoding, 40)!r} is not supported: send the body uncompressed"))
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
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            label = self.label(scope)
            seconds = time.perf_counter() - started
            self.metrics.observe_request(label, str(status), seconds)
            if label.split(" ")[-1].startswith(("/v1/", "/v2/")):
                client = scope.get("client") or ("-", 0)
                extra = scope.get("state", {}).get("access", "")
                access_log.info("http=%s status=%d ms=%.1f peer=%s:%s %s", label, status,
                                1000 * seconds, client[0], client[1], extra)
