"""The HTTP app: the billed rerank API as a thin shim over ``RerankCore``.

A route parses JSON into the models of ``service.http.schema`` (other vendors' shapes:
``service.http.compat``), builds a ``RerankCall``, awaits the same ``RerankCore`` the gRPC
servicer uses (auth, limits, idempotent replay, rate limits, scoring, billing: all there,
once) and writes JSON back. Every rerank path is one handler; the paths differ only in the
body they parse and the ``Version`` they answer with. What the edge checks before a route
runs (key before body, body limits, UTF-8) is ``service.http.edge``; here:

* the key comes from ``Authorization: Bearer`` (``service.edge.bearer_token``, gRPC's rule
  too), the idempotency key from ``Idempotency-Key``;
* ``ServiceError`` becomes its ``Code.http_status`` with ``{"detail": ...}``, plus
  ``WWW-Authenticate`` on 401 and ``Retry-After`` (whole seconds) where a retry can succeed;
* whatever a client sends ends as a 4xx with a ``detail`` string that is always encodable
  (no echo of lone surrogates or megabytes of input): the 500 handler is for bugs only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core import RerankCore
from service.edge import CheckedOnce, EdgeLimits, bearer_token
from service.errors import Code, ServiceError
from service.http.compat import AnyRerankRequest, AnyRerankResponse, RerankBody
from service.http.edge import EdgeGuard, JsonByDefault, Observe, error_response, printable
from service.http.schema import (
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
    Version,
    document_limits,
)
from service.metrics import Metrics
from service.seams import Authenticator

T = TypeVar("T")
log = logging.getLogger(__name__)

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
# every rerank path: (path, route name, body, reply, API version, description); one handler serves them all
_RERANK_PATHS: list[tuple[str, str, Any, Any, Version, str]] = [
    ("/v1/rerank", "rerank_v1", AnyRerankRequest, AnyRerankResponse, Version.V1,
     "Rerank documents for a query: Cohere v1, Jina, vLLM, TEI or Voyage, by the body's fields."),
    ("/rerank", "rerank_bare", AnyRerankRequest, AnyRerankResponse, Version.V1,
     "The same call on the path Jina/vLLM and TEI clients use (service/http/compat.py)."),
    ("/v2/rerank", "rerank_v2", RerankRequest, RerankResponse, Version.V2,
     "The same call on Cohere's v2 route (ClientV2 compatible)."),
]


# Module level: FastAPI resolves these (string) annotations in the module's namespace.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer rk_live_...`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="Makes a retry return the first result, billed once. "
    "Same key with a different body: 422.")]


def create_app(core: RerankCore, *, metrics: Metrics | None = None,
               ready: Callable[[], bool] = lambda: True, accepting: Callable[[], bool] | None = None,
               edge: EdgeLimits | None = None) -> FastAPI:
    """The HTTP API as an ASGI app. ``ready`` answers /ready; while ``accepting`` (default:
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
    for path, name, body_type, reply_type, version, description in _RERANK_PATHS:
        app.post(path, name=name, description=description, response_model=reply_type, response_model_exclude_none=True,
                 responses=_ERRORS, tags=["rerank"])(_rerank_handler(core, auth, accepting, version, body_type))


def _rerank_handler(core: RerankCore, auth: Authenticator, accepting: Callable[[], bool], version: Version,
                    body_type: Any) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The one handler of every rerank path, for the path's body type and API version."""
    async def rerank(body: RerankBody, response: Response, request: Request, credentials: Credentials,
                     idempotency_key: IdempotencyKey = None) -> Any:
        if not accepting():
            raise ServiceError(Code.UNAVAILABLE, "the server is not ready or is draining; retry",
                               retry_after_s=1.0)
        call = body.to_call(_token(request), idempotency_key)
        reply = await _unless_disconnected(request, core.rerank(call, auth=auth))
        request.state.access = {"request_id": reply.request_id, "documents": reply.billed_documents,
                                "prompt_tokens": reply.prompt_tokens, "replayed": reply.replayed}
        response.headers["X-Request-Id"] = reply.request_id
        if reply.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return body.response(reply, version)
    rerank.__annotations__ = {**rerank.__annotations__, "body": body_type}  # what FastAPI parses the body as
    return rerank


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
            out += ("." if out else "") + printable(str(part), 64)
    return out or "body"

