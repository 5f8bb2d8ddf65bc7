"""What the gRPC front checks before a request message is read: the key, then the budget.

grpcio reads a unary call's whole message before its handler runs, so a handler cannot
refuse a keyless caller before the caller has made the server hold up to
``--max-request-bytes``. An interceptor can: it sees the method and metadata first.
``KeyGuard`` gives every method the request-streaming form, whose messages grpcio reads only
when asked, and asks only after

1. the key (``Rerank``, ``RerankBatch``): the bearer rule and the key store's answer, as
   the core would give them; a refused call never asks for its message, and the transport
   holds at most one stream window of it (``service.grpc.servicer.flow_control_options``);
2. the budget: ``--max-request-bytes`` is reserved from ``--grpc-max-message-bytes-in-flight``
   (grpcio will take in a message up to that size once asked), then trimmed to the message's
   real size, and given back when the call ends. A call that finds no room within
   ``BUDGET_WAIT_S`` is RESOURCE_EXHAUSTED with ``retry-after-ms``, whatever its key.

A valid call is looked up once: the interceptor's answer is vouched for
(``service.edge.CheckedOnce``) in the task where the core checks it again. The servicer's
methods, and the wire format, are unchanged: the request-streaming form is the server's
own way of reading the same unary HTTP/2 stream.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc

from service import tracing
from service.edge import BodyBudget, CheckedOnce
from service.errors import Code, ServiceError
from service.grpc import wire
from service.logs import write_access
from service.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata: milliseconds to wait before retrying
SERVICE_NAME = "rerank.v1.RerankService"
KEYED_METHODS = frozenset({f"/{SERVICE_NAME}/Rerank", f"/{SERVICE_NAME}/RerankBatch"})
# A reservation is made before the message's size is known (the full --max-request-bytes),
# so calls arriving together briefly hold more than they will: a call waits this long for
# others to trim theirs before it is refused. It holds no message bytes while it waits.
BUDGET_WAIT_S = 1.0
_BUSY = ServiceError(Code.OVERLOADED, "the server is receiving too many request messages at once; retry",
                     retry_after_s=1.0)


class KeyGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """The key of ``KEYED_METHODS``, then the budget for every method (health and reflection
    included: a keyless caller may call them, but not with megabytes at a time)."""

    def __init__(self, auth: CheckedOnce, budget: BodyBudget, max_message_bytes: int, metrics: Metrics) -> None:
        self.auth = auth
        self.budget = budget
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        path: str = handler_call_details.method
        traced = _traced(path, handler_call_details.invocation_metadata)
        if path in KEYED_METHODS:
            metadata = handler_call_details.invocation_metadata
            try:
                key = wire.bearer_key(metadata)
                principal = await self.auth.auth.authenticate(key)
            except ServiceError as exc:
                return _refusal(handler, path, exc, self.metrics, traced)
            except Exception:  # a bug in a key store: INTERNAL, as the servicer answers one, never UNKNOWN
                log.exception("checking the key of %s failed", path)
                return _refusal(handler, path, ServiceError(Code.INTERNAL, "internal error; see the server log"),
                                self.metrics, traced)
            return self._budgeted(handler, path, lambda: CheckedOnce.vouch(key, principal), traced)
        return self._budgeted(handler, path, lambda: None, traced)

    def _budgeted(self, handler: Any, path: str, enter: Callable[[], None], traced: Traced) -> Any:
        """``handler`` in its request-streaming form, its messages read under the budget."""
        deserialize = handler.request_deserializer or _identity
        unary = not handler.request_streaming

        async def argument(meter: _Meter, context: grpc.aio.ServicerContext) -> Any:
            enter()
            if not unary:
                return meter.messages()
            request = await meter.read()
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a unary call ended without its request")
            return request

        def meter(context: grpc.aio.ServicerContext) -> _Meter:
            return _Meter(self, context, path, deserialize)

        behaviour = (handler.unary_unary or handler.unary_stream) if unary else \
            (handler.stream_unary or handler.stream_stream)
        return _streaming(handler, behaviour, meter, argument, traced)


Argument = Callable[["_Meter", grpc.aio.ServicerContext], Awaitable[Any]]
Traced = Callable[[], AbstractContextManager[object]]
_NO_SPAN = contextlib.nullcontext(None)


def _traced(path: str, metadata: Any) -> Traced:
    """The call's server span (``rerank.v1.RerankService/Rerank``), for this service's methods,
    started now (the key check is part of the call) and current while its handler runs, its
    access line included; health and reflection calls are not traced."""
    if not tracing.enabled():
        return _untraced  # off: no work for the call at all
    service, _, method = path.lstrip("/").rpartition("/")
    if service != SERVICE_NAME:
        return _untraced
    started_ns = time.time_ns()
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    return lambda: tracing.front_span(path.lstrip("/"), metadata or (), "SERVER", attributes, started_ns)


def _untraced() -> AbstractContextManager[object]:
    return _NO_SPAN


def grpc_outcome(code: str) -> None:
    """The current call span's gRPC status; the server-side codes mark it failed."""
    if tracing.enabled():
        tracing.outcome("rpc.grpc.status_code", grpc.StatusCode[code].value[0], code in _SERVER_FAULTS)


_SERVER_FAULTS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                            "DATA_LOSS"})  # OpenTelemetry's RPC conventions: errors of a server span


def _streaming(handler: Any, behaviour: Callable[..., Any], meter: Callable[[grpc.aio.ServicerContext], _Meter],
               argument: Argument, traced: Traced) -> Any:
    """``handler`` as grpcio's request-streaming kind: ``behaviour`` gets what ``argument``
    reads (one message, or an iterator of them), and the budget is given back when it ends.
    Messages are read with ``context.read()``: grpcio's request iterator, once started and
    left unfinished (a unary call's end of stream is never read), keeps the call's state and
    its message alive past the call."""
    if inspect.isasyncgenfunction(behaviour):  # a streaming reply by ``yield``: none is ours, none traced
        async def generate(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            metered = meter(context)
            try:
                async for reply in behaviour(await argument(metered, context), context):
                    yield reply
            except grpc.aio.AbortError as exc:
                raise _without_frames(exc) from None
            finally:
                await metered.close()
        wrapped: Callable[..., Any] = generate
    else:
        async def call(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            metered = meter(context)
            with traced():
                try:
                    return await behaviour(await argument(metered, context), context)
                except grpc.aio.AbortError as exc:
                    raise _without_frames(exc) from None
                finally:
                    await metered.close()
        wrapped = call
    kinds: dict[str, Callable[..., Any] | None] = dict.fromkeys(
        ("unary_unary", "unary_stream", "stream_unary", "stream_stream"))
    kinds["stream_stream" if handler.response_streaming else "stream_unary"] = wrapped
    return handler._replace(request_streaming=True, request_deserializer=None, **kinds)


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` without the frames it and the errors before it passed through. grpcio keeps
    an aborted call's exception with the call's state, and those frames hold the request and
    the context, which holds the state: a cycle that only a full garbage collection frees,
    holding the message until then (measured: +400 MB a round of 16 14-MiB calls, never
    returned while the server was idle). Nothing reads these tracebacks: an abort is the
    status the caller gets, and the servicer has logged it."""
    seen: BaseException | None = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__context__ or seen.__cause__
    return exc


def _identity(data: bytes) -> bytes:
    return data


class _Meter:
    """One call's share of the budget: the full ``--max-request-bytes`` while grpcio reads a
    message (it may take in that much), the message's real size while it is held."""

    def __init__(self, guard: KeyGuard, context: grpc.aio.ServicerContext, path: str,
                 deserialize: Callable[[bytes], Any]) -> None:
        self.guard, self.context, self.path, self.deserialize = guard, context, path, deserialize
        self.held = 0
        self._stream: AsyncGenerator[Any, None] | None = None

    async def read(self) -> Any | None:
        """The next message, None at the end of the stream; RESOURCE_EXHAUSTED if no room."""
        budget, most = self.guard.budget, self.guard.max_message_bytes
        if not await budget.take_within(most - self.held, BUDGET_WAIT_S):
            await _abort(self.context, self.path, _BUSY, self.guard.metrics)
        self.held = most
        data = await self.context.read()
        size = 0 if data is grpc.aio.EOF else len(data)
        budget.give_back(self.held - size)
        self.held = size
        return None if data is grpc.aio.EOF else self.deserialize(data)

    def messages(self) -> AsyncIterator[Any]:
        self._stream = self._messages()
        return self._stream

    async def _messages(self) -> AsyncGenerator[Any, None]:
        while (message := await self.read()) is not None:
            yield message

    async def close(self) -> None:
        """Give the budget back; finish the message iterator, if any, so nothing keeps it."""
        if self._stream is not None:
            await self._stream.aclose()
        self.guard.budget.give_back(self.held)
        self.held = 0


def _refusal(handler: Any, path: str, exc: ServiceError, metrics: Metrics, traced: Traced) -> Any:
    """A handler that answers ``exc`` and never asks for the call's message."""
    async def refuse(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        with traced():
            await _abort(context, path, exc, metrics)
    return handler._replace(request_streaming=True, request_deserializer=None, unary_unary=None,
                            stream_unary=refuse)


async def _abort(context: grpc.aio.ServicerContext, path: str, exc: ServiceError, metrics: Metrics) -> None:
    """End the call with ``exc``, counted and logged as the servicer counts and logs calls."""
    service, _, method = path.lstrip("/").rpartition("/")
    if service == SERVICE_NAME:  # health and reflection calls are not counted, refused or not
        metrics.observe_request(method, exc.code.grpc_status, 0.0)
        grpc_outcome(exc.code.grpc_status)
        write_access({"rpc": method, "code": exc.code.grpc_status, "peer": context.peer(), "error": exc.message})
    await context.abort(grpc.StatusCode[exc.code.grpc_status], exc.message, retry_metadata(exc))


def retry_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    if exc.retry_after_s is None:
        return ()
    return ((RETRY_AFTER_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
