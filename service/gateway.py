"""The HTTP/JSON gateway: the billed rerank API as a thin shim over ``RerankCore``.

A route parses JSON into the models of ``service.gateway_schema``, builds a ``RerankCall``,
awaits the same ``RerankCore`` the gRPC servicer uses (auth, limits, idempotent replay, rate
limits, scoring, billing: all there, once) and writes JSON back. What is HTTP's own lives
here and nowhere else:

* the body is read whole, at most ``Limits.max_request_bytes`` of it, before anything parses
  it: larger is 413 (``BodyLimit``);
* the key comes from ``Authorization: Bearer``, the idempotency key from ``Idempotency-Key``;
* ``ServiceError`` becomes its ``Code.http_status`` with ``{"detail": ...}``, plus
  ``WWW-Authenticate`` on 401 and ``Retry-After`` (whole seconds) where a retry can succeed;
* whatever a client sends ends as a 4xx with a ``detail`` string that is always encodable
  (no echo of lone surrogates or megabytes of input): the 500 handler is for bugs only.

Invalid UTF-8 fails JSON decoding (400). Lone surrogates (``"\\ud800"``) decode to Python
strings that pydantic accepts and the core refuses (400), so they are checked in one place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import RerankCore
from service.errors import Code, ServiceError
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
               ready: Callable[[], bool] = lambda: True) -> FastAPI:
    """The gateway as an ASGI app. ``ready`` answers /ready, and while it is false rerank
    calls get 503."""
    metrics = metrics or Metrics()
    app = FastAPI(title="Qwen3-Reranker API", version="1",
                  description="Billed rerank API; see docs/HTTP_API.md.")
    _add_rerank_routes(app, core, ready)
    _add_info_routes(app, core)
    _add_ops_routes(app, metrics, ready)
    _install_error_handlers(app)
    openapi = app.openapi  # FastAPI caches what it returns; document_limits edits it once, in place
    app.openapi = lambda: app.openapi_schema or document_limits(  # type: ignore[method-assign]
        openapi(), core.limits, sorted(core.accepted_models))
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit, max_bytes=core.limits.max_request_bytes)
    app.add_middleware(Observe, metrics=metrics, routes={r.path for r in app.routes if hasattr(r, "path")})
    return app


def _add_rerank_routes(app: FastAPI, core: RerankCore, ready: Callable[[], bool]) -> None:
    async def rerank(body: RerankRequest, response: Response, request: Request,
                     credentials: Credentials, idempotency_key: IdempotencyKey, api_version: str) -> RerankResponse:
        if not ready():
            raise ServiceError(Code.UNAVAILABLE, "the server is not ready or is draining; retry",
                               retry_after_s=1.0)
        reply = await _unless_disconnected(request, core.rerank(body.to_call(_token(credentials), idempotency_key)))
        request.state.access = (f"request_id={reply.request_id} documents={reply.billed_documents} "
                                f"prompt_tokens={reply.prompt_tokens} replayed={reply.replayed}")
        response.headers["X-Request-Id"] = reply.request_id
        if reply.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return RerankResponse.from_reply(reply, api_version)

    @app.post("/v1/rerank", response_model_exclude_none=True, responses=_ERRORS, tags=["rerank"])
    async def rerank_v1(body: RerankRequest, response: Response, request: Request, credentials: Credentials,
                        idempotency_key: IdempotencyKey = None) -> RerankResponse:
        """Rerank documents for a query (Cohere v1 client compatible)."""
        return await rerank(body, response, request, credentials, idempotency_key, "1")

    @app.post("/v2/rerank", response_model_exclude_none=True, responses=_ERRORS, tags=["rerank"])
    async def rerank_v2(body: RerankRequest, response: Response, request: Request, credentials: Credentials,
                        idempotency_key: IdempotencyKey = None) -> RerankResponse:
        """The same call on Cohere's v2 route (ClientV2 compatible)."""
        return await rerank(body, response, request, credentials, idempotency_key, "2")


def _add_info_routes(app: FastAPI, core: RerankCore) -> None:
    @app.get("/v1/models", tags=["info"])
    async def models() -> ModelList:
        """The served model, its aliases, and the limits a call must respect."""
        info, lim = core.model_info(), core.limits
        card = ModelCard(id=info.model, aliases=sorted(core.accepted_models - {info.model}),
                         max_length=info.max_length, dtype=info.dtype, device=info.device,
                         limits=ModelLimits(**{f: getattr(lim, f) for f in ModelLimits.model_fields}))
        return ModelList(data=[card])

    @app.get("/v1/usage", responses={k: _ERRORS[k] for k in (401, 403, 404, 422, 503)}, tags=["billing"])
    async def usage_report(credentials: Credentials,
                           since: Annotated[IsoDate | None, Query(description="First UTC day, YYYY-MM-DD.")] = None,
                           until: Annotated[IsoDate | None, Query(description="Last UTC day, inclusive.")] = None,
                           ) -> UsageResponse:
        """The caller's own billed usage, by UTC day and in total."""
        principal, report = await core.usage(_token(credentials), since, until)
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


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


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


class BodyLimit:
    """Reads the whole body, at most ``max_bytes``, before the app sees it: larger is 413.

    An oversized body is read and dropped up to a cap before answering, so a client that is
    still sending gets the 413 instead of a reset connection."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before sending its body: nothing to answer
            size += len(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size, more)
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects, as the server reports them

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int, more: bool) -> None:
        while more and size <= _DRAIN_CAP_BYTES:
            message = await receive()
            size += len(message.get("body", b""))
            more = message["type"] == "http.request" and bool(message.get("more_body", False))
        response = error_response(413, f"the body is larger than this server's limit of {self.max_bytes} "
                                       "bytes: send fewer or shorter documents per call")
        await response(scope, receive, send)


class Observe:
    """Counts and logs every HTTP call once: metrics by route and status, one access line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

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
            known = scope["path"] in self.routes
            path = scope["path"] if known else "other"
            seconds = time.perf_counter() - started
            # label values stay bounded: known routes by method, everything else as one
            self.metrics.observe_request(f"{scope['method']} {path}" if known else "other", str(status), seconds)
            if path.startswith(("/v1/", "/v2/")):
                client = scope.get("client") or ("-", 0)
                extra = scope.get("state", {}).get("access", "")
                access_log.info("http=%s %s status=%d ms=%.1f peer=%s:%s %s", scope["method"], path, status,
                                1000 * seconds, client[0], client[1], extra)
