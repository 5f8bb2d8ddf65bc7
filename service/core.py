"""The one core behind both fronts: auth, limits, rate limits, scoring, ranking, billing.

The gRPC servicer and the HTTP front translate their wire formats into a ``RerankCall``
and back, and map ``ServiceError`` with ``service.errors``; everything in between happens
here, once. The order of a call is fixed and is what makes billing exact:

1. authenticate the key (``Authenticator``);
2. validate against ``Limits`` (documented in docs/HTTP_API.md and docs/GRPC.md), and resolve the call's
   scheduling priority (``effective_priority``: the key's policy);
3. single flight (``service.flight``), then replay: a call whose idempotency key is in
   flight in this process waits for that call and shares its reply (or error), free,
   instead of computing it again; one whose key was already billed (by any replica)
   returns the stored reply, free; the same key with a different body is
   ``IDEMPOTENCY_CONFLICT``;
4. rate-limit (``RateLimiter``): over the limit is an immediate ``RATE_LIMITED``; a replay
   counts as a request (no documents), so replays cannot outpace the key's rps;
5. reserve the call's documents against the key's quota (``UsageLedger.reserve``): over it
   is ``QUOTA_EXCEEDED``, counting the documents of calls still in flight;
6. score every query through the ``Engine`` (the in-process batcher, or a remote server);
7. bill: one usage record per successful call, written with its idempotency key in one
   transaction that also settles the reservation (``UsageLedger.record``); if that write
   fails the call fails, unbilled.

A call that fails, is rejected or is cancelled before step 7 completes is never billed, and
its reservation is released.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from typing import Protocol

from service import tracing
from service.errors import Code, ServiceError
from service.flight import SingleFlight
from worker.types import Device, DType, ScoreResult
from worker.types import Truncation as Truncation  # the core's word too: the fronts take it from here

log = logging.getLogger(__name__)


MAX_CHUNKS_PER_DOC = 1000  # what --max-chunks-per-doc may be set to, at most


@dataclass(frozen=True, slots=True)
class Limits:
    """What one call may carry; over any of these is INVALID_ARGUMENT (or 413 for bytes)."""

    max_documents: int = 1000  # per call, summed over its queries
    max_queries: int = 64  # queries in one batch call
    max_query_chars: int = 32_768
    max_instruction_chars: int = 8_192
    max_document_chars: int = 262_144  # longer documents are refused before tokenizing
    max_request_bytes: int = 16 * 2**20  # HTTP body and gRPC message size
    # chunks a document over max_length is scored as (its best chunk's score): what a call that
    # names no max_chunks_per_doc gets, and the most one may ask for (more is clamped, with a
    # warning); Cohere's default. 1: no chunking, a long document is cut (or refused)
    max_chunks_per_doc: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.max_chunks_per_doc <= MAX_CHUNKS_PER_DOC:
            raise ValueError(f"max_chunks_per_doc must be 1-{MAX_CHUNKS_PER_DOC}, not {self.max_chunks_per_doc}")


# Scheduling priority (Cohere v2's ``priority``): lower runs first; see worker/queue.py.
MIN_PRIORITY, MAX_PRIORITY = 0, 999
DEFAULT_PRIORITY = 0  # what a call that names none gets, unless its key says otherwise
PRIORITY_RULE = f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY} (lower runs first)"

# Request ids and idempotency keys: visible ASCII only, so they are safe as they travel
# through headers, log lines and every database's text columns.
MAX_ID_CHARS = 255
MAX_DOCUMENT_TOKENS = 2**31 - 1  # max_tokens_per_doc is an int32 on the wire
ID_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_CHARS}}}")


@dataclass(frozen=True, slots=True)
class RerankQuery:
    """One query as a front sends it. The engine is handed it with the call's tenant and
    priority (``Engine.score``); ``top_n`` and ``return_documents`` are the reply's alone."""

    query: str
    documents: Sequence[str]
    instruction: str | None = None  # None: the model's default instruction
    truncation: Truncation = Truncation.END
    max_document_tokens: int | None = None  # Cohere's max_tokens_per_doc; None: no cut
    max_chunks_per_doc: int | None = None  # Cohere v1's; None: the server's (``Limits``)
    top_n: int | None = None  # None or 0: all
    return_documents: bool = False


@dataclass(frozen=True, slots=True)
class RerankCall:
    queries: Sequence[RerankQuery]
    api_key: str | None = None  # the bearer token as sent, if any
    model: str | None = None  # None or "": the served model
    request_id: str | None = None
    idempotency_key: str | None = None
    priority: int | None = None  # MIN_PRIORITY..MAX_PRIORITY; None: the key's default
    # the caller a trusted front (``rerank gateway``) calls for: the scheduler's tenant, but
    # only where this server has no keys (``--no-auth``); a keyed caller is its own tenant
    on_behalf_of: str | None = None

    def fingerprint(self) -> str:
        """Hash of what the caller asked for, to tell a retry from a different call (the
        priority is how to schedule it, not what it is, so a retry may change it)."""
        body = [self.model or "", [(q.query, list(q.documents), q.instruction, q.top_n,
                                    q.return_documents, q.truncation.value)
                                   + (() if q.max_document_tokens is None else (q.max_document_tokens,))
                                   + (() if q.max_chunks_per_doc is None else ("chunks", q.max_chunks_per_doc))
                                   for q in self.queries]]
        return hashlib.sha256(json.dumps(body, ensure_ascii=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RankedDoc:
    index: int
    score: float
    logit: float
    truncated: bool
    document: str | None = None
    chunks: int = 1  # pairs the document was scored as (its score is the best one's)
    best_chunk: int = 0  # which of them, 0-based


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    results: list[RankedDoc]  # best first, cut to top_n
    documents: int  # billed documents (all sent, not only the top_n returned)
    prompt_tokens: int
    computed_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """A call's server-side milliseconds (HTTP ``timings_ms``, gRPC ``Timing``)."""

    total: float = 0.0
    engine: float = 0.0  # the slowest query's queue + model time: the rest of total is overhead


@dataclass(frozen=True, slots=True)
class RerankReply:
    request_id: str
    model: str
    outcomes: list[QueryOutcome]
    timings_ms: Timings = field(default_factory=Timings)
    replayed: bool = False  # served from the idempotency record, not billed again
    warnings: list[str] = field(default_factory=list)  # what was changed rather than refused

    @property
    def billed_documents(self) -> int:
        return sum(o.documents for o in self.outcomes)

    @property
    def prompt_tokens(self) -> int:
        return sum(o.prompt_tokens for o in self.outcomes)

    @property
    def computed_tokens(self) -> int:
        return sum(o.computed_tokens for o in self.outcomes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def with_documents(self, queries: Sequence[RerankQuery] | None) -> RerankReply:
        """This reply with each result's document text taken from ``queries`` (by index, where
        the query set ``return_documents``), or with no text at all (``queries`` None): the
        idempotency record stores none, and a replay, whose body has the same fingerprint,
        gets it back from the replaying call."""
        def text(q: RerankQuery | None, index: int) -> str | None:
            return q.documents[index] if q is not None and q.return_documents else None

        qs: Sequence[RerankQuery | None] = [None] * len(self.outcomes) if queries is None else queries
        outcomes = [replace(o, results=[replace(r, document=text(q, r.index))
                                                    for r in o.results])
                    for q, o in zip(qs, self.outcomes, strict=True)]
        return replace(self, outcomes=outcomes)

    @classmethod
    def from_json(cls, text: str) -> RerankReply:
        raw = json.loads(text)
        outcomes = [QueryOutcome([RankedDoc(**r) for r in o.pop("results")], **o) for o in raw.pop("outcomes")]
        return cls(outcomes=outcomes, timings_ms=Timings(**raw.pop("timings_ms", {})), **raw)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling; ``key_id`` is what usage is billed to."""

    key_id: str
    name: str
    rate_limit_rps: float | None = None  # requests per second, None: unlimited
    rate_limit_dps: float | None = None  # documents per second
    quota_documents: int | None = None  # lifetime document quota
    models: frozenset[str] | None = None  # the served models this key may call, None: any
    rate_limit_tpm: float | None = None  # prompt tokens per minute
    default_priority: int | None = None  # a call that names no priority runs at this (None: DEFAULT_PRIORITY)
    best_priority: int | None = None  # the best (lowest) priority it may ask for; None: any


ANONYMOUS = Principal(key_id="anonymous", name="anonymous")


@dataclass(frozen=True, slots=True)
class Reservation:
    """Documents held against a key's quota for one call in flight (``UsageLedger.reserve``)."""

    id: str
    key_id: str
    documents: int


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    documents: int = 0  # the billed quantity
    prompt_tokens: int = 0
    computed_tokens: int = 0

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(self.requests + other.requests, self.documents + other.documents,
                           self.prompt_tokens + other.prompt_tokens,
                           self.computed_tokens + other.computed_tokens)


@dataclass(frozen=True, slots=True)
class UsageReport:
    key_id: str
    days: list[tuple[str, UsageTotals]]  # (UTC date, totals), oldest first
    total: UsageTotals


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    max_length: int  # tokens in one (query, document) prompt
    dtype: DType
    device: Device


# -- seams ------------------------------------------------------------------------------
class Engine(Protocol):
    """Scores one query's documents for a tenant at a priority; raises ServiceError."""

    async def score(self, query: RerankQuery, tenant: str, priority: int) -> ScoreResult: ...
    def info(self) -> ModelInfo: ...
    def estimate_tokens(self, queries: Sequence[RerankQuery]) -> int:
        """An upper bound of the queries' prompt tokens, before anything is tokenized."""


class Authenticator(Protocol):
    async def authenticate(self, api_key: str | None) -> Principal: ...  # raises ServiceError


class RateLimiter(Protocol):
    async def admit(self, principal: Principal, documents: int, tokens: int = 0) -> None:
        """Take a request, its documents and an upper bound of its prompt tokens; RATE_LIMITED."""

    def refund(self, principal: Principal, tokens: int) -> None:
        """Give back the prompt tokens ``admit`` took beyond the call's real count."""


class UsageLedger(Protocol):
    async def replay(self, principal: Principal, idempotency_key: str, fingerprint: str) -> RerankReply | None:
        """The stored reply of an already billed call, without document text (the ledger keeps
        none: ``RerankReply.with_documents``); IDEMPOTENCY_CONFLICT if the body differs."""

    async def reserve(self, principal: Principal, documents: int) -> Reservation | None:
        """Hold ``documents`` against the key's quota (None: the key has none); raises QUOTA_EXCEEDED."""

    async def release(self, reservation: Reservation) -> None:
        """Give back the reservation of a call that will not be billed."""

    async def record(self, principal: Principal, reply: RerankReply, idempotency_key: str | None,
                     fingerprint: str, reservation: Reservation | None = None) -> RerankReply:
        """Bill ``reply`` once and settle its reservation. On a lost race for the same
        idempotency key, the winner's reply (the reservation released)."""

    async def usage(self, key_id: str, since: date | None = None, until: date | None = None) -> UsageReport:
        """What ``key_id`` was billed, by UTC day, ``since`` and ``until`` inclusive."""

    async def close(self) -> None:
        """Let go of the database and any background work; the server's last step."""


class OpenAccess:
    """Auth switched off (trusted networks only): every caller is ``ANONYMOUS``."""

    async def authenticate(self, api_key: str | None) -> Principal:
        return ANONYMOUS


class NoRateLimit:
    async def admit(self, principal: Principal, documents: int, tokens: int = 0) -> None:
        return None

    def refund(self, principal: Principal, tokens: int) -> None:
        return None


class RerankCore:
    def __init__(self, engine: Engine, *, model_name: str, limits: Limits | None = None,
                 auth: Authenticator | None = None, limiter: RateLimiter | None = None,
                 ledger: UsageLedger | None = None, model_aliases: Sequence[str] = ()) -> None:
        self.engine = engine
        self.model_name = model_name
        self.accepted_models = {model_name, *model_aliases}
        self.limits = limits or Limits()
        self.auth = auth or OpenAccess()
        self.limiter = limiter or NoRateLimit()
        self.ledger = ledger
        self._flights = SingleFlight[RerankReply]()  # keyed by (key id, idempotency key)

    def model_info(self) -> ModelInfo:
        """The engine's model, under the name callers send."""
        return replace(self.engine.info(), model=self.model_name)

    async def rerank(self, call: RerankCall, *, auth: Authenticator | None = None) -> RerankReply:
        """``auth``: the front's own authenticator in place of the core's, for this call (the
        HTTP front's answers from the key check its edge made before reading the body); the
        core itself is shared by both fronts and never changed."""
        started = time.perf_counter()
        call_span = tracing.current()  # the front's span of this call (None: tracing is off)
        with tracing.span("rerank.auth"):
            principal = await self._authorize(call, auth or self.auth)
        if call_span is not None:  # who calls and how (the key's id, never the key)
            tracing.describe(call_span, key_id=principal.key_id, queries=len(call.queries),
                             priority=effective_priority(principal, call.priority)[0],
                             documents=sum(len(q.documents) for q in call.queries))
        reply = await self._replay_or_admit(principal, call, started)
        if call_span is not None:
            tracing.describe(call_span, request_id=reply.request_id, replayed=reply.replayed,
                             billed_documents=reply.billed_documents, prompt_tokens=reply.prompt_tokens,
                             computed_tokens=reply.computed_tokens)
        return reply

    async def _authorize(self, call: RerankCall, auth: Authenticator) -> Principal:
        """The caller, once the call is valid and its key may call this model."""
        principal = await auth.authenticate(call.api_key)
        self.validate(call)
        if principal.models is not None and self.model_name not in principal.models:
            # one key table may serve several deployments (a shared PostgreSQL ledger)
            raise ServiceError(Code.PERMISSION_DENIED, f"API key {principal.key_id} may not call "
                                                       f"{self.model_name!r}")
        return principal

    async def _replay_or_admit(self, principal: Principal, call: RerankCall, started: float) -> RerankReply:
        idempotency_key = call.idempotency_key
        # the fingerprint hashes every document: only a keyed call is ever compared with one
        fingerprint = call.fingerprint() if idempotency_key else ""
        if not idempotency_key:
            return await self._admit_score_bill(principal, call, fingerprint, started)
        reply, shared = await self._flights.run(
            (principal.key_id, idempotency_key), fingerprint,
            lambda: self._replay_or_run(principal, call, idempotency_key, fingerprint, started))
        if not shared:
            return reply
        await self.limiter.admit(principal, 0)  # a shared reply is a replay: free, but a request
        return replace(reply, replayed=True)

    async def _replay_or_run(self, principal: Principal, call: RerankCall, idempotency_key: str,
                             fingerprint: str, started: float) -> RerankReply:
        if self.ledger is not None:
            with tracing.span("rerank.replay"):
                stored = await self.ledger.replay(principal, idempotency_key, fingerprint)
            if stored is not None:
                # free of charge, not of the request rate: a replay costs a lookup and a reply
                await self.limiter.admit(principal, 0)
                return stored.with_documents(call.queries)
        # (a lost race for the key returns the winner's stored reply, which holds no text)
        reply = await self._admit_score_bill(principal, call, fingerprint, started)
        return reply.with_documents(call.queries)

    async def _admit_score_bill(self, principal: Principal, call: RerankCall, fingerprint: str,
                                started: float) -> RerankReply:
        call, chunk_notes = self._chunked(call)
        documents = sum(len(q.documents) for q in call.queries)
        tokens = self.engine.estimate_tokens(call.queries)
        with tracing.span("rerank.admission"):
            await self.limiter.admit(principal, documents, tokens)
            reservation = None if self.ledger is None else await self.ledger.reserve(principal, documents)
        if self.ledger is None:
            return await self._score_call(principal, call, tokens, started, chunk_notes)
        try:
            reply = await self._score_call(principal, call, tokens, started, chunk_notes)
            with tracing.span("rerank.bill"):
                return await self.ledger.record(principal, reply, call.idempotency_key, fingerprint, reservation)
        except BaseException:
            if reservation is not None:
                await self._release(reservation)
            raise

    def _chunked(self, call: RerankCall) -> tuple[RerankCall, list[str]]:
        """The call with every query's chunk cap settled: the server's where it names none, and
        clamped to it where it asks for more (with a warning), so the token estimate, the
        limiter and the engine all count the chunks that will run."""
        cap, notes = self.limits.max_chunks_per_doc, []
        asked = {q.max_chunks_per_doc for q in call.queries if q.max_chunks_per_doc is not None}
        if any(n > cap for n in asked):
            notes.append(f"max_chunks_per_doc {max(asked)} is more than this server scores; clamped to {cap}")
        queries = [replace(q, max_chunks_per_doc=min(cap, q.max_chunks_per_doc or cap)) for q in call.queries]
        return replace(call, queries=queries), notes

    async def _score_call(self, principal: Principal, call: RerankCall, estimated_tokens: int,
                          started: float, notes: Sequence[str] = ()) -> RerankReply:
        priority, warnings = effective_priority(principal, call.priority)
        warnings = [*warnings, *notes]
        results = await _score_all(self.engine, call.queries, _tenant(principal, call), priority)
        self.limiter.refund(principal, max(0, estimated_tokens - sum(r.prompt_tokens for r in results)))
        return RerankReply(
            request_id=call.request_id or uuid.uuid4().hex,
            model=self.model_name,
            outcomes=[_rank(q, r) for q, r in zip(call.queries, results)],
            timings_ms=Timings(total=round(1000 * (time.perf_counter() - started), 3),
                               engine=round(max(r.queue_and_model_ms for r in results), 3)),
            warnings=warnings,
        )

    async def _release(self, reservation: Reservation) -> None:
        """Release a failed call's reservation; a ledger that is down lets it expire instead,
        and the call's own error is the one its caller sees."""
        assert self.ledger is not None
        try:
            await self.ledger.release(reservation)
        except ServiceError:
            log.warning("a quota reservation of a failed call was not released; it expires by itself")

    async def usage(self, api_key: str | None, since: date | None = None, until: date | None = None, *,
                    auth: Authenticator | None = None) -> tuple[Principal, UsageReport]:
        """The caller's own billed usage; NOT_FOUND where no ledger is kept. ``auth``: as for
        ``rerank``."""
        principal = await (auth or self.auth).authenticate(api_key)
        if self.ledger is None:
            raise ServiceError(Code.NOT_FOUND, "this server keeps no usage ledger")
        return principal, await self.ledger.usage(principal.key_id, since, until)

    def validate(self, call: RerankCall) -> None:
        lim = self.limits
        if call.model and call.model not in self.accepted_models:
            raise ServiceError(Code.NOT_FOUND, f"model {call.model!r} is not served here; "
                                               f"this server serves {self.model_name!r}")
        for label, value in (("request id", call.request_id), ("idempotency key", call.idempotency_key)):
            if value is not None and not ID_PATTERN.fullmatch(value):
                raise _invalid(f"the {label} must be 1-{MAX_ID_CHARS} visible ASCII characters (no spaces)")
        if call.priority is not None and not MIN_PRIORITY <= call.priority <= MAX_PRIORITY:
            raise _invalid(f"{PRIORITY_RULE}, got {call.priority}")
        if not call.queries:
            raise ServiceError(Code.INVALID_ARGUMENT, "no queries: send at least one query")
        if len(call.queries) > lim.max_queries:
            raise _invalid(f"{len(call.queries)} queries in one call; the limit is {lim.max_queries}")
        total = sum(len(q.documents) for q in call.queries)
        if total > lim.max_documents:
            raise _invalid(f"{total} documents in one call; the limit is {lim.max_documents}: "
                           "split the call")
        for n, q in enumerate(call.queries):
            _check_query(q, lim, f"queries[{n}]." if len(call.queries) > 1 else "")


def _check_query(q: RerankQuery, lim: Limits, where: str) -> None:
    if not q.query.strip():
        raise _invalid(f"{where}query is empty")
    if len(q.query) > lim.max_query_chars:
        raise _invalid(f"{where}query has {len(q.query)} characters; the limit is {lim.max_query_chars}")
    if q.instruction is not None and len(q.instruction) > lim.max_instruction_chars:
        raise _invalid(f"{where}instruction has {len(q.instruction)} characters; "
                       f"the limit is {lim.max_instruction_chars}")
    if not q.documents:
        raise _invalid(f"{where}documents is empty: send at least one document")
    if q.top_n is not None and q.top_n < 0:
        raise _invalid(f"{where}top_n must be positive (or 0/absent for all), got {q.top_n}")
    if q.max_document_tokens is not None and not 1 <= q.max_document_tokens <= MAX_DOCUMENT_TOKENS:
        raise _invalid(f"{where}max_tokens_per_doc must be 1-{MAX_DOCUMENT_TOKENS} (or absent for no cut), "
                       f"got {q.max_document_tokens}")
    if q.max_chunks_per_doc is not None and q.max_chunks_per_doc < 1:
        raise _invalid(f"{where}max_chunks_per_doc must be at least 1 (1: no chunking; absent: the server's "
                       f"default; more than the server's limit is clamped to it), got {q.max_chunks_per_doc}")
    for i, doc in enumerate(q.documents):
        if len(doc) > lim.max_document_chars:
            raise _invalid(f"{where}documents[{i}] has {len(doc)} characters; the limit is "
                           f"{lim.max_document_chars}")
    for text in (q.query, q.instruction or "", *q.documents):
        _check_text(text, where)


def _check_text(text: str, where: str) -> None:
    # Lone surrogates cannot be encoded as UTF-8, so no tokenizer or wire format takes them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(f"{where}text is not valid Unicode (lone surrogate at {exc.start})") from None


def _invalid(message: str) -> ServiceError:
    return ServiceError(Code.INVALID_ARGUMENT, message)


async def _score_all(engine: Engine, queries: Sequence[RerankQuery], tenant: str,
                     priority: int) -> list[ScoreResult]:
    """Every query's scores; when one query fails, the others are cancelled, not left running."""
    several = len(queries) > 1
    tasks = [asyncio.ensure_future(_score(engine, q, tenant, priority, f"queries[{n}]: " if several else ""))
             for n, q in enumerate(queries)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def effective_priority(principal: Principal, requested: int | None) -> tuple[int, list[str]]:
    """The priority a call runs at, from who calls and what it asked for (already in range),
    and the warnings to return when that differs from the request. The one place for a key's
    policy: a call that names no priority gets the key's default, one that asks for better
    than the key's best gets the best, and is told. Without keys (``--no-auth``,
    ``ANONYMOUS``, who has neither) the request's value is used."""
    best = MIN_PRIORITY if principal.best_priority is None else principal.best_priority
    if requested is None:  # nothing asked, so nothing to warn about: a default is never better than best
        default = DEFAULT_PRIORITY if principal.default_priority is None else principal.default_priority
        return max(default, best), []
    if requested < best:
        return best, [f"priority {requested} is better than this key allows; clamped to {best}"]
    return requested, []


def _tenant(principal: Principal, call: RerankCall) -> str:
    """Whose share of the model a call spends: its key; without keys, the caller a trusted
    front names (``on_behalf_of``), so the keys behind ``rerank gateway`` are still shared
    fairly here."""
    if principal.key_id == ANONYMOUS.key_id and call.on_behalf_of:
        return call.on_behalf_of
    return principal.key_id


async def _score(engine: Engine, query: RerankQuery, tenant: str, priority: int, where: str) -> ScoreResult:
    """One query's scores; an invalid input names the query, as ``validate``'s errors do."""
    try:
        with tracing.span("rerank.score") as span:
            if span is not None:
                tracing.describe_query(span, query.query, query.instruction, query.documents)
            return await engine.score(query, tenant, priority)
    except ServiceError as exc:
        if where and exc.code is Code.INVALID_ARGUMENT:
            raise ServiceError(exc.code, f"{where}{exc.message}", exc.retry_after_s) from exc
        raise


def _rank(q: RerankQuery, result: ScoreResult) -> QueryOutcome:
    ranked = sorted(result.scores, key=lambda s: (-s.logit, s.index))
    if q.top_n:
        ranked = ranked[: q.top_n]
    docs = [RankedDoc(s.index, s.score, s.logit, s.truncated,
                      q.documents[s.index] if q.return_documents else None, s.chunks, s.best_chunk) for s in ranked]
    return QueryOutcome(docs, len(result.scores), result.prompt_tokens, result.computed_tokens)
