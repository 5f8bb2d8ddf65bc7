"""Quotas that hold: reserved at admission, settled at billing, released on failure.

Every test runs on a fresh SQLite file and on a fresh PostgreSQL database (``db_url``). The
concurrent tests hold the model (``FakeRunner.gate``) so that every call is admitted or
refused while the admitted ones are still in flight: the case where reading the billed total
alone let 20 calls of 10 documents through a 100-document quota. "Two replicas" are two
complete stacks (engine pool, ledger, batcher, core) on one database, as two processes would
be: the only thing they share is the database.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from postgres_support import db_url, postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from serving import MODEL
from serving import LedgerStack as Replica
from sqlalchemy import insert, select

from service.billing.db import quota_reservations, usage_records
from service.billing.ledger import SqlLedger
from service.calls import RerankCall, RerankQuery
from service.errors import Code, ServiceError
from service.seams import Principal


@pytest.fixture
async def replicas(db_url: str) -> AsyncIterator[list[Replica]]:  # noqa: F811 - the imported fixture
    started = [await Replica.start(db_url, max_queued_docs=100_000) for _ in range(2)]
    yield started
    for replica in started:
        await replica.stop()


def call(key: str, docs: int, *, idem: str | None = None) -> RerankCall:
    return RerankCall([RerankQuery("q", [f"document {i}" for i in range(docs)])], api_key=key, idempotency_key=idem)


async def reservations(ledger: SqlLedger) -> list[int]:
    async with ledger.engine.connect() as conn:
        return [n for (n,) in await conn.execute(select(quota_reservations.c.documents))]


async def billed(ledger: SqlLedger, key_id: str) -> int:
    return sum(r.documents for r in await ledger.records(key_id))


async def flood(replicas: list[Replica], key: str, calls: int, docs: int) -> list[object]:
    """``calls`` simultaneous calls spread over the replicas, the model held until every call
    has been admitted or refused; the outcomes."""
    for r in replicas:
        r.runner.gate.clear()
    tasks = [asyncio.create_task(replicas[n % len(replicas)].core.rerank(call(key, docs))) for n in range(calls)]
    for _ in range(3000):  # until each call is refused or holds a reservation (at most 30 s)
        if sum(t.done() for t in tasks) + len(await reservations(replicas[0].ledger)) >= calls:
            break
        await asyncio.sleep(0.01)
    for r in replicas:
        r.runner.gate.set()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def refused(outcomes: list[object]) -> list[Code]:
    return [o.code for o in outcomes if isinstance(o, ServiceError)]


# -- arithmetic -----------------------------------------------------------------------------
@pytest.mark.parametrize(("billed_docs", "held_docs", "documents", "admitted"), [
    (0, 0, 100, True), (90, 0, 10, True), (90, 0, 11, False), (100, 0, 1, False),
    (50, 40, 10, True), (50, 40, 11, False), (0, 100, 1, False),
])
async def test_reserve_counts_billed_and_held_documents(replicas: list[Replica], billed_docs: int,
                                                        held_docs: int, documents: int, admitted: bool) -> None:
    ledger = replicas[0].ledger
    new = await replicas[0].keys.create("q", quota_documents=100)
    principal = new.record.principal()
    now = datetime.now(UTC)
    async with ledger.engine.begin() as conn:
        if billed_docs:
            await conn.execute(insert(usage_records).values(
                key_id=principal.key_id, request_id="r", model=MODEL, queries=1, documents=billed_docs,
                prompt_tokens=0, computed_tokens=0, created_at=now, day=now.date().isoformat()))
        if held_docs:
            await conn.execute(insert(quota_reservations).values(
                id="held", key_id=principal.key_id, documents=held_docs, expires_at=now + timedelta(minutes=5)))
    if admitted:
        assert await ledger.reserve(principal, documents) is not None
        return
    with pytest.raises(ServiceError) as err:
        await ledger.reserve(principal, documents)
    assert err.value.code is Code.QUOTA_EXCEEDED and err.value.retry_after_s is None  # waiting does not help


async def test_a_key_without_quota_reserves_nothing(replicas: list[Replica]) -> None:
    ledger = replicas[0].ledger
    assert await ledger.reserve(Principal("key_x", "x"), 1000) is None
    assert await reservations(ledger) == []


async def test_expired_reservations_of_a_crashed_replica_stop_counting(replicas: list[Replica]) -> None:
    ledger = replicas[0].ledger
    principal = (await replicas[0].keys.create("q", quota_documents=10)).record.principal()
    crashed = SqlLedger(ledger.engine, reservation_ttl=timedelta(milliseconds=1))
    await crashed.reserve(principal, 10)  # never settled nor released: its replica "died"
    await asyncio.sleep(0.01)
    assert await ledger.reserve(principal, 10) is not None  # the dead one expired: it does not count
    with pytest.raises(ServiceError):
        await ledger.reserve(principal, 1)  # the live one does
    assert await reservations(ledger) == [10]  # and the refusal deleted the dead one


# -- through the core -----------------------------------------------------------------------
async def test_settled_at_billing_released_on_failure(replicas: list[Replica]) -> None:
    r = replicas[0]
    new = await r.keys.create("q", quota_documents=10)
    await r.core.rerank(call(new.key, 4))
    assert await reservations(r.ledger) == []  # settled in the billing transaction
    r.runner.fail_next = True
    with pytest.raises(ServiceError):
        await r.core.rerank(call(new.key, 6))
    assert await reservations(r.ledger) == []  # released: the quota is not lost to failures
    r.runner.gate.clear()
    task = asyncio.create_task(r.core.rerank(call(new.key, 6)))
    await asyncio.to_thread(r.runner.entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await reservations(r.ledger) == []  # a caller who went away releases too
    r.runner.gate.set()
    await r.core.rerank(call(new.key, 6))  # all six remaining documents are still there
    assert await billed(r.ledger, new.record.key_id) == 10


async def test_lost_idempotency_race_releases_its_reservation(replicas: list[Replica]) -> None:
    r = replicas[0]
    new = await r.keys.create("q", quota_documents=10)
    principal = new.record.principal()
    first = await r.core.rerank(call(new.key, 5, idem="same"))
    reservation = await r.ledger.reserve(principal, 5)  # a duplicate on another replica, in flight
    again = await r.ledger.record(principal, first, "same", call(new.key, 5, idem="same").fingerprint(),
                                  reservation)
    assert again.request_id == first.request_id
    assert await reservations(r.ledger) == [] and await billed(r.ledger, principal.key_id) == 5


@pytest.mark.parametrize("n_replicas", [1, 2])
async def test_fifty_simultaneous_calls_never_overshoot(replicas: list[Replica], n_replicas: int) -> None:
    new = await replicas[0].keys.create("q", quota_documents=100)
    outcomes = await flood(replicas[:n_replicas], new.key, calls=50, docs=10)
    assert refused(outcomes) == [Code.QUOTA_EXCEEDED] * 40
    assert await billed(replicas[0].ledger, new.record.key_id) == 100
    assert await reservations(replicas[0].ledger) == []


async def test_failed_calls_in_a_flood_bill_nothing_and_free_their_documents(replicas: list[Replica]) -> None:
    new = await replicas[0].keys.create("q", quota_documents=100)
    for r in replicas:  # one batch fails on each replica that admits a call: which replica wins
        r.runner.fail_next = True  # the ten reservations is a race (on PostgreSQL, often all the first)
    outcomes = await flood(replicas, new.key, calls=50, docs=10)
    failed = refused(outcomes).count(Code.INTERNAL)
    assert failed >= 1 and refused(outcomes).count(Code.QUOTA_EXCEEDED) == 40
    assert await billed(replicas[0].ledger, new.record.key_id) == 100 - 10 * failed
    assert await reservations(replicas[0].ledger) == []
    for _ in range(failed):  # what the failures held is available again
        await replicas[0].core.rerank(call(new.key, 10))
    assert await billed(replicas[0].ledger, new.record.key_id) == 100


def test_the_quota_benchmark_runs() -> None:
    """bench/quota.py (the cost figures in OPERATIONS.md) still runs, and checks its quotas."""
    done = subprocess.run([sys.executable, "bench/quota.py", "--calls", "20", "--concurrency", "1,4"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("billed 20 of 20") == 2
