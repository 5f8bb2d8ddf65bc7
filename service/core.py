"""The one core behind both fronts: auth, limits, rate limits, scoring, ranking, billing.

The gRPC servicer and the HTTP gateway translate their wire formats into a ``RerankCall``
and back, and map ``ServiceError`` with ``service.errors``; everything in between happens
here, once. The order of a call is fixed and is what makes billing exact:

1. authenticate the key (``Authenticator``);
2. validate against ``Limits`` (documented in docs/HTTP_API.md and docs/GRPC.md);
3. replay: a call whose idempotency key was already billed returns the stored reply,
   free; the same key with a different body is ``IDEMPOTENCY_CONFLICT``;
4. rate-limit (``RateLimiter``): over the limit is an immediate ``RATE_LIMITED``;
5. score every query through the ``Engine`` (the in-process batcher, or a remote server);
6. bill: one usage record per successful call, written with its idempotency key in one
   transaction (``UsageLedger.record``); if that write fails the call fails, unbilled.

A call that fails, is rejected or is cancelled before step 6 completes is never billed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from typing import Protocol

from service.errors import Code, ServiceError
from worker.types import Device, DType, ScoreRequest, ScoreResult, Truncation


@dataclass(frozen=True, slots=True)
class Limits:
    """What one call may carry; over any of these is INVALID_ARGUMENT (or 413 for bytes)."""

    max_documents: int = 1000  # per call, summed over its queries
    max_queries: int = 64  # queries in one batch call
    max_query_chars: int = 32_768
    max_instruction_chars: int = 8_192
    max_document_chars: int = 262_144  # longer documents are refused before tokenizing
    max_request_bytes: int = 16 * 2**20  # HTTP body and gRPC message size


# Request ids and idempotency keys: visible ASCII only, so they are safe as they travel
# through headers, log lines and every database's text columns.
MAX_ID_CHARS = 255
ID_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_CHARS}}}")


@dataclass(frozen=True, slots=True)
class RerankQuery:
    query: str
    documents: Sequence[str]
    instruction: str | None = None
    top_n: int | None = None  # None or 0: all
    return_documents: bool = False
    truncation: Truncation = Truncation.END


@dataclass(frozen=True, slots=True)
class RerankCall:
    queries: Sequence[RerankQuery]
    api_key: str | None = None  # the bearer token as sent, if any
    model: str | None = None  # None or "": the served model
    request_id: str | None = None
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """Hash of what the caller asked for, to tell a retry from a different call."""
        body = [self.model or "", [(q.query, list(q.documents), q.instruction, q.top_n,
                                    q.return_documents, q.truncation.value) for q in self.queries]]
        return hashlib.sha256(json.dumps(body, ensure_ascii=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RankedDoc:
    index: int
    score: float
    logit: float
    truncated: bool
    document: str | None = None


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    results: list[RankedDoc]  # best first, cut to top_n
    documents: int  # billed documents (all sent, not only the top_n returned)
    prompt_tokens: int
    computed_tokens: int


@dataclass(frozen=True, slots=True)
class RerankReply:
    request_id: str
    model: str
    outcomes: list[QueryOutcome]
    timings_ms: dict[str, float] = field(default_factory=dict)
    replayed: bool = False  # served from the idempotency record, not billed again

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

    @classmethod
    def from_json(cls, text: str) -> RerankReply:
        raw = json.loads(text)
        outcomes = [QueryOutcome([RankedDoc(**r) for r in o.pop("results")], **o) for o in raw.pop("outcomes")]
        return cls(outcomes=outcomes, **raw)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling; ``key_id`` is what usage is billed to."""

    key_id: str
    name: str
    rate_limit_rps: float | None = None  # requests per second, None: unlimited
    rate_limit_dps: float | None = None  # documents per second
    quota_documents: int | None = None  # lifetime document quota
    models: frozenset[str] | None = None  # the served models this key may call, None: any


ANONYMOUS = Principal(key_id="anonymous", name="anonymous")


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
    """Scores one query's documents; raises ServiceError."""

    async def score(self, request: ScoreRequest) -> ScoreResult: ...
    def info(self) -> ModelInfo: ...


class Authenticator(Protocol):
    async def authenticate(self, api_key: str | None) -> Principal: ...  # raises ServiceError


class RateLimiter(Protocol):
    async def admit(self, principal: Principal, documents: int) -> None: ...  # raises RATE_LIMITED


class UsageLedger(Protocol):
    async def replay(self, principal: Principal, idempotency_key: str, fingerprint: str) -> RerankReply | None:
        """The stored reply of an already billed call; IDEMPOTENCY_CONFLICT if the body differs."""

    async def record(self, principal: Principal, reply: RerankReply, idempotency_key: str | None,
                     fingerprint: str) -> RerankReply:
        """Bill ``reply`` once. On a lost race for the same idempotency key, the winner's reply."""

    async def usage(self, key_id: str, since: date | None = None, until: date | None = None) -> UsageReport:
        """What ``key_id`` was billed, by UTC day, ``since`` and ``until`` inclusive."""


class OpenAccess:
    """Auth switched off (trusted networks only): every caller is ``ANONYMOUS``."""

    async def authenticate(self, api_key: str | None) -> Principal:
        return ANONYMOUS


class NoRateLimit:
    async def admit(self, principal: Principal, documents: int) -> None:
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

    def model_info(self) -> ModelInfo:
        """The engine's model, under the name callers send."""
        return replace(self.engine.info(), model=self.model_name)

    async def rerank(self, call: RerankCall) -> RerankReply:
        started = time.perf_counter()
        principal = await self.auth.authenticate(call.api_key)
        self.validate(call)
        if principal.models is not None and self.model_name not in principal.models:
            # one key table may serve several deployments (a shared PostgreSQL ledger)
            raise ServiceError(Code.PERMISSION_DENIED, f"API key {principal.key_id} may not call "
                                                       f"{self.model_name!r}")
        # the fingerprint hashes every document: only a keyed call is ever compared with one
        fingerprint = call.fingerprint() if call.idempotency_key else ""
        if call.idempotency_key and self.ledger is not None:
            stored = await self.ledger.replay(principal, call.idempotency_key, fingerprint)
            if stored is not None:
                return stored
        documents = sum(len(q.documents) for q in call.queries)
        await self.limiter.admit(principal, documents)
        results = await _score_all(self.engine, call.queries)
        reply = RerankReply(
            request_id=call.request_id or uuid.uuid4().hex,
            model=self.model_name,
            outcomes=[_rank(q, r) for q, r in zip(call.queries, results)],
            timings_ms={"total": round(1000 * (time.perf_counter() - started), 3),
                        # the slowest query's queue + model time: the rest of total is overhead
                        "engine": round(max(r.timings_ms.get("queue_and_model", 0.0) for r in results), 3)},
        )
        if self.ledger is not None:
            reply = await self.ledger.record(principal, reply, call.idempotency_key, fingerprint)
        return reply

    async def usage(self, api_key: str | None, since: date | None = None,
                    until: date | None = None) -> tuple[Principal, UsageReport]:
        """The caller's own billed usage; NOT_FOUND where no ledger is kept."""
        principal = await self.auth.authenticate(api_key)
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


async def _score_all(engine: Engine, queries: Sequence[RerankQuery]) -> list[ScoreResult]:
    """Every query's scores; when one query fails, the others are cancelled, not left running."""
    tasks = [asyncio.ensure_future(engine.score(_to_request(q))) for q in queries]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _to_request(q: RerankQuery) -> ScoreRequest:
    return ScoreRequest(q.query, list(q.documents), q.instruction, q.truncation)


def _rank(q: RerankQuery, result: ScoreResult) -> QueryOutcome:
    ranked = sorted(result.scores, key=lambda s: (-s.logit, s.index))
    if q.top_n:
        ranked = ranked[: q.top_n]
    docs = [RankedDoc(s.index, s.score, s.logit, s.truncated,
                      q.documents[s.index] if q.return_documents else None) for s in ranked]
    return QueryOutcome(docs, len(result.scores), result.prompt_tokens, result.computed_tokens)
