"""``RerankClient`` and ``AsyncRerankClient``: plain Python lists in, ranked results out.

The generated stubs stay behind these classes. What they add over a bare stub:

* deadlines: every call has one (``timeout_s`` per client, overridable per call);
* retries on UNAVAILABLE (the model still loading, a replica draining) by gRPC's own retry
  policy in the channel's service config, with exponential backoff, inside the deadline;
* a request id on every call, made here when the caller gives none: the server treats it as
  the idempotency key, so a call that gRPC retries is billed once (``idempotent=False``: none
  made, for a front that dedupes and bills its calls itself);
* the API key as ``authorization: Bearer <key>``: call credentials on a TLS channel,
  plain metadata on a plaintext one (gRPC sends call credentials over TLS only);
* ``RerankError`` for every failure, carrying the status code and the server's retry hint;
* optional pacing (``pacing=Pacing(...)``, ``clients/pacing.py``): a requests/documents per
  second budget, and RESOURCE_EXHAUSTED retried after the server's hint with the same request id.

Only grpc, protobuf, asyncio-throttle and the generated stubs are imported: the client-only
install has them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import grpc.aio
from rerank.v1 import rerank_pb2 as pb
from rerank.v1 import rerank_pb2_grpc as pb_grpc

from clients.pacing import Pacer, Pacing, paced, paced_sync

SERVICE = "rerank.v1.RerankService"
RETRY_AFTER_KEY = "retry-after-ms"
# the tenant a trusted front (rerank gateway) calls for; a server without keys shares its model by it
ON_BEHALF_OF_KEY = "x-rerank-on-behalf-of"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20  # above the server's default 16 MiB request limit
Compression = Literal["gzip", "deflate"]
_COMPRESSION = {None: grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip,
                "deflate": grpc.Compression.Deflate}


# -- values ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RankedResult:
    index: int  # position in the documents sent
    score: float  # relevance probability, sigmoid(logit)
    logit: float  # raw log-odds, logit(yes) - logit(no)
    truncated: bool  # tokens of the document went unscored (past its last chunk, or max_tokens_per_doc)
    document: str | None = None  # the text, when return_documents was asked
    chunks: int = 1  # the chunks a document longer than max_length was scored as
    best_chunk: int = 0  # which one gave its score (0-based)


@dataclass(frozen=True, slots=True)
class Usage:
    documents: int  # billed documents: every one sent
    prompt_tokens: int
    computed_tokens: int


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One query's documents, best first."""

    results: list[RankedResult]
    usage: Usage
    model: str
    request_id: str
    total_ms: float  # server time for the whole call
    replayed: bool = False  # served from an earlier call with the same request id
    warnings: list[str] = field(default_factory=list)  # what the server changed, e.g. a clamped priority

    @property
    def indices(self) -> list[int]:
        return [r.index for r in self.results]


@dataclass(frozen=True, slots=True)
class Query:
    """One query of ``rerank_batch``."""

    query: str
    documents: Sequence[str]
    instruction: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    truncate: bool = True
    max_tokens_per_doc: int | None = None  # cut each document to this many tokens; None: no cut
    max_chunks_per_doc: int | None = None  # score a long document as up to this many chunks; None: the server's


@dataclass(frozen=True, slots=True)
class Limits:
    max_documents: int
    max_queries: int
    max_query_chars: int
    max_instruction_chars: int
    max_document_chars: int
    max_request_bytes: int
    max_chunks_per_doc: int = 1  # a call's default and most; 1: the server does not chunk


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    max_length: int
    dtype: str
    device: str
    limits: Limits


class RerankError(Exception):
    """A failed call: ``code`` is the gRPC status, ``retry_after_s`` the server's hint, if any."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> RerankError:
        call: Any = exc  # sync and aio errors both carry code(), details(), trailing_metadata()
        retry = None
        for key, value in call.trailing_metadata() or ():
            if key == RETRY_AFTER_KEY:
                retry = int(value) / 1000
        return cls(call.code(), call.details() or "", retry)


# -- the channel -------------------------------------------------------------------------------
def service_config(retries: int) -> str:
    """gRPC's retry policy: UNAVAILABLE only, as every other status means retrying cannot help
    (or, for RESOURCE_EXHAUSTED, should wait for the server's hint, which is the caller's call)."""
    method: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if retries > 0:
        method["retryPolicy"] = {"maxAttempts": min(retries + 1, 5), "initialBackoff": "0.1s",
                                 "maxBackoff": "2s", "backoffMultiplier": 2,
                                 "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [method]})


@dataclass(frozen=True, slots=True)
class _ChannelSpec:
    target: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    options: list[tuple[str, Any]]
    compression: grpc.Compression
    metadata: tuple[tuple[str, str], ...]  # sent with every call


def _channel_spec(target: str, *, api_key: str | None, tls: bool, root_certificates: bytes | None,
                  compression: Compression | None, retries: int, max_message_bytes: int,
                  options: Sequence[tuple[str, Any]]) -> _ChannelSpec:
    # round_robin, not gRPC's pick_first: a target that resolves to several addresses (a
    # Kubernetes headless Service, `dns:///rerank:50051`, `ipv4:a:p,b:p`) spreads calls over
    # all of them. A caller's own policy stays theirs (gRPC reads the first of a repeated arg).
    balancing = [] if any(name == "grpc.lb_policy_name" for name, _ in options) else [
        ("grpc.lb_policy_name", "round_robin")]
    opts: list[tuple[str, Any]] = [
        *balancing,
        ("grpc.service_config", service_config(retries)), ("grpc.enable_retries", int(retries > 0)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes), *options]
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates)
        if api_key:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(api_key))  # "Bearer <key>"
    elif api_key:
        metadata = (("authorization", f"Bearer {api_key}"),)
    return _ChannelSpec(target, credentials, opts, _COMPRESSION[compression], metadata)


# -- requests and replies ----------------------------------------------------------------------
def _truncation(truncate: bool) -> pb.Truncation.ValueType:
    return pb.TRUNCATION_END if truncate else pb.TRUNCATION_NONE


def _rerank_request(query: str, documents: Sequence[str], *, instruction: str | None, top_n: int | None,
                    return_documents: bool, truncate: bool, model: str | None,
                    request_id: str | None, max_tokens_per_doc: int | None = None,
                    priority: int | None = None, idempotent: bool = True,
                    max_chunks_per_doc: int | None = None) -> pb.RerankRequest:
    return pb.RerankRequest(model=model or "", query=query, documents=list(documents), instruction=instruction,
                            top_n=top_n or 0, return_documents=return_documents, truncation=_truncation(truncate),
                            request_id=request_id or (uuid.uuid4().hex if idempotent else ""),
                            max_tokens_per_doc=max_tokens_per_doc, priority=priority,
                            max_chunks_per_doc=max_chunks_per_doc)


def _with_tenant(metadata: tuple[tuple[str, str], ...], on_behalf_of: str | None) -> tuple[tuple[str, str], ...]:
    return metadata if on_behalf_of is None else (*metadata, (ON_BEHALF_OF_KEY, on_behalf_of))


def _batch_request(queries: Sequence[Query], model: str | None, request_id: str | None) -> pb.RerankBatchRequest:
    return pb.RerankBatchRequest(model=model or "", request_id=request_id or uuid.uuid4().hex, queries=[
        pb.BatchQuery(query=q.query, documents=list(q.documents), instruction=q.instruction, top_n=q.top_n or 0,
                      return_documents=q.return_documents, truncation=_truncation(q.truncate),
                      max_tokens_per_doc=q.max_tokens_per_doc, max_chunks_per_doc=q.max_chunks_per_doc)
        for q in queries])


def _build(make: Any, *args: Any, **kwargs: Any) -> Any:
    """A request protobuf cannot encode (a lone surrogate is not UTF-8) fails here as the
    INVALID_ARGUMENT the server would have said, before anything is sent."""
    try:
        return make(*args, **kwargs)
    except (UnicodeError, TypeError, ValueError) as exc:
        raise RerankError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot encode the request: {exc}") from None


def _documents(queries: Sequence[Query]) -> int:
    return sum(len(q.documents) for q in queries)


def retry_hint(exc: Exception) -> float | None:
    """The server's wait before a retry can succeed: RESOURCE_EXHAUSTED with retry-after-ms only."""
    if isinstance(exc, RerankError) and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return exc.retry_after_s
    return None


def _expired(message: str) -> RerankError:
    return RerankError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def _ranked(results: Sequence[pb.RankedDocument]) -> list[RankedResult]:
    return [RankedResult(r.index, r.score, r.logit, r.truncated, r.document if r.HasField("document") else None,
                         max(1, r.chunks), r.best_chunk)  # 0 chunks: a server older than chunking
            for r in results]


def _usage(u: pb.Usage) -> Usage:
    return Usage(u.documents, u.prompt_tokens, u.computed_tokens)


def _result(reply: pb.RerankResponse) -> RerankResult:
    return RerankResult(_ranked(reply.results), _usage(reply.usage), reply.model, reply.request_id,
                        reply.timing.total_ms, reply.replayed, list(reply.warnings))


def _batch_results(reply: pb.RerankBatchResponse) -> list[RerankResult]:
    return [RerankResult(_ranked(q.results), _usage(q.usage), reply.model, reply.request_id,
                         reply.timing.total_ms, reply.replayed, list(reply.warnings)) for q in reply.queries]


def _model_info(m: pb.ModelInfo) -> ModelInfo:
    lim = m.limits
    return ModelInfo(m.model, m.max_length, m.dtype, m.device,
                     Limits(lim.max_documents, lim.max_queries, lim.max_query_chars, lim.max_instruction_chars,
                            lim.max_document_chars, lim.max_request_bytes, max(1, lim.max_chunks_per_doc)))


# -- the clients -------------------------------------------------------------------------------
class RerankClient:
    """Blocking client. Use as a context manager, or call ``close()``."""

    def __init__(self, target: str, *, api_key: str | None = None, timeout_s: float = 30.0, tls: bool = False,
                 root_certificates: bytes | None = None, compression: Compression | None = None,
                 retries: int = 3, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = (), pacing: Pacing | None = None) -> None:
        spec = _channel_spec(target, api_key=api_key, tls=tls, root_certificates=root_certificates,
                             compression=compression, retries=retries, max_message_bytes=max_message_bytes,
                             options=options)
        self.timeout_s = timeout_s
        self._metadata = spec.metadata
        self._pacer = Pacer(pacing) if pacing is not None else None
        self._channel = (grpc.secure_channel(target, spec.credentials, spec.options, spec.compression)
                         if spec.credentials else grpc.insecure_channel(target, spec.options, spec.compression))
        self._stub = pb_grpc.RerankServiceStub(self._channel)

    def rerank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
               top_n: int | None = None, return_documents: bool = False, truncate: bool = True,
               model: str | None = None, request_id: str | None = None, max_tokens_per_doc: int | None = None,
               priority: int | None = None, timeout_s: float | None = None,
               on_behalf_of: str | None = None, idempotent: bool = True,
               max_chunks_per_doc: int | None = None) -> RerankResult:
        """Score ``documents`` against ``query``; best first, cut to ``top_n``. ``priority``: 0 (first) to 999;
        None: the key's default. ``max_chunks_per_doc``: a document longer than the model's
        max_length is scored as up to this many chunks, its best chunk's score (each result's
        ``chunks`` and ``best_chunk`` say how); None: the server's default. ``on_behalf_of``: for a
        front calling a server without keys, the caller it serves (the server shares its model
        fairly between them). ``idempotent=False`` with no ``request_id``: send none, so the server
        neither hashes nor remembers the call (nor replays a retry of it)."""
        request = _build(_rerank_request, query, documents, instruction=instruction, top_n=top_n,
                         return_documents=return_documents, truncate=truncate, model=model,
                         request_id=request_id, max_tokens_per_doc=max_tokens_per_doc, priority=priority,
                         idempotent=idempotent, max_chunks_per_doc=max_chunks_per_doc)
        return _result(self._invoke(self._stub.Rerank, request, timeout_s, len(documents), on_behalf_of))

    def rerank_batch(self, queries: Sequence[Query], *, model: str | None = None, request_id: str | None = None,
                     timeout_s: float | None = None) -> list[RerankResult]:
        """Many queries in one round trip; one result per query, in order."""
        return _batch_results(self._invoke(self._stub.RerankBatch, _build(_batch_request, queries, model, request_id),
                                           timeout_s, _documents(queries)))

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return _model_info(self._invoke(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s))

    def _invoke(self, method: Any, request: Any, timeout_s: float | None, documents: int | None = None,
                on_behalf_of: str | None = None) -> Any:
        timeout = timeout_s or self.timeout_s
        metadata = _with_tenant(self._metadata, on_behalf_of)

        def send(seconds_left: float) -> Any:  # the same request, request_id included, on every attempt
            try:
                return method(request, timeout=seconds_left, metadata=metadata)
            except grpc.RpcError as exc:
                raise RerankError.from_rpc_error(exc) from None

        if documents is None:  # model_info: nothing to pace
            return send(timeout)
        return paced_sync(self._pacer, documents, send, retry_hint, timeout, _expired)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRerankClient:
    """asyncio client, the same calls as ``RerankClient`` awaited. Use ``async with``."""

    def __init__(self, target: str, *, api_key: str | None = None, timeout_s: float = 30.0, tls: bool = False,
                 root_certificates: bytes | None = None, compression: Compression | None = None,
                 retries: int = 3, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = (), pacing: Pacing | None = None) -> None:
        spec = _channel_spec(target, api_key=api_key, tls=tls, root_certificates=root_certificates,
                             compression=compression, retries=retries, max_message_bytes=max_message_bytes,
                             options=options)
        self.timeout_s = timeout_s
        self._metadata = spec.metadata
        self._pacer = Pacer(pacing) if pacing is not None else None
        self._channel = (grpc.aio.secure_channel(target, spec.credentials, spec.options, spec.compression)
                         if spec.credentials else grpc.aio.insecure_channel(target, spec.options, spec.compression))
        self._stub = pb_grpc.RerankServiceStub(self._channel)

    async def rerank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
                     top_n: int | None = None, return_documents: bool = False, truncate: bool = True,
                     model: str | None = None, request_id: str | None = None,
                     max_tokens_per_doc: int | None = None, priority: int | None = None,
                     timeout_s: float | None = None, on_behalf_of: str | None = None,
                     idempotent: bool = True, max_chunks_per_doc: int | None = None,
                     metadata: Sequence[tuple[str, str]] = ()) -> RerankResult:
        """``metadata``: more to send with this call, e.g. a W3C ``traceparent``."""
        request = _build(_rerank_request, query, documents, instruction=instruction, top_n=top_n,
                         return_documents=return_documents, truncate=truncate, model=model,
                         request_id=request_id, max_tokens_per_doc=max_tokens_per_doc, priority=priority,
                         idempotent=idempotent, max_chunks_per_doc=max_chunks_per_doc)
        return await self.rerank_message(request, timeout_s=timeout_s, on_behalf_of=on_behalf_of, metadata=metadata)

    async def rerank_message(self, request: pb.RerankRequest, *, timeout_s: float | None = None,
                             on_behalf_of: str | None = None,
                             metadata: Sequence[tuple[str, str]] = ()) -> RerankResult:
        """``rerank`` of a ``RerankRequest`` built already, as sent: for a front that translates its
        own calls (``rerank gateway``); no request id is added."""
        return _result(await self._invoke(self._stub.Rerank, request, timeout_s, len(request.documents),
                                          on_behalf_of, metadata))

    async def rerank_batch(self, queries: Sequence[Query], *, model: str | None = None,
                           request_id: str | None = None, timeout_s: float | None = None) -> list[RerankResult]:
        return _batch_results(await self._invoke(self._stub.RerankBatch,
                                                 _build(_batch_request, queries, model, request_id), timeout_s,
                                                 _documents(queries)))

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return _model_info(await self._invoke(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s))

    async def _invoke(self, method: Any, request: Any, timeout_s: float | None, documents: int | None = None,
                      on_behalf_of: str | None = None, extra: Sequence[tuple[str, str]] = ()) -> Any:
        timeout = timeout_s or self.timeout_s
        metadata = (*_with_tenant(self._metadata, on_behalf_of), *extra)

        async def send(seconds_left: float) -> Any:  # the same request, request_id included, on every attempt
            try:
                return await method(request, timeout=seconds_left, metadata=metadata)
            except grpc.RpcError as exc:
                raise RerankError.from_rpc_error(exc) from None

        if documents is None:  # model_info: nothing to pace
            return await send(timeout)
        return await paced(self._pacer, documents, send, retry_hint, timeout, _expired)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
