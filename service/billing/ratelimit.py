"""Per-key admission: token buckets for requests and documents per second and prompt tokens
per minute.

``admit`` never waits. It takes the call's tokens now or raises ``RATE_LIMITED`` with the
exact wait as ``retry_after_s`` (the HTTP ``Retry-After``). asyncio-throttle's ``Throttler``
queues callers until a slot frees, which is the wrong answer for a billed API under abuse:
an unbounded wait holding a connection. Hence a token bucket.

Buckets hold one period of rate: a second for rps and dps, a minute for tpm (at least one
token). A call costing more than a full bucket (500 documents against 100 dps) is admitted
from a full bucket and leaves it in debt, so a key's average stays at its limit without
large calls being refused forever.

Prompt tokens are not known before the worker tokenizes, so ``admit`` takes an upper bound
(``service.local.estimate_prompt_tokens``: the prompt's UTF-8 bytes, which no token of a
byte-level BPE is shorter than, capped at the model's ``max_length``), and ``refund`` gives
back the difference once the call's real prompt tokens are known. A key's tpm is thus spent
on the tokens it was billed for; only admission is conservative. A call that fails keeps
its estimate spent: the queue and the tokenizer did that work.

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

from service.billing.tally import throttled
from service.errors import Code, ServiceError
from service.seams import Principal


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    tokens: float
    stamp: float
    period_s: float = 1.0  # the bucket holds this long a span of rate

    @classmethod
    def full(cls, rate: float, now: float, period_s: float = 1.0) -> TokenBucket:
        return cls(rate, cls.capacity_for(rate, period_s), now, period_s)

    @staticmethod
    def capacity_for(rate: float, period_s: float = 1.0) -> float:
        return max(1.0, rate * period_s)  # never less than one call or document

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` can be taken; 0: now."""
        capacity = self.capacity_for(self.rate, self.period_s)
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        wait = (min(cost, capacity) - self.tokens) / self.rate
        return wait if wait > 1e-9 else 0.0  # float dust is not a reason to refuse

    def take(self, cost: float) -> None:
        self.tokens -= cost  # may go negative: the debt of a call larger than the bucket

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity_for(self.rate, self.period_s), self.tokens + amount)


# what each bucket counts (as its refusal says), and the span of its rate it holds, in seconds
_KINDS = (("requests per second", 1.0), ("documents per second", 1.0), ("prompt tokens per minute", 60.0))
_LIMIT_LABELS = ("rps", "dps", "tpm")  # the same limits, as /metrics names them

KeyLimits = tuple[float | None, float | None, float | None]  # rps, dps, tpm


class KeyRateLimiter:
    """A ``RateLimiter``: per-key rps/dps/tpm buckets (the key's limits, else the defaults)."""

    def __init__(self, *, default_rps: float | None = None, default_dps: float | None = None,
                 share: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.default_rps = default_rps
        self.default_dps = default_dps
        self.share = share
        self.clock = clock
        self._buckets: dict[str, tuple[KeyLimits, list[TokenBucket | None]]] = {}

    async def admit(self, principal: Principal, documents: int, tokens: int = 0) -> None:
        """Take one request, ``documents`` and ``tokens`` (an upper bound of the prompt tokens)."""
        limits = self._limits(principal)
        if limits == (None, None, None):
            return
        now = self.clock()  # no await from here on: check-and-take is atomic on the loop
        buckets = self._buckets_for(principal.key_id, limits, now)
        costs = (1.0, float(documents), float(tokens))
        waits = [b.wait_s(c, now) if b else 0.0 for b, c in zip(buckets, costs)]
        wait = max(waits)
        if wait > 0:
            what = _KINDS[waits.index(wait)][0]
            throttled[_LIMIT_LABELS[waits.index(wait)]] += 1
            raise ServiceError(Code.RATE_LIMITED, (
                f"API key {principal.key_id} is over its rate limit ({what}); "
                f"retry in {wait:.2f}s"), retry_after_s=wait)
        for bucket, cost in zip(buckets, costs):
            if bucket is not None:
                bucket.take(cost)

    def refund(self, principal: Principal, tokens: int) -> None:
        """Give back ``tokens`` taken by ``admit`` beyond what the call really used."""
        known = self._buckets.get(principal.key_id)
        if known is not None and known[0] == self._limits(principal) and known[1][2] is not None:
            known[1][2].give_back(tokens)

    def _limits(self, principal: Principal) -> KeyLimits:
        return (principal.rate_limit_rps or self.default_rps, principal.rate_limit_dps or self.default_dps,
                principal.rate_limit_tpm)

    def _buckets_for(self, key_id: str, limits: KeyLimits, now: float) -> list[TokenBucket | None]:
        known = self._buckets.get(key_id)
        if known is None or known[0] != limits:  # new key, or its limits changed
            buckets = [None if limit is None else TokenBucket.full(limit / period * self.share, now, period)
                       for limit, (_, period) in zip(limits, _KINDS)]
            known = (limits, buckets)
            self._buckets[key_id] = known
        return known[1]
