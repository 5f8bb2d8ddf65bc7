"""What the core calls out to, and the values that cross: the ``Engine`` that scores (the
worker in process, or backends over gRPC), and billing's ``Authenticator``, ``RateLimiter`` and
``UsageLedger`` (``service/billing/``), each replaceable in tests; ``OpenAccess`` and
``NoRateLimit`` are the switched-off ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Protocol

from service.calls import RerankQuery, RerankReply
from worker.types import Device, DType, ScoreResult


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
