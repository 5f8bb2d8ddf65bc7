"""The gRPC front: ``rerank.v1.RerankService`` on a ``grpc.aio`` server, with health and reflection.

Each RPC is message in, ``RerankCore`` call, message out; ``service.grpc.wire`` converts and
``service.errors.Code.grpc_status`` picks the status, so nothing here decides what a call may
contain or what it costs. What is gRPC's own lives here: reading the bearer key from
metadata, the retry hint as trailing metadata, message size and connection limits, health,
reflection, and turning an undecodable request (invalid UTF-8 in a string field) into INVALID_ARGUMENT.
The key is checked, and the message budget taken, before a message is read
(``service.grpc.edge.KeyGuard``).

Cancellation needs no code: when a caller cancels or its deadline passes, grpc.aio cancels
the handler's task, the ``CancelledError`` reaches ``Batcher.score`` while it awaits, and
the batcher drops the request's queued documents.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rerank.v1 import rerank_pb2 as pb
from rerank.v1 import rerank_pb2_grpc as pb_grpc

from service.calls import Limits, RerankCall, RerankReply
from service.config import TlsFiles
from service.core import RerankCore
from service.edge import BodyBudget, CheckedOnce, GrpcLimits
from service.errors import Code, ServiceError
from service.grpc import wire
from service.grpc.edge import KeyGuard, grpc_outcome, retry_metadata
from service.logs import Fields, write_access
from service.memory import Trimmer
from service.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RerankService"].full_name
CUT_MARGIN_S = 2.0  # after the grace period, time to answer cut calls before grpcio cancels them
# Room for the reply's own fields on top of echoed documents (return_documents).
_REPLY_OVERHEAD_PER_DOC = 64


@dataclass
class _CallRecord:
    """What the access log line and the metrics say about one call."""

    method: str
    peer: str
    call: RerankCall | None = None
    reply: RerankReply | None = None
    started: float = field(default_factory=time.perf_counter)


class RerankServicer(pb_grpc.RerankServiceServicer):
    def __init__(self, core: RerankCore, metrics: Metrics, auth: CheckedOnce | None = None) -> None:
        self.core = core
        self.metrics = metrics
        self.auth = auth  # answers the core's key check from KeyGuard's, made before the message was read
        self.running: set[asyncio.Task[Any]] = set()  # the handlers of calls in progress
        self.cutting = False  # set when shutdown's grace has run out: running calls are cut

    async def cut(self) -> None:
        """End the calls still running when the grace period is over, each with UNAVAILABLE and
        a retry hint (their work is dropped and nothing is billed), instead of leaving them to
        grpcio's bare "Cancelling all calls"."""
        self.cutting = True
        running = list(self.running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CUT_MARGIN_S)

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        async with self._track("Rerank", context) as record:
            record.call = wire.call_from_request(request, context.invocation_metadata())
            record.reply = await self.core.rerank(record.call, auth=self.auth)
            return wire.response_from_reply(record.reply)

    async def RerankBatch(self, request: pb.RerankBatchRequest,
                          context: grpc.aio.ServicerContext) -> pb.RerankBatchResponse:
        async with self._track("RerankBatch", context) as record:
            record.call = wire.call_from_batch(request, context.invocation_metadata())
            record.reply = await self.core.rerank(record.call, auth=self.auth)
            return wire.batch_response_from_reply(record.reply)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with self._track("GetModelInfo", context):
            return wire.model_info_message(self.core.model_info(), self.core.limits)

    @asynccontextmanager
    async def _track(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[_CallRecord]:
        """Map errors to statuses, and log and count every call exactly once."""
        record = _CallRecord(method, context.peer())
        task = asyncio.current_task()
        if task is not None:
            self.running.add(task)
        try:
            yield record
        except ServiceError as exc:
            self._finish(record, exc.code.grpc_status, exc.message)
            await context.abort(grpc.StatusCode[exc.code.grpc_status], exc.message, retry_metadata(exc))
        except asyncio.CancelledError:  # the caller went away, its deadline passed, or shutdown cut it
            if not self.cutting or task is None:
                self._finish(record, "CANCELLED", "caller cancelled or deadline passed; work dropped")
                raise
            task.uncancel()  # cut by ``cut``: answered here, with a hint, rather than dropped
            cut = ServiceError(Code.UNAVAILABLE, "the server is shutting down and cut this call before it "
                               "finished; retry (with the same request_id it is billed at most once)",
                               retry_after_s=1.0)
            self._finish(record, cut.code.grpc_status, cut.message)
            await context.abort(grpc.StatusCode.UNAVAILABLE, cut.message, retry_metadata(cut))
        except Exception:
            log.exception("%s failed", method)
            self._finish(record, "INTERNAL", "unexpected error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        else:
            self._finish(record, "OK", "")
        finally:
            if task is not None:
                self.running.discard(task)

    def _finish(self, record: _CallRecord, code: str, message: str) -> None:
        seconds = time.perf_counter() - record.started
        self.metrics.observe_request(record.method, code, seconds)
        grpc_outcome(code)  # on the call's span, current here (service.grpc.edge.KeyGuard) as the line is written
        write_access(_access_fields(record, code, message, seconds))


def _access_fields(record: _CallRecord, code: str, message: str, seconds: float) -> Fields:
    # One line per call; never document text or keys (the message of a core error names
    # sizes and positions, not contents)
    call, reply = record.call, record.reply
    fields: dict[str, str | int | float | bool] = {"rpc": record.method, "code": code,
                                                   "ms": round(1000 * seconds, 1), "peer": record.peer}
    if call is not None:
        fields.update(request_id=reply.request_id if reply else call.request_id or "-",
                      queries=len(call.queries), documents=sum(len(q.documents) for q in call.queries))
    if reply is not None:
        fields.update(prompt_tokens=reply.prompt_tokens, computed_tokens=reply.computed_tokens,
                      replayed=reply.replayed)
    if message:
        fields["error"] = message
    return fields


# -- undecodable requests ------------------------------------------------------------------
class _Undecodable:
    def __init__(self, error: str) -> None:
        self.error = error


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Turns a request protobuf cannot parse into a clean INVALID_ARGUMENT that says why
    (malformed bytes, or invalid UTF-8 in a named string field); left alone, gRPC answers
    INTERNAL "Exception deserializing request"."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        path = handler_call_details.method
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer, _input_type(path)),
                                unary_unary=_refusing(handler.unary_unary, path, self.metrics))


def _input_type(path: str) -> Descriptor | None:
    """The request message of "/package.Service/Method", if it is one of ours."""
    service, _, method = path.lstrip("/").rpartition("/")
    found = pb.DESCRIPTOR.services_by_name.get(service.rpartition(".")[2])
    if found is None or found.full_name != service or method not in found.methods_by_name:
        return None
    return found.methods_by_name[method].input_type


def _lenient(deserialize: Callable[[bytes], Any], message: Descriptor | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable(_why_undecodable(data, message) if message else "malformed protobuf")
    return parse


class _Malformed(Exception):
    pass


def _why_undecodable(data: bytes, message: Descriptor) -> str:
    """What protobuf's "Error parsing message" meant: bad wire format, or a string field
    (named, with its index) that is not UTF-8."""
    try:
        _walk(data, message, "")
    except _Malformed as exc:
        return str(exc)
    return "malformed protobuf"


def _walk(data: bytes, message: Descriptor, where: str) -> None:
    pos, seen = 0, dict[int, int]()
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed(f"malformed protobuf: field number 0 at byte {start}")
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise _Malformed(f"malformed protobuf: the field at byte {start} runs past the end of the message")
            _check_field(data[pos:pos + length], message, number, seen, where)
            pos += length
        else:
            raise _Malformed(f"malformed protobuf: wire type {wire_type} at byte {start}")
        if pos > len(data):
            raise _Malformed(f"malformed protobuf: truncated at byte {start}")


def _check_field(chunk: bytes, message: Descriptor, number: int, seen: dict[int, int], where: str) -> None:
    field = message.fields_by_number.get(number)
    if field is None:
        return  # unknown fields are kept, not parsed
    index = seen.get(number, 0)
    seen[number] = index + 1
    name = where + field.name + (f"[{index}]" if field.is_repeated else "")
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed(f"{name} is not valid UTF-8 (byte {exc.start} of it); string fields must be") from None
    elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
        _walk(chunk, field.message_type, name + ".")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed(f"malformed protobuf: a truncated or overlong varint at byte {pos}")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _refusing(behaviour: Callable[..., Any], path: str, metrics: Metrics) -> Callable[..., Any]:
    method = path.rsplit("/", 1)[-1]  # "/rerank.v1.RerankService/Rerank" -> "Rerank", as the servicer counts

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            metrics.observe_request(method, "INVALID_ARGUMENT", 0.0)
            grpc_outcome("INVALID_ARGUMENT")
            write_access({"rpc": method, "code": "INVALID_ARGUMENT", "peer": context.peer(),
                          "error": "undecodable request"})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {method} request message: {request.error}")
        return await behaviour(request, context)
    return handle


# -- the server ------------------------------------------------------------------------------
def message_options(limits: Limits) -> list[tuple[str, int]]:
    """Receive at most ``max_request_bytes``; send enough for a reply that echoes every
    document a request may carry (the size check on documents then happens once, on receipt)."""
    send = limits.max_request_bytes + limits.max_documents * _REPLY_OVERHEAD_PER_DOC + 2**16
    return [("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", send)]


def connection_options(max_age_s: float | None) -> list[tuple[str, int]]:
    """A connection older than ``max_age_s`` gets GOAWAY once its calls are done (up to a
    minute's grace): clients reconnect, re-resolving DNS, and so find replicas added since."""
    if max_age_s is None:
        return []
    return [("grpc.max_connection_age_ms", int(max_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 60_000)]


def limit_options(limits: GrpcLimits) -> list[tuple[str, int]]:
    """What one connection may hold, and how many there may be (``maximum_concurrent_rpcs``,
    the server-wide cap on calls, is an argument of ``grpc.aio.server``). Metadata: grpcio's
    soft limit refuses some requests between it and the hard one at random; both at the
    flag's value, the refusal is certain. Connections past the cap are closed at accept."""
    return [("grpc.max_concurrent_streams", limits.max_concurrent_streams),
            ("grpc.max_connection_idle_ms", int(limits.max_connection_idle_s * 1000)),
            ("grpc.max_metadata_size", limits.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
            ("grpc.max_allowed_incoming_connections", limits.max_connections)]


def flow_control_options(bdp_probe: bool) -> list[tuple[str, int]]:
    """What the transport may take in of a message nobody has asked for yet: one stream
    window. grpcio's BDP probing grows the windows it grants toward the bandwidth-delay
    product (5 MiB grants, measured) whenever data flows, so a keyless caller's stream could
    carry megabytes before ``KeyGuard`` refuses it (400 keyless calls: 2.4 GB); off, each
    stream starts at HTTP/2's 64 KiB. A message that is asked for is then granted about
    1 MiB ahead: no slower on loopback or a LAN, slower over long links (``--grpc-bdp-probe``)."""
    return [("grpc.http2.bdp_probe", int(bdp_probe))]


class GrpcServer:
    """A component of the app: ``start`` binds and serves, ``stop`` drains."""

    def __init__(self, core: RerankCore, metrics: Metrics, *, host: str, port: int,
                 tls: TlsFiles | None = None, max_connection_age_s: float | None = None,
                 limits: GrpcLimits | None = None, bdp_probe: bool = False) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.stopping = False  # set once new calls are refused
        self.health = health.aio.HealthServicer()
        limits = limits or GrpcLimits()
        options = (message_options(core.limits) + connection_options(max_connection_age_s)
                   + limit_options(limits) + flow_control_options(bdp_probe))
        auth = CheckedOnce(core.auth)
        budget = BodyBudget(limits.max_message_bytes_in_flight, on_drained=Trimmer().after_burst)
        self.guard = KeyGuard(auth, budget, core.limits.max_request_bytes, metrics)
        # past maximum_concurrent_rpcs grpcio answers RESOURCE_EXHAUSTED itself, before the handler;
        # KeyGuard first: a refused call never reaches the decoding (nor its message the server)
        self.server = grpc.aio.server(interceptors=[self.guard, DecodeGuard(metrics)], options=options,
                                      maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        self.servicer = RerankServicer(core, metrics, auth)
        pb_grpc.add_RerankServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)

    async def start(self) -> None:
        await self.set_serving(False)
        address = f"{self.host}:{self.port}"
        if self.tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(self.tls.key.read_bytes(), self.tls.cert.read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        await self.server.start()
        log.info("gRPC listening on %s:%d (%s)", self.host, self.port, "TLS" if self.tls else "plaintext")

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):  # "" is the whole server, as health checkers ask
            await self.health.set(name, status)

    async def drain(self) -> None:
        """NOT_SERVING from now on, while calls are still taken (load balancers move away)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let in-flight ones finish for ``grace_s``, then cancel them."""
        await self.drain()
        self.stopping = True
        # grpcio refuses new calls at once; the margin lets ``cut`` answer the calls still
        # running at the end of the grace period before grpcio cancels them bare
        stopped = asyncio.ensure_future(self.server.stop(grace_s + CUT_MARGIN_S))
        done, _ = await asyncio.wait([stopped], timeout=grace_s)
        if not done:
            await self.servicer.cut()
        await stopped
