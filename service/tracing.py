"""Tracing: OpenTelemetry spans of every API call, exported over OTLP/gRPC; off by default.

Off, nothing of OpenTelemetry is imported or set up: ``span`` hands back one shared no-op
context, ``current`` and ``watch`` answer None, and each hook is a module-global check. On
(``--otlp-endpoint``, or the ``OTEL_*`` variables: ``Settings.read``), ``start`` builds a
tracer provider of its own (the process-global one is left alone) with a
``BatchSpanProcessor`` and the OTLP/gRPC exporter; ``shutdown`` flushes it, the app's last step.

The spans (docs/OPERATIONS.md, "Tracing"): the call at each front (its parent from a W3C
``traceparent`` header or gRPC metadata), the core's steps (``rerank.auth``,
``rerank.replay``, ``rerank.admission``, ``rerank.score`` per query, ``rerank.bill``), the
worker's (``rerank.tokenize`` and ``rerank.queue``, made after the fact from what the
batcher reports to a ``CallWatch``), and one ``rerank.batch`` per model batch, a root of
its own linked to the calls it served. No key is ever an attribute (its key id is), and no
query or document text unless the operator asks (``--trace-text``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

    from worker.batcher import BatchStats

log = logging.getLogger(__name__)

_OFF: AbstractContextManager[None] = contextlib.nullcontext(None)  # shared: reusable, allocates nothing
_ON_EXPORTERS = {"otlp"}
_OFF_EXPORTERS = {"none", ""}
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})  # W3C trace context; baggage is not taken


@dataclass(frozen=True, slots=True)
class Settings:
    """Whether to trace, and where to: ``read`` decides it from the flag and the environment."""

    endpoint: str | None = None  # None: the exporter's own reading of OTEL_EXPORTER_OTLP_*
    text: bool = False  # export query and document text (the operator's opt-in)

    @staticmethod
    def read(endpoint: str | None, text: bool = False, env: Mapping[str, str] | None = None) -> Settings | None:
        """None: tracing off. On with ``endpoint`` (``--otlp-endpoint``), or an OTLP endpoint in
        the environment, or ``OTEL_TRACES_EXPORTER=otlp``. ``OTEL_TRACES_EXPORTER=none`` keeps the
        environment's settings off (the flag still wins); ``OTEL_SDK_DISABLED=true`` turns it off
        whatever else says so (the SDK would record nothing anyway).
        Raises ValueError for what this server cannot do (another exporter or protocol)."""
        env = os.environ if env is None else env
        exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if exporter not in _ON_EXPORTERS | _OFF_EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: traces go over OTLP/gRPC "
                             "('otlp') or nowhere ('none')")
        protocol = next((env[v].strip() for v in _PROTOCOL_VARS if env.get(v, "").strip()), "grpc")
        if protocol != "grpc":
            raise ValueError(f"OTLP protocol {protocol!r} is not supported: this server exports over 'grpc' "
                             "(port 4317 on a collector)")
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        if endpoint:
            return Settings(endpoint, text)
        asked = exporter == "otlp" or any(env.get(v, "").strip() for v in _ENDPOINT_VARS)
        return Settings(None, text) if asked and exporter != "none" else None


class _State:
    tracer: Tracer | None = None
    provider: TracerProvider | None = None
    text = False


def enabled() -> bool:
    return _State.tracer is not None


def start(settings: Settings | None, service_name: str) -> None:
    """Set up the SDK for ``settings`` (None: nothing is imported, nothing set up). The
    resource's ``service.name`` is ``service_name`` unless OTEL_SERVICE_NAME (or
    OTEL_RESOURCE_ATTRIBUTES) names one."""
    if settings is None or _State.provider is not None:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER, parent-based by default
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
    _State.provider, _State.tracer, _State.text = provider, provider.get_tracer("rerank"), settings.text
    log.info("tracing on: OTLP/gRPC to %s as %s", settings.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint",
             resource.attributes.get(SERVICE_NAME))


def shutdown() -> None:
    """Export what is buffered and stop: the app's last step, after its servers and engine."""
    provider = _State.provider
    _State.provider, _State.tracer, _State.text = None, None, False
    if provider is not None:
        provider.shutdown()


# -- spans of the call's own path -------------------------------------------------------------
def span(name: str) -> AbstractContextManager[Span | None]:
    """A child of the current span, current while open (None when off). An exception out of it
    is recorded on it, and marks it failed."""
    if _State.tracer is None:
        return _OFF
    return _State.tracer.start_as_current_span(name)


def current() -> Span | None:
    """The current span (the call's front span, in the core), None when tracing is off."""
    if _State.tracer is None:
        return None
    from opentelemetry import trace

    return trace.get_current_span()


def current_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` (W3C hex) of the span current here, for a log line; none
    when no span is (a formatter may ask with tracing off: a caller's own provider, a test's)."""
    try:
        from opentelemetry import trace
    except ImportError:  # the API is not installed: nothing can be current
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}


def describe(span: Span, **attributes: str | int | bool) -> None:
    """``rerank.<name>`` attributes on ``span`` (the core's words for a call)."""
    span.set_attributes({f"rerank.{name}": value for name, value in attributes.items()})


def describe_query(span: Span, query: str, instruction: str | None, documents: Sequence[str]) -> None:
    """A query's ``rerank.score`` span: its size; its text only where the operator opted in."""
    span.set_attribute("rerank.documents", len(documents))
    if _State.text:  # --trace-text
        span.set_attributes({"rerank.query.text": query, "rerank.documents.text": list(documents)})
        if instruction is not None:
            span.set_attribute("rerank.instruction.text", instruction)


def front_span(name: str, headers: Iterable[tuple[Any, Any]], kind: str, attributes: Mapping[str, Any],
               start_ns: int | None = None) -> AbstractContextManager[Span | None]:
    """The span of one call at a front, current while open: the child of the caller's W3C
    ``traceparent`` (HTTP header or gRPC metadata, names in lower case, str or bytes), or a
    new trace. Its status is set by ``outcome``, not by the exceptions that end it (an abort is
    how gRPC answers)."""
    if _State.tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {_text(k).lower(): _text(v) for k, v in headers if _text(k).lower() in _TRACE_HEADERS}
    parent = TraceContextTextMapPropagator().extract(carrier)
    return _State.tracer.start_as_current_span(name, parent, SpanKind[kind], attributes, start_time=start_ns,
                                               record_exception=False, set_status_on_exception=False)


def outcome(attribute: str, value: int, failed: bool) -> None:
    """The current (front) span's answer: ``attribute`` (a status code) and, where the server
    failed (5xx, gRPC's server-side codes), an error status."""
    if _State.tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    current_span = trace.get_current_span()
    current_span.set_attribute(attribute, value)
    if failed:
        current_span.set_status(StatusCode.ERROR)


def client_span(method: str, target: str) -> AbstractContextManager[tuple[tuple[str, str], ...]]:
    """A CLIENT span around an outgoing gRPC call of ``method`` ("package.Service/Method") to
    ``target``; gives the metadata that carries it on (its ``traceparent``): () when off."""
    if _State.tracer is None:
        return _NO_METADATA
    return _client_span(method, target)


_NO_METADATA: AbstractContextManager[tuple[tuple[str, str], ...]] = contextlib.nullcontext(())


@contextlib.contextmanager
def _client_span(method: str, target: str) -> Iterator[tuple[tuple[str, str], ...]]:
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    assert _State.tracer is not None
    service, _, name = method.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "server.address": target}
    with _State.tracer.start_as_current_span(method, kind=SpanKind.CLIENT, attributes=attributes):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield tuple(carrier.items())


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


# -- the worker's steps, after the fact ------------------------------------------------------------
class CallWatch:
    """What the batcher reports of one query (``worker.types.Watcher``), made spans under the
    query's ``rerank.score`` span: ``rerank.tokenize``, then ``rerank.queue`` (from the end of
    tokenizing to its first row's model batch). The batch span links to ``span``."""

    __slots__ = ("span", "_queued_at", "_batched", "_offset_ns")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._queued_at: float | None = None
        self._batched = False
        self._offset_ns = _offset_ns()  # one clock mapping for both: the queue starts as tokenizing ends

    def tokenized(self, started: float, ended: float) -> None:
        self._queued_at = ended
        self._child("rerank.tokenize", started, ended)

    def batched(self, started: float) -> None:
        if self._batched or self._queued_at is None:
            return
        self._batched = True
        self._child("rerank.queue", self._queued_at, started)

    def _child(self, name: str, started: float, ended: float) -> None:
        from opentelemetry import trace

        tracer = _State.tracer
        if tracer is None:
            return
        child = tracer.start_span(name, trace.set_span_in_context(self.span),
                                  start_time=self._offset_ns + round(started * 1e9))
        child.end(self._offset_ns + round(ended * 1e9))


def watch() -> CallWatch | None:
    """A watch for the current span (a query's ``rerank.score``), when it is being recorded."""
    span_now = current()
    return CallWatch(span_now) if span_now is not None and span_now.is_recording() else None


def _offset_ns() -> int:
    """What turns a ``time.perf_counter()`` reading (seconds, times 1e9) into the wall-clock
    nanoseconds OpenTelemetry wants; read afresh for each call and batch, so the two clocks'
    drift over a server's uptime never shows."""
    return time.time_ns() - time.perf_counter_ns()


def batch(stats: BatchStats) -> None:
    """One ``rerank.batch`` span for a model batch, the root of a trace of its own, linked to
    the ``rerank.score`` span of every query it served (and each of those to it): made only
    if one of them is traced. The batcher's ``on_batch`` hook, on the event loop."""
    tracer = _State.tracer
    watchers: Sequence[Any] = stats.watchers
    if tracer is None or not any(isinstance(w, CallWatch) and w.span.get_span_context().trace_flags.sampled
                                 for w in watchers):
        return
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, StatusCode

    contexts: list[SpanContext] = [w.span.get_span_context() for w in watchers if isinstance(w, CallWatch)]
    offset = _offset_ns()
    span_ = tracer.start_span("rerank.batch", Context(), links=[Link(c) for c in contexts],
                              start_time=offset + round(stats.started * 1e9), attributes={
                                  "rerank.batch.rows": stats.rows, "rerank.batch.requests": stats.requests,
                                  "rerank.batch.padded_tokens": stats.padded_tokens,
                                  "rerank.batch.computed_tokens": stats.computed_tokens,
                                  "rerank.batch.prefill_tokens": stats.prefill_tokens,
                                  "rerank.batch.estimated_ms": round(1000 * stats.estimated_seconds, 3)})
    if stats.failed:
        span_.set_status(StatusCode.ERROR, "the model failed on this batch")
    span_.end(offset + round((stats.started + stats.seconds) * 1e9))
    for w in watchers:
        if isinstance(w, CallWatch) and w.span.is_recording():
            w.span.add_link(span_.get_span_context())

