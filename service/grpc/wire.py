"""``rerank.v1`` messages to the core's values and back: pure functions, no I/O.

Only wire-format facts live here (empty string means absent, enum numbers, field shapes);
every rule about what a call may contain is the core's (``RerankCore.validate``), so the gRPC
and HTTP fronts cannot disagree on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from rerank.v1 import rerank_pb2 as pb

from service.calls import (
    ID_PATTERN,
    Limits,
    PromptOptions,
    QueryOutcome,
    RankedDoc,
    RerankCall,
    RerankQuery,
    RerankReply,
    Truncation,
)
from service.edge import bearer_token
from service.errors import Code, ServiceError
from service.seams import ModelInfo

# request metadata: the tenant a trusted front calls for (clients.client sends it)
ON_BEHALF_OF_KEY = "x-rerank-on-behalf-of"
Metadata = Sequence[tuple[str, str | bytes]] | None  # a call's invocation metadata

_TRUNCATION = {pb.TRUNCATION_UNSPECIFIED: Truncation.END, pb.TRUNCATION_END: Truncation.END,
               pb.TRUNCATION_NONE: Truncation.NONE}
_WIRE_TRUNCATION = {Truncation.END: pb.TRUNCATION_END, Truncation.NONE: pb.TRUNCATION_NONE}  # and back


def call_from_request(req: pb.RerankRequest, metadata: Metadata) -> RerankCall:
    return _call([_query(req)], req, metadata)


def call_from_batch(req: pb.RerankBatchRequest, metadata: Metadata) -> RerankCall:
    return _call([_query(q) for q in req.queries], req, metadata)


def request_to_score(q: RerankQuery, priority: int) -> pb.RerankRequest:
    """The other way: what the gateway's engine asks a backend (``service.remote`` says what it leaves out)."""
    o = q.options
    return pb.RerankRequest(query=q.query, documents=list(q.documents), instruction=q.instruction,
                            truncation=_WIRE_TRUNCATION[o.truncation], max_tokens_per_doc=o.max_document_tokens,
                            max_chunks_per_doc=o.max_chunks, priority=priority)


def response_from_reply(reply: RerankReply) -> pb.RerankResponse:
    if len(reply.outcomes) != 1:
        raise AssertionError(f"a Rerank call came back with {len(reply.outcomes)} outcomes: this is a bug")
    outcome = reply.outcomes[0]
    return pb.RerankResponse(request_id=reply.request_id, model=reply.model,
                             results=_ranked(outcome.results), usage=_usage([outcome]),
                             timing=_timing(reply), replayed=reply.replayed, warnings=reply.warnings)


def batch_response_from_reply(reply: RerankReply) -> pb.RerankBatchResponse:
    queries = [pb.QueryResults(results=_ranked(o.results), usage=_usage([o])) for o in reply.outcomes]
    return pb.RerankBatchResponse(request_id=reply.request_id, model=reply.model, queries=queries,
                                  usage=_usage(reply.outcomes), timing=_timing(reply),
                                  replayed=reply.replayed, warnings=reply.warnings)


def model_info_message(info: ModelInfo, lim: Limits) -> pb.ModelInfo:
    return pb.ModelInfo(model=info.model, max_length=info.max_length, dtype=info.dtype.value,
                        device=info.device.value, limits=pb.Limits(**asdict(lim)))


def bearer_key(metadata: Metadata) -> str | None:
    """The key of ``authorization: Bearer <key>``, by the rule HTTP applies too
    (``service.edge.bearer_token``): no header is None, anything but ``Bearer <key>`` is
    UNAUTHENTICATED, saying what was wrong."""
    for name, value in metadata or ():
        if name.lower() == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


def _call(queries: list[RerankQuery], req: pb.RerankRequest | pb.RerankBatchRequest, metadata: Metadata) -> RerankCall:
    # On gRPC the request id doubles as the idempotency key: a retried call carries the same id
    return RerankCall(queries, api_key=bearer_key(metadata), model=req.model or None,
                      request_id=req.request_id or None, idempotency_key=req.request_id or None,
                      on_behalf_of=on_behalf_of(metadata),
                      priority=req.priority if req.HasField("priority") else None)  # the core checks the range


def on_behalf_of(metadata: Metadata) -> str | None:
    """The tenant a trusted front names in ``x-rerank-on-behalf-of`` (honoured by the core only
    without keys); anything but 1-255 visible ASCII characters is ignored."""
    for key, value in metadata or ():
        if key == ON_BEHALF_OF_KEY and isinstance(value, str) and ID_PATTERN.fullmatch(value):
            return value
    return None


def _query(q: pb.RerankRequest | pb.BatchQuery) -> RerankQuery:
    """One query's fields, which a Rerank request and a batch's query spell alike."""
    if q.truncation not in _TRUNCATION:
        raise ServiceError(Code.INVALID_ARGUMENT, f"unknown truncation value {q.truncation}: use "
                                                  "TRUNCATION_END or TRUNCATION_NONE")
    # list(): a repeated field decodes a new str at every read, and the core reads each
    # document several times (validate, estimate, tokenize): decode them once, here
    options = PromptOptions(_TRUNCATION[q.truncation],
                            q.max_tokens_per_doc if q.HasField("max_tokens_per_doc") else None,
                            q.max_chunks_per_doc if q.HasField("max_chunks_per_doc") else None)
    return RerankQuery(query=q.query, documents=list(q.documents), options=options,
                       instruction=q.instruction if q.HasField("instruction") else None, top_n=q.top_n or None,
                       return_documents=q.return_documents)


def _ranked(results: Sequence[RankedDoc]) -> list[pb.RankedDocument]:
    return [pb.RankedDocument(index=r.index, score=r.score, logit=r.logit, truncated=r.truncated,
                              document=r.document, chunks=r.chunks, best_chunk=r.best_chunk) for r in results]


def _usage(outcomes: Sequence[QueryOutcome]) -> pb.Usage:
    return pb.Usage(documents=sum(o.documents for o in outcomes),
                    prompt_tokens=sum(o.prompt_tokens for o in outcomes),
                    computed_tokens=sum(o.computed_tokens for o in outcomes))


def _timing(reply: RerankReply) -> pb.Timing:
    return pb.Timing(total_ms=reply.timings_ms.total, engine_ms=reply.timings_ms.engine)
