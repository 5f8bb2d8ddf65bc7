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
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import date

from service import tracing
from service.calls import (
    DEFAULT_PRIORITY,
    ID_PATTERN,
    MAX_ID_CHARS,
    MAX_PRIORITY,
    MIN_PRIORITY,
    PRIORITY_RULE,
    Limits,
    QueryOutcome,
    RankedDoc,
    RerankCall,
    RerankQuery,
    RerankReply,
    Timings,
)
from service.errors import Code, ServiceError
from service.flight import SingleFlight
from service.seams import (
    ANONYMOUS,
    Authenticator,
    Engine,
    ModelInfo,
    NoRateLimit,
    OpenAccess,
    Principal,
    RateLimiter,
    Reservation,
    UsageLedger,
    UsageReport,
)
from worker.types import ScoreResult

log = logging.getLogger(__name__)


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
        asked = {q.options.max_chunks for q in call.queries if q.options.max_chunks is not None}
        if any(n > cap for n in asked):
            notes.append(f"max_chunks_per_doc {max(asked)} is more than this server scores; clamped to {cap}")
        queries = [replace(q, options=replace(q.options, max_chunks=min(cap, q.options.max_chunks or cap)))
                   for q in call.queries]
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
    if (problem := q.options.problem()) is not None:
        raise _invalid(f"{where}{problem}")
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
