"""Per-key admission: token buckets for requests and documents per second.

``admit`` never waits. It takes the call's tokens now or raises ``RATE_LIMITED`` with the
exact wait as ``retry_after_s`` (the HTTP ``Retry-After``). asyncio-throttle's ``Throttler``
queues callers until a slot frees, which is the wrong answer for a billed API under abuse:
an unbounded wait holding a connection. Hence a token bucket.

Buckets hold one second of rate (at least one token). A call costing more than a full
bucket (500 documents against 100 dps) is admitted from a full bucket and leaves it in
debt, so a key's average stays at its limit without large calls being refused forever.

Replicas: buckets live in each replica's memory, and each enforces ``share`` of every
limit (``--replicas N`` gives 1/N). Behind a load balancer that spreads calls evenly, the
sum is the key's limit, with no shared store on the hot path. Quotas are not here: they are
reserved in the shared ledger (``SqlLedger.reserve``), atomically, so they hold exactly
across replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from service.core import Principal
from service.errors import Code, ServiceError


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        return cls(rate, cls.capacity_for(rate), now)

    @staticmethod
    def capacity_for(rate: float) -> float:
        return max(1.0, rate)  # one second of rate, never less than one call or document

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` can be taken; 0: now."""
        capacity = self.capacity_for(self.rate)
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        wait = (min(cost, capacity) - self.tokens) / self.rate
        return wait if wait > 1e-9 else 0.0  # float dust is not a reason to refuse

    def take(self, cost: float) -> None:
        self.tokens -= cost  # may go negative: the debt of a call larger than the bucket


class KeyRateLimiter:
    """A ``RateLimiter``: per-key rps/dps buckets (key's limits, else the defaults)."""

    def __init__(self, *, default_rps: float | None = None,
                 default_dps: float | None = None, share: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.default_rps = default_rps
        self.default_dps = default_dps
        self.share = share
        self.clock = clock
        self._buckets: dict[str, tuple[tuple[float | None, float | None], list[TokenBucket | None]]] = {}

    async def admit(self, principal: Principal, documents: int) -> None:
        self._take(principal, documents)  # no await inside: check-and-take is atomic on the loop

    def _take(self, principal: Principal, documents: int) -> None:
        rps = principal.rate_limit_rps or self.default_rps
        dps = principal.rate_limit_dps or self.default_dps
        if rps is None and dps is None:
            return
        now = self.clock()
        buckets = self._buckets_for(principal.key_id, rps, dps, now)
        costs = (1.0, float(documents))
        waits = [b.wait_s(c, now) if b else 0.0 for b, c in zip(buckets, costs)]
        if max(waits) > 0:
            what = "requests" if waits[0] >= waits[1] else "documents"
            raise ServiceError(Code.RATE_LIMITED, (
                f"API key {principal.key_id} is over its rate limit ({what} per second); "
                f"retry in {max(waits):.2f}s"), retry_after_s=max(waits))
        for bucket, cost in zip(buckets, costs):
            if bucket is not None:
                bucket.take(cost)

    def _buckets_for(self, key_id: str, rps: float | None, dps: float | None,
                     now: float) -> list[TokenBucket | None]:
        limits = (rps, dps)
        known = self._buckets.get(key_id)
        if known is None or known[0] != limits:  # new key, or its limits changed
            buckets = [None if r is None else TokenBucket.full(r * self.share, now) for r in limits]
            known = (limits, buckets)
            self._buckets[key_id] = known
        return known[1]
