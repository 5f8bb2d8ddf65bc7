"""What ``service.metrics`` exports beside the fronts' counts: queue depth in documents and tokens
beside its limits, per-key throttling by limit, and ledger failures (read from
``service.billing.tally`` at scrape time)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving import schema_engine
from sqlalchemy.exc import OperationalError

from service.billing.db import unavailable
from service.billing.ledger import SqlLedger
from service.billing.ratelimit import KeyRateLimiter
from service.errors import Code, ServiceError
from service.metrics import BillingTally, Metrics
from service.seams import Principal


def test_queue_depth_and_limits_are_sampled_at_scrape_time() -> None:
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    assert (sample("rerank_queue_documents"), sample("rerank_queue_tokens")) == (0, 0)  # before the model loads
    depth = {"docs": 3, "tokens": 700}
    metrics.watch_queue(lambda: depth["docs"], lambda: depth["tokens"], 4096, 1_000_000)
    depth.update(docs=5, tokens=900)
    assert (sample("rerank_queue_documents"), sample("rerank_queue_tokens")) == (5, 900)
    assert (sample("rerank_queue_max_documents"), sample("rerank_queue_max_tokens")) == (4096, 1_000_000)


def test_every_throttle_series_exists_before_the_first_refusal() -> None:
    sample = Metrics().registry.get_sample_value
    for limit in BillingTally.LIMITS:
        assert sample("rerank_throttled_total", {"limit": limit}) is not None
    assert sample("rerank_ledger_errors_total") is not None


@pytest.mark.parametrize(("principal", "documents", "limit"), [
    (Principal("key_m1", "one", rate_limit_rps=1), 1, "rps"),
    (Principal("key_m2", "two", rate_limit_dps=3), 3, "dps"),
])
async def test_a_rate_limit_refusal_is_counted_under_its_limit(principal: Principal, documents: int,
                                                               limit: str) -> None:
    sample = Metrics().registry.get_sample_value
    before = {name: sample("rerank_throttled_total", {"limit": name}) for name in BillingTally.LIMITS}
    limiter = KeyRateLimiter(clock=lambda: 1000.0)
    await limiter.admit(principal, documents)  # a full bucket pays
    with pytest.raises(ServiceError) as refused:
        await limiter.admit(principal, documents)
    assert refused.value.code is Code.RATE_LIMITED
    after = {name: sample("rerank_throttled_total", {"limit": name}) for name in BillingTally.LIMITS}
    assert {name: after[name] - before[name] for name in after} == {n: float(n == limit) for n in after}


def test_a_ledger_failure_is_counted() -> None:
    sample = Metrics().registry.get_sample_value
    before = sample("rerank_ledger_errors_total")
    with pytest.raises(ServiceError) as refused, unavailable("testing"):
        raise OperationalError("SELECT 1", {}, Exception("database is down"))
    assert refused.value.code is Code.UNAVAILABLE
    assert sample("rerank_ledger_errors_total") == before + 1


async def test_a_quota_refusal_is_counted(tmp_path: Path) -> None:
    sample = Metrics().registry.get_sample_value
    before = sample("rerank_throttled_total", {"limit": "quota"})
    async with schema_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}") as engine:
        ledger = SqlLedger(engine)
        try:
            assert await ledger.reserve(Principal("key_q", "q", quota_documents=3), 2) is not None
            with pytest.raises(ServiceError) as refused:
                await ledger.reserve(Principal("key_q", "q", quota_documents=3), 2)
        finally:
            await ledger.close()
    assert refused.value.code is Code.QUOTA_EXCEEDED
    assert sample("rerank_throttled_total", {"limit": "quota"}) == before + 1
