"""An OTLP trace receiver for tests and benchmarks: the collector's gRPC ``TraceService`` from
the published OpenTelemetry protos, on loopback, keeping every export's bytes as received
and the spans in them, flattened."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    status: int = 0  # 2: error


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """``with Receiver() as r``: ``r.endpoint`` takes exports; ``r.raw`` and ``r.spans()`` hold them
    (``keep=False``: counted only, as a benchmark's sink)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.raw: list[bytes] = []
        self.exports = 0
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(2))
        handler = grpc.unary_unary_rpc_method_handler(
            self.Export, request_deserializer=self._parse,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString)
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler})])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _parse(self, data: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
        with self._lock:
            self.exports += 1
            self.bytes_received += len(data)
            if self.keep:
                self.raw.append(data)  # the bytes as they came over the wire
        return trace_service_pb2.ExportTraceServiceRequest.FromString(data if self.keep else b"")

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            raw = list(self.raw)
        out = []
        for data in raw:
            for rs in trace_service_pb2.ExportTraceServiceRequest.FromString(data).resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for scope in rs.scope_spans:
                    out += [ExportedSpan(service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(),
                                         s.parent_span_id.hex(), s.start_time_unix_nano, s.end_time_unix_nano,
                                         {a.key: _value(a.value) for a in s.attributes},
                                         [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                         s.status.code)
                            for s in scope.spans]
        return out

    def __enter__(self) -> Receiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0)
