"""The knobs of ``rerank serve``, one list for the flags, the environment and the app.

Each ``ServeConfig`` field is a flag (``max_batch_tokens`` -> ``--max-batch-tokens``, or its
``flag``) and an environment variable (``RERANK_MAX_BATCH_TOKENS``); a flag beats the
environment, which beats the default. Adding a field adds the knob everywhere at once, with
its help text and default in ``rerank serve --help``. Light imports only: no grpc, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from service import tracing
from service.calls import MAX_CHUNKS_PER_DOC, Limits
from service.edge import EdgeLimits, GrpcLimits
from service.logs import LogFormat
from worker.batcher import BatcherConfig
from worker.queue import Policy
from worker.types import Attention, Device, Precision

ENV_PREFIX = "RERANK_"
_METAVARS: dict[type, str] = {int: "N", float: "X", str: "TEXT", Path: "PATH"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path


_LIMITS = Limits()
_BATCHING = BatcherConfig()
_EDGE = EdgeLimits()
_GRPC = GrpcLimits()


def knob(default: Any, help: str, *, unset: str | None = None, metavar: str | None = None, flag: str | None = None,
         alias: str | None = None, bench: bool = False) -> Any:
    """A config field and its flag: ``help`` text, what a None default means (``unset``), spellings
    where the derived ones would mislead (``alias``: an older one, unlisted); ``bench``: a switch
    for benchmarks only, kept out of the help."""
    return field(default=default, metadata={"help": help, "unset": unset, "metavar": metavar, "flag": flag,
                                            "alias": alias, "bench": bench})


DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"


@dataclass(frozen=True)
class FrontConfig:
    """The knobs of a billed HTTP front, shared by ``rerank serve`` and ``rerank gateway``."""

    host: str = knob("0.0.0.0", "address to bind ('[::]' for IPv4 and IPv6)", metavar="H")
    http_port: int | None = knob(8080, "HTTP/JSON port; 0 picks a free one (the log says which)")
    grace_s: float = knob(30.0, "on SIGTERM, let in-flight calls finish this long, then cancel them")
    log_format: LogFormat = knob(LogFormat.TEXT, "log lines as text, or one JSON object per line with the access "
                                 "log's fields and the current trace's ids (docs/OPERATIONS.md, Logs)",
                                 metavar="{text,json}")
    # -- keys and billing
    db_url: str | None = knob(None, "usage ledger and API keys: postgresql://user:pass@host/db (replicas "
                              "share it), sqlite:///path or a file path", unset="ledger.sqlite3 in --data-dir",
                              metavar="URL", flag="--db")
    data_dir: Path | None = knob(None, "directory of the default SQLite ledger",
                                 unset="$XDG_DATA_HOME/rerank or ~/.local/share/rerank", metavar="DIR")
    auth: bool = knob(True, "require API keys (`rerank keys create`); --no-auth serves everyone as "
                            "'anonymous', for trusted networks only")
    replicas: int = knob(1, "replicas sharing each key's rate limit: each one enforces 1/N of it")
    rate_limit_rps: float | None = knob(None, "requests per second per key, for keys without their own",
                                        unset="unlimited")
    rate_limit_dps: float | None = knob(None, "documents per second per key, for keys without their own",
                                        unset="unlimited")
    idempotency_ttl_h: float = knob(24.0, "hours a call's idempotency key (HTTP Idempotency-Key, gRPC "
                                    "request_id) is remembered: a retry within it replays the stored reply "
                                    "unbilled; after it, the key starts a new, billed call")
    # -- the HTTP edge's resource limits (service.edge.EdgeLimits; docs/SECURITY.md)
    http_max_connections: int = knob(_EDGE.max_connections, "open HTTP connections; past it a connection's "
                                     "calls get 503 with Retry-After")
    http_header_timeout_s: float = knob(_EDGE.header_timeout_s, "seconds for a request head (request line and "
                                        "headers) to arrive; a connection that stalls is closed with 408")
    http_body_timeout_s: float = knob(_EDGE.body_timeout_s, "seconds for a request body to arrive once its head "
                                      "has; slower is 408")
    http_idle_timeout_s: float = knob(_EDGE.idle_timeout_s, "seconds an idle keep-alive connection stays open")
    http_max_header_bytes: int = knob(_EDGE.max_header_bytes, "bytes in a request head; larger is 431")
    http_max_body_bytes_in_flight: int = knob(_EDGE.max_body_bytes_in_flight, "request body bytes received or "
                                              "held at once, all connections together; past it calls get 429")
    # -- tracing (service.tracing; docs/OPERATIONS.md, "Tracing")
    otlp_endpoint: str | None = knob(None, "export OpenTelemetry traces over OTLP/gRPC to this collector, e.g. "
                                     "http://otel-collector:4317 (OTEL_EXPORTER_OTLP_ENDPOINT or "
                                     "OTEL_TRACES_EXPORTER=otlp turn tracing on too; OTEL_SERVICE_NAME, "
                                     "OTEL_TRACES_SAMPLER and the other OTEL_* variables apply)", metavar="URL",
                                     unset="off, unless the OTEL_* environment asks for it")
    trace_text: bool = knob(False, "put query, instruction and document text in the exported spans (off: "
                            "counts only; the text is your callers' data)")

    def tracing(self) -> tracing.Settings | None:
        """Whether and where to export traces (None: off); ValueError for OTEL_* it cannot honour."""
        return tracing.Settings.read(self.otlp_endpoint, self.trace_text)

    def edge_limits(self) -> EdgeLimits:
        """The HTTP edge's limits: the ``http_*`` knobs, EdgeLimits' fields with a prefix."""
        return EdgeLimits(**{f.name: getattr(self, "http_" + f.name) for f in dataclasses.fields(EdgeLimits)})


@dataclass(frozen=True)
class ServeConfig(FrontConfig):
    """``rerank serve``: the front's knobs, then the model's, batching, limits, gRPC and TLS."""

    model: str | None = knob(DEFAULT_MODEL, "model to serve: a Hugging Face hub id or a local checkpoint "
                             "directory (Qwen3-Reranker 0.6B, 4B or 8B)", metavar="PATH_OR_HUB_ID")
    model_name: str | None = knob(None, "the name callers send in `model`; --model's value is accepted too",
                                  metavar="NAME", unset="--model as given")
    grpc_port: int = knob(50051, "gRPC port; 0 picks a free one (the log says which)")
    metrics_port: int | None = knob(None, "serve Prometheus /metrics on this port", unset="off")
    # -- the model
    device: str | None = knob(None, "torch device, e.g. cpu, cuda, cuda:1", unset="cuda if available, else cpu",
                              metavar="DEVICE")
    dtype: Precision = knob(Precision.AUTO, "auto (bfloat16 on cuda; float32 on cpu, the CPU's bf16 units logged "
                            "at start), float32, bfloat16, float16, or on a CPU exact-bf16x2 or exact-bf16x3 (fp32 "
                            "activations split into bf16 parts on the bf16 matrix units; x3 keeps scores within "
                            "1e-5; docs/PERFORMANCE.md)", metavar="DTYPE", alias="--precision")
    max_length: int = knob(8192, "tokens in one (query, document) prompt; longer ones are truncated or refused")
    prefix_cache_mb: int = knob(512, "memory for cached query-prefix K/V, MiB; on a CPU the runner adds room for "
                                 "one --max-length row's K/V (up to 8,192 tokens: 1.75 GiB for the 0.6B in fp32), so "
                                 "such a row can run in pieces within --max-batch-ms")
    compile: bool | None = knob(None, "torch.compile the per-token layer work (fuses norms, rotary and "
                                "the MLP gate); adds ~15-60 s to warm-up, 1.3-1.5x on a GPU, 1.2-1.4x for bf16 "
                                "and 1.07-1.13x for float32 on a CPU (docs/PERFORMANCE.md); falls back to eager "
                                "if it cannot build",
                                unset="on, except for the exact-bf16 split precisions and a CPU host without g++")
    attention: Attention | None = knob(None, "attention kernel: rows (the CPU's flash kernel a row at a time, "
                                       "nothing padded; CPU only) or padded (masked SDPA over padded rows; every "
                                       "device)",
                                       unset="rows on cpu, padded on cuda", metavar="KIND")
    # -- batching (None: the worker's default for the device, BatcherConfig.for_device)
    max_batch_tokens: int | None = knob(None, "padded tokens in one model batch", unset="per device")
    max_batch_size: int | None = knob(None, "documents in one model batch", unset="per device")
    max_wait_ms: float | None = knob(None, "linger this long for more work when the model is idle",
                                     unset="per device")
    max_batch_ms: float | None = knob(None, "what one model batch may take, as estimated from its shape by a "
                                      "cost model fitted on this device at warm-up and from every batch since: "
                                      "a caller waits for the batch in flight; 0: batches sized by tokens only",
                                      unset="500 on cpu, 250 on cuda")
    max_queued_docs: int = knob(_BATCHING.max_queued_docs, "documents queued before calls are refused "
                                                           "with RESOURCE_EXHAUSTED")
    max_queued_tokens: int = knob(_BATCHING.max_queued_tokens, "tokens of queued work (each document's own "
                                  "tokens; a shared query prefix once) before calls are refused with "
                                  "RESOURCE_EXHAUSTED; a call alone in an empty queue is always taken")
    scheduler: Policy = knob(_BATCHING.scheduler, "fair: share model batches between API keys and between a "
                             "key's calls by tokens, with priority classes; fifo: arrival order (for comparison "
                             "only: one key's large call delays everyone's)", metavar="POLICY", bench=True)
    prefix_reuse: bool = knob(_BATCHING.prefix_reuse, "compute a request's shared query prefix once", bench=True)
    tokenizer_threads: int = knob(_BATCHING.tokenizer_threads, "threads tokenizing requests")
    # -- limits per call
    max_documents: int = knob(_LIMITS.max_documents, "documents in one call, summed over its queries")
    max_queries: int = knob(_LIMITS.max_queries, "queries in one RerankBatch call")
    max_query_chars: int = knob(_LIMITS.max_query_chars, "characters in a query")
    max_instruction_chars: int = knob(_LIMITS.max_instruction_chars, "characters in an instruction")
    max_document_chars: int = knob(_LIMITS.max_document_chars, "characters in one document")
    max_request_bytes: int = knob(_LIMITS.max_request_bytes, "bytes in one request message: the gRPC "
                                                             "max receive size")
    max_chunks_per_doc: int = knob(_LIMITS.max_chunks_per_doc, "chunks a document longer than --max-length is "
                                   "scored as (its best chunk's score) when a call names none, and the most a call "
                                   f"may ask for (1-{MAX_CHUNKS_PER_DOC}; 1: no chunking, a long document is cut)")
    # -- TLS and shutdown
    tls_cert: Path | None = knob(None, "PEM certificate chain; with --tls-key, serve gRPC over TLS",
                                 unset="plaintext")
    tls_key: Path | None = knob(None, "PEM private key for --tls-cert", unset="plaintext")
    drain_delay_s: float = knob(0.0, "on SIGTERM, report NOT_SERVING this long before refusing calls")
    max_connection_age_s: float | None = knob(
        None, "close each gRPC connection after this long (in-flight calls finish), so long-lived "
        "clients re-resolve DNS and find new replicas", unset="never")
    # -- the gRPC server's resource limits (service.edge.GrpcLimits; docs/SECURITY.md)
    grpc_max_concurrent_rpcs: int = knob(_GRPC.max_concurrent_rpcs, "gRPC calls being handled at once, all "
                                         "connections together (health checks too); past it a call gets "
                                         "RESOURCE_EXHAUSTED before its message is read")
    grpc_max_concurrent_streams: int = knob(_GRPC.max_concurrent_streams, "gRPC calls open at once on one "
                                            "connection (HTTP/2 SETTINGS): a client queues the rest")
    grpc_max_connection_idle_s: float = knob(_GRPC.max_connection_idle_s, "seconds a gRPC connection with no "
                                             "call stays open; then GOAWAY (clients reconnect when they "
                                             "next call)")
    grpc_max_metadata_bytes: int = knob(_GRPC.max_metadata_bytes, "bytes of a gRPC call's metadata (its "
                                        "headers); larger is RESOURCE_EXHAUSTED")
    grpc_max_connections: int = knob(_GRPC.max_connections, "open gRPC connections, all peers together; past "
                                     "it a new connection is closed as soon as it is accepted (clients retry)")
    grpc_max_message_bytes_in_flight: int = knob(_GRPC.max_message_bytes_in_flight, "gRPC request message bytes "
                                                 "received or held at once, all calls together (a message being "
                                                 "read counts as --max-request-bytes); past it calls get "
                                                 "RESOURCE_EXHAUSTED with retry-after-ms")
    grpc_bdp_probe: bool = knob(False, "let grpcio grow HTTP/2 flow-control windows toward the link's "
                                "bandwidth-delay product: faster megabyte messages over long links, but every "
                                "call's stream, keyless ones too, may then carry megabytes before it is refused "
                                "(docs/SECURITY.md)")

    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def grpc_limits(self) -> GrpcLimits:
        return GrpcLimits(**{f.name: getattr(self, "grpc_" + f.name) for f in dataclasses.fields(GrpcLimits)})

    def batcher_config(self, device: Device) -> BatcherConfig:
        base = BatcherConfig.for_device(device)
        chosen: dict[str, Any] = {"max_batch_tokens": self.max_batch_tokens, "max_batch_size": self.max_batch_size,
                                  "max_wait_ms": self.max_wait_ms, "max_batch_ms": self.max_batch_ms}
        return dataclasses.replace(
            base, **{k: v for k, v in chosen.items() if v is not None}, max_queued_docs=self.max_queued_docs,
            max_queued_tokens=self.max_queued_tokens, scheduler=self.scheduler, prefix_reuse=self.prefix_reuse,
            tokenizer_threads=self.tokenizer_threads)

    def tls(self) -> TlsFiles | None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        return TlsFiles(Path(self.tls_cert), Path(self.tls_key)) if self.tls_cert and self.tls_key else None


@dataclass(frozen=True)
class GatewayConfig(FrontConfig):
    """``rerank gateway``: the front's knobs, then where the backends are."""

    backend: tuple[str, ...] = knob((), "a gRPC Rerank server to score on, HOST:PORT (repeat the flag, or "
                                    "separate with commas in the environment; round robin), or a target that "
                                    "resolves to several, dns:///NAME:PORT (calls spread over all its "
                                    "addresses)", metavar="HOST:PORT")
    backend_api_key: str | None = knob(None, "key the backends require, if they run with auth", unset="none",
                                       metavar="KEY")
    backend_tls: bool = knob(False, "TLS to the backends")
    timeout_s: float = knob(60.0, "deadline of one backend call")
    connect_timeout_s: float = knob(600.0, "wait this long at start for a backend to answer (they may be loading)")
    backend_rps: float | None = knob(None, "pace calls to each backend to X requests/s (the client's Pacing)",
                                     unset="unpaced")
    backend_dps: float | None = knob(None, "pace each backend to X documents/s", unset="unpaced")
    backend_retries: int = knob(0, "retry a backend's RESOURCE_EXHAUSTED up to N times after its retry-after-ms "
                                   "(a refused call was not scored); 0: answer 429 at once")


# -- flags and environment -------------------------------------------------------------------
Config = TypeVar("Config", bound=FrontConfig)


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None,
                  config: type[FrontConfig] = ServeConfig) -> None:
    """One flag per field of ``config``; defaults come from ``env`` (default ``os.environ``),
    then the field."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kind = _base_type(hints[f.name])
        var = ENV_PREFIX + f.name.upper()
        default = _parse_env(var, env[var], hints[f.name]) if var in env else f.default
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        # "%(default).0s" prints nothing, but tells rerank's help formatter that the default
        # is already shown, so a None default reads as what it means, not "None"
        shown = f.metadata["unset"] + "%(default).0s" if default is None else "%(default)s"
        help_text = f"{f.metadata['help']} [env {var}] (default: {shown})"
        help_text = argparse.SUPPRESS if f.metadata["bench"] else help_text  # reachable, not listed
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        elif kind is tuple:
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, action=_Append,
                                metavar=f.metadata["metavar"])
        else:
            choices = list(kind) if issubclass(kind, enum.Enum) else None
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, type=kind, choices=choices,
                                metavar=f.metadata["metavar"] or _METAVARS[kind])
            if f.metadata["alias"]:  # the older spelling still works, unlisted
                parser.add_argument(f.metadata["alias"], dest=f.name, default=argparse.SUPPRESS,
                                    help=argparse.SUPPRESS, type=kind, choices=choices)


def from_args(args: argparse.Namespace) -> ServeConfig:
    return config_from_args(args, ServeConfig)


def config_from_args(args: argparse.Namespace, config: type[Config]) -> Config:
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})


class _Append(argparse.Action):
    """Repeatable flag: the first use replaces the default (from the environment), later
    ones add to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest) if self.dest in getattr(namespace, "_appended", ()) else ()
        namespace._appended = {*getattr(namespace, "_appended", ()), self.dest}
        setattr(namespace, self.dest, (*given, values))


def _base_type(hint: Any) -> type:
    """``int | None`` -> int; ``tuple[str, ...]`` -> tuple."""
    if typing.get_origin(hint) is tuple:
        return tuple
    if isinstance(hint, types.UnionType):
        (kind,) = [t for t in typing.get_args(hint) if t is not type(None)]
        return typing.cast(type, kind)
    return typing.cast(type, hint)


def _parse_env(var: str, raw: str, hint: Any) -> Any:
    kind = _base_type(hint)
    try:
        if kind is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind is bool:
            if raw.strip().lower() not in _TRUE | _FALSE:
                raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
            return raw.strip().lower() in _TRUE
        return kind(raw)
    except ValueError as exc:
        raise SystemExit(f"rerank: environment {var}={raw!r} is not a valid {kind.__name__}: {exc}") from None
