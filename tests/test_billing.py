"""Keys and the usage ledger through the real core, on SQLite and on PostgreSQL.

Every test runs twice (``db_url``): on a fresh SQLite file and on a fresh PostgreSQL
database (skipped where no PostgreSQL is available). The model is ``FakeRunner``; its
``gate`` holds batches so concurrent calls really overlap.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
from postgres_support import db_url, postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from serving import MODEL
from serving import LedgerStack as Stack
from sqlalchemy import insert, select, text, update

from service.billing.db import api_keys, idempotency_records, open_engine, usage_records
from service.billing.keys import KEY_PREFIX, KeyStore, hash_key
from service.billing.ledger import SqlLedger
from service.billing.ratelimit import KeyRateLimiter
from service.calls import RerankCall, RerankQuery
from service.core import RerankCore
from service.errors import Code, ServiceError
from service.local import BatcherEngine
from worker.fake import FakeRunner


@pytest.fixture
async def stack(db_url: str) -> AsyncIterator[Stack]:  # noqa: F811 - the imported fixture
    started = await Stack.start(db_url, max_queued_docs=256, limiter=KeyRateLimiter())
    yield started
    await started.stop()


def call(key: str | None, docs: int = 3, query: str = "what is a reranker", *,
         idem: str | None = None, **kw: object) -> RerankCall:
    q = RerankQuery(query, [f"document number {i}" for i in range(docs)], **kw)  # type: ignore[arg-type]
    return RerankCall([q], api_key=key, idempotency_key=idem)


async def code_of(coro: object) -> Code:
    with pytest.raises(ServiceError) as err:
        await coro  # type: ignore[misc]
    return err.value.code


async def held(runner: FakeRunner) -> None:
    """Wait until the model thread is inside ``score`` (and blocked on the gate)."""
    await asyncio.to_thread(runner.entered.wait, 10)


# -- keys -----------------------------------------------------------------------------------
async def test_key_authenticates_to_its_principal(stack: Stack) -> None:
    new = await stack.keys.create("alice", rate_limit_rps=5, rate_limit_dps=50, quota_documents=1000)
    assert new.key.startswith(KEY_PREFIX) and len(new.key) >= len(KEY_PREFIX) + 43
    principal = await stack.keys.authenticate(new.key)
    assert (principal.key_id, principal.name) == (new.record.key_id, "alice")
    assert (principal.rate_limit_rps, principal.rate_limit_dps, principal.quota_documents) == (5, 50, 1000)


async def test_only_the_hash_is_stored(stack: Stack) -> None:
    new = await stack.keys.create("alice")
    async with stack.keys.engine.connect() as conn:
        rows = [tuple(str(v) for v in row) for row in await conn.execute(select(api_keys))]
    assert rows and not any(new.key in value for row in rows for value in row)
    assert any(hash_key(new.key) in row for row in rows)


@pytest.mark.parametrize("key", [None, "", "rk_live_", "Bearer x", KEY_PREFIX + "A" * 43, "sk-" + "a" * 60,
                                 KEY_PREFIX + "A" * 42 + "!"])
async def test_missing_malformed_or_unknown_key_is_unauthenticated(stack: Stack, key: str | None) -> None:
    await stack.keys.create("someone")
    assert await code_of(stack.keys.authenticate(key)) is Code.UNAUTHENTICATED


async def test_revoked_key_is_refused_and_bills_nothing(stack: Stack) -> None:
    new = await stack.keys.create("mallory")
    await stack.core.rerank(call(new.key))
    revoked = await stack.keys.revoke(new.record.key_id)
    assert revoked is not None and revoked.revoked
    assert await code_of(stack.core.rerank(call(new.key))) is Code.PERMISSION_DENIED
    assert len(await stack.ledger.records(new.record.key_id)) == 1
    assert await stack.keys.revoke("key_nonexistent") is None
    assert [k.revoked for k in await stack.keys.list()] == [True]


# -- one record per successful call ---------------------------------------------------------
async def test_concurrent_calls_give_exactly_one_record_each(stack: Stack) -> None:
    alice, bob = await stack.keys.create("alice"), await stack.keys.create("bob")
    sizes = [1, 2, 3, 5, 8, 13, 1, 4]
    stack.runner.gate.clear()
    tasks = [asyncio.create_task(stack.core.rerank(call(k.key, n)))
             for n in sizes for k in (alice, bob)]
    await held(stack.runner)
    stack.runner.gate.set()
    replies = await asyncio.gather(*tasks)
    for k in (alice, bob):
        records = await stack.ledger.records(k.record.key_id)
        assert len(records) == len(sizes)
        assert sorted(r.documents for r in records) == sorted(sizes)
        assert {r.model for r in records} == {MODEL}
    assert len({r.request_id for r in replies}) == len(tasks)
    report = await stack.ledger.usage(alice.record.key_id)
    assert (report.total.requests, report.total.documents) == (len(sizes), sum(sizes))
    assert report.total.prompt_tokens == sum(r.prompt_tokens for r in replies) // 2


async def test_retry_with_idempotency_key_is_billed_once(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    first = await stack.core.rerank(call(key, 4, idem="order-42"))
    again = await stack.core.rerank(call(key, 4, idem="order-42"))
    assert again.replayed and not first.replayed
    assert dataclasses.replace(again, replayed=False) == first  # the first result, as it was
    assert len(await stack.ledger.records()) == 1
    assert len(stack.runner.batches) == 1  # the retry was not even scored


async def test_concurrent_duplicates_bill_once_and_share_the_winners_reply(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    stack.runner.gate.clear()
    tasks = [asyncio.create_task(stack.core.rerank(call(key, 2, idem="dup"))) for _ in range(8)]
    await held(stack.runner)  # every duplicate is past replay and queued for scoring
    stack.runner.gate.set()
    replies = await asyncio.gather(*tasks)
    assert len(await stack.ledger.records()) == 1
    assert [r.replayed for r in replies].count(False) == 1
    assert len({r.request_id for r in replies}) == 1


def scored_rows(runner: FakeRunner) -> int:
    return sum(len(batch) for batch in runner.batches)


def open_core(stack: Stack) -> RerankCore:
    """The stack without auth: nothing awaits before a call looks for its duplicate in flight,
    so every task created has reached that point by the time the model holds the first."""
    return RerankCore(BatcherEngine(stack.batcher), model_name=MODEL, ledger=stack.ledger)


async def test_identical_calls_in_flight_are_scored_once_and_billed_once(stack: Stack) -> None:
    """Single flight: 20 simultaneous duplicates wait for the first instead of each being scored."""
    core, key = open_core(stack), None
    stack.runner.gate.clear()
    tasks = [asyncio.create_task(core.rerank(call(key, 5, idem="once"))) for _ in range(20)]
    await held(stack.runner)
    stack.runner.gate.set()
    replies = await asyncio.gather(*tasks)
    assert scored_rows(stack.runner) == 5  # one call's documents, not 100
    assert len(await stack.ledger.records()) == 1
    assert [r.replayed for r in replies].count(False) == 1
    assert {r.request_id for r in replies} == {replies[0].request_id}
    assert all(r.outcomes == replies[0].outcomes for r in replies)


async def test_duplicates_in_flight_count_against_the_rate_limit_as_replays_do(stack: Stack) -> None:
    """Sharing the first call's reply is free of charge, not of the request rate."""
    core = RerankCore(BatcherEngine(stack.batcher), model_name=MODEL, ledger=stack.ledger,  # as open_core
                      limiter=KeyRateLimiter(default_rps=2, clock=lambda: 0.0))  # a frozen clock: 2 in all
    stack.runner.gate.clear()
    tasks = [asyncio.create_task(core.rerank(call(None, 2, idem="burst"))) for _ in range(4)]
    await held(stack.runner)  # the first is in the model; the others wait for it
    stack.runner.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r.code if isinstance(r, ServiceError) else r.replayed for r in results] == [
        False, True, Code.RATE_LIMITED, Code.RATE_LIMITED]
    assert scored_rows(stack.runner) == 2 and len(await stack.ledger.records()) == 1


async def test_duplicates_share_the_first_calls_error_unbilled(stack: Stack) -> None:
    core, key = open_core(stack), None
    stack.runner.gate.clear()
    stack.runner.fail_next = True
    tasks = [asyncio.create_task(core.rerank(call(key, 2, idem="doomed"))) for _ in range(5)]
    await held(stack.runner)
    stack.runner.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r.code for r in results if isinstance(r, ServiceError)] == [Code.INTERNAL] * 5
    assert scored_rows(stack.runner) == 2 and await stack.ledger.records() == []
    assert not (await core.rerank(call(key, 2, idem="doomed"))).replayed  # a retry computes anew


async def test_a_duplicate_takes_over_when_the_first_caller_goes_away(stack: Stack) -> None:
    core, key = open_core(stack), None
    stack.runner.gate.clear()
    first = asyncio.create_task(core.rerank(call(key, 2, idem="orphan")))
    await held(stack.runner)
    second = asyncio.create_task(core.rerank(call(key, 2, idem="orphan")))
    await asyncio.sleep(0)
    first.cancel()
    stack.runner.gate.set()
    reply = await second
    assert first.cancelled() and not reply.replayed
    assert [r.request_id for r in await stack.ledger.records()] == [reply.request_id]


async def test_another_body_waits_for_the_first_and_conflicts_unscored(stack: Stack) -> None:
    core, key = open_core(stack), None
    stack.runner.gate.clear()
    first = asyncio.create_task(core.rerank(call(key, 2, idem="k")))
    await held(stack.runner)
    other = asyncio.create_task(core.rerank(call(key, 7, idem="k")))
    await asyncio.sleep(0)
    stack.runner.gate.set()
    await first
    assert await code_of(other) is Code.IDEMPOTENCY_CONFLICT
    assert scored_rows(stack.runner) == 2 and len(await stack.ledger.records()) == 1


async def test_same_idempotency_key_with_another_body_is_a_conflict(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    await stack.core.rerank(call(key, 2, idem="k1"))
    for other in (call(key, 3, idem="k1"), call(key, 2, "another query", idem="k1"),
                  call(key, 2, idem="k1", top_n=1)):
        assert await code_of(stack.core.rerank(other)) is Code.IDEMPOTENCY_CONFLICT
    assert len(await stack.ledger.records()) == 1


async def test_idempotency_keys_are_per_api_key(stack: Stack) -> None:
    alice, bob = (await stack.keys.create("alice")).key, (await stack.keys.create("bob")).key
    await stack.core.rerank(call(alice, 2, idem="same"))
    assert not (await stack.core.rerank(call(bob, 5, idem="same"))).replayed
    assert len(await stack.ledger.records()) == 2


async def test_concurrent_conflicting_bodies_one_wins_one_conflicts(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    stack.runner.gate.clear()
    a = asyncio.create_task(stack.core.rerank(call(key, 2, idem="race")))
    b = asyncio.create_task(stack.core.rerank(call(key, 3, idem="race")))
    await held(stack.runner)
    stack.runner.gate.set()
    results = await asyncio.gather(a, b, return_exceptions=True)
    errors = [r for r in results if isinstance(r, ServiceError)]
    assert len(errors) == 1 and errors[0].code is Code.IDEMPOTENCY_CONFLICT
    records = await stack.ledger.records()
    assert len(records) == 1


async def age_idempotency_records(ledger: SqlLedger, by: timedelta, idempotency_key: str | None = None) -> None:
    table = idempotency_records
    query = update(table).values(created_at=datetime.now(UTC) - by)
    if idempotency_key is not None:
        query = query.where(table.c.idempotency_key == idempotency_key)
    async with ledger.engine.begin() as conn:
        await conn.execute(query)


async def stored_idempotency_keys(ledger: SqlLedger) -> list[str]:
    async with ledger.engine.connect() as conn:
        return sorted(k for (k,) in await conn.execute(select(idempotency_records.c.idempotency_key)))


async def test_expired_idempotency_key_starts_a_new_billed_call(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    first = await stack.core.rerank(call(key, 2, idem="nightly-job"))
    await age_idempotency_records(stack.ledger, timedelta(hours=23, minutes=59))
    assert (await stack.core.rerank(call(key, 2, idem="nightly-job"))).replayed  # still inside 24 h
    await age_idempotency_records(stack.ledger, timedelta(hours=24, minutes=1))
    # past the TTL the key is free again: the same body is scored and billed anew, and so would
    # another body be (no conflict with a record that has expired)
    second = await stack.core.rerank(call(key, 3, idem="nightly-job"))
    assert not second.replayed and second.request_id != first.request_id
    assert [r.documents for r in await stack.ledger.records()] == [2, 3]
    again = await stack.core.rerank(call(key, 3, idem="nightly-job"))  # the new record is in force
    assert again.replayed and again.request_id == second.request_id
    assert await code_of(stack.core.rerank(call(key, 2, idem="nightly-job"))) is Code.IDEMPOTENCY_CONFLICT
    assert len(await stack.ledger.records()) == 2


async def test_concurrent_reuses_of_an_expired_key_bill_once(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    await stack.core.rerank(call(key, 2, idem="weekly"))
    await age_idempotency_records(stack.ledger, timedelta(days=8))
    stack.runner.gate.clear()
    tasks = [asyncio.create_task(stack.core.rerank(call(key, 2, idem="weekly"))) for _ in range(6)]
    await held(stack.runner)  # every reuse is past replay (the record has expired) and queued
    stack.runner.gate.set()
    replies = await asyncio.gather(*tasks)
    assert [r.replayed for r in replies].count(False) == 1
    assert len({r.request_id for r in replies}) == 1
    assert len(await stack.ledger.records()) == 2  # the first week's call and one new one
    assert await stored_idempotency_keys(stack.ledger) == ["weekly"]


async def test_purge_deletes_expired_idempotency_records_only(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    for idem in ("old-1", "old-2", "fresh"):
        await stack.core.rerank(call(key, 1, idem=idem))
    for idem in ("old-1", "old-2"):
        await age_idempotency_records(stack.ledger, timedelta(hours=30), idem)
    assert await stack.ledger.purge_expired(chunk=1) == 2  # in two transactions
    assert await stored_idempotency_keys(stack.ledger) == ["fresh"]
    assert await stack.ledger.purge_expired() == 0
    assert len(await stack.ledger.records()) == 3  # usage records are the invoices: never purged


async def test_keyed_calls_purge_in_the_background_at_most_once_per_interval(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    ledger = SqlLedger(stack.ledger.engine, idempotency_ttl=timedelta(hours=1), purge_interval_s=3600)
    core = RerankCore(BatcherEngine(stack.batcher), model_name=MODEL, auth=stack.keys, ledger=ledger)
    await core.rerank(call(key, 1, idem="a"))  # the first keyed call starts a purge (nothing to do)
    first_purge = ledger._purging
    assert first_purge is not None and await first_purge == 0
    await age_idempotency_records(ledger, timedelta(hours=2), "a")
    await core.rerank(call(key, 1, idem="b"))  # within the interval: no second purge
    await asyncio.sleep(0)
    assert await stored_idempotency_keys(ledger) == ["a", "b"]
    ledger.purge_interval_s, ledger._next_purge = 0.0, 0.0  # the interval has passed
    await core.rerank(call(key, 1, idem="c"))
    assert ledger._purging is not first_purge and ledger._purging is not None
    assert await ledger._purging == 1
    assert await stored_idempotency_keys(ledger) == ["b", "c"]


def test_idempotency_ttl_must_be_positive_and_finite() -> None:
    with pytest.raises(ValueError, match="TTL must be positive"):
        SqlLedger(None, idempotency_ttl=timedelta(0))  # type: ignore[arg-type]
    from service.billing import open_billing

    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e12):
        with pytest.raises(ValueError, match="idempotency-ttl-h"):
            open_billing("sqlite:///unused.db", None, require_keys=True, idempotency_ttl_h=bad)


# -- failures bill nothing ------------------------------------------------------------------
async def test_failed_calls_write_nothing(stack: Stack) -> None:
    new = await stack.keys.create("alice", rate_limit_rps=100, quota_documents=1000)
    key = new.key
    assert await code_of(stack.core.rerank(call(key, query="   "))) is Code.INVALID_ARGUMENT
    assert await code_of(stack.core.rerank(call(key, 0))) is Code.INVALID_ARGUMENT
    assert await code_of(stack.core.rerank(call(key, 2000))) is Code.INVALID_ARGUMENT
    # the queue holds 256 documents; a key's first call is taken whatever its size (or one
    # key's flood would lock every other out), so the refused one comes while alice has a call
    stack.runner.gate.clear()
    blocker = asyncio.create_task(stack.core.rerank(call(key, 1, idem="blocker")))
    await held(stack.runner)
    assert await code_of(stack.core.rerank(call(key, 300))) is Code.OVERLOADED
    stack.runner.gate.set()
    await blocker
    assert await code_of(stack.core.rerank(call(key, idem="has space"))) is Code.INVALID_ARGUMENT
    bad_model = RerankCall(call(key).queries, api_key=key, model="gpt-5")
    assert await code_of(stack.core.rerank(bad_model)) is Code.NOT_FOUND
    stack.runner.fail_next = True
    assert await code_of(stack.core.rerank(call(key))) is Code.INTERNAL
    assert await code_of(stack.core.rerank(call(None))) is Code.UNAUTHENTICATED
    assert [r.idempotency_key for r in await stack.ledger.records()] == ["blocker"]


async def test_cancelled_call_writes_nothing(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    stack.runner.gate.clear()
    task = asyncio.create_task(stack.core.rerank(call(key, 3, idem="cancel-me")))
    await held(stack.runner)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stack.runner.gate.set()
    assert await stack.ledger.records() == []
    assert not (await stack.core.rerank(call(key, 3, idem="cancel-me"))).replayed  # computed anew


async def test_rate_limited_and_over_quota_calls_write_nothing(stack: Stack) -> None:
    limited = (await stack.keys.create("limited", rate_limit_rps=1)).key
    await stack.core.rerank(call(limited))
    with pytest.raises(ServiceError) as err:
        await stack.core.rerank(call(limited))
    assert err.value.code is Code.RATE_LIMITED and err.value.retry_after_s
    quota = await stack.keys.create("quota", quota_documents=5)
    await stack.core.rerank(call(quota.key, 3))
    assert await code_of(stack.core.rerank(call(quota.key, 3))) is Code.QUOTA_EXCEEDED
    await stack.core.rerank(call(quota.key, 2))  # exactly up to the quota
    assert [r.documents for r in await stack.ledger.records(quota.record.key_id)] == [3, 2]
    assert len(await stack.ledger.records()) == 3


async def test_ledger_write_failure_fails_the_call_unbilled(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    async with stack.ledger.engine.begin() as conn:
        await conn.execute(text("DROP TABLE usage_records"))  # the write now fails
    with pytest.raises(ServiceError) as err:
        await stack.core.rerank(call(key, 2, idem="lost"))
    assert err.value.code is Code.UNAVAILABLE and err.value.retry_after_s
    async with stack.ledger.engine.connect() as conn:  # its idempotency record rolled back too
        assert (await conn.execute(select(idempotency_records))).all() == []


async def test_unreachable_database_is_unavailable() -> None:
    engine = open_engine("postgresql://nobody@127.0.0.1:1/none")
    try:
        assert await code_of(KeyStore(engine).authenticate(KEY_PREFIX + "A" * 43)) is Code.UNAVAILABLE
    finally:
        await engine.dispose()
    with pytest.raises(ConnectionError, match="no directory"):
        open_engine("sqlite:////nonexistent/dir/ledger.sqlite3")


# -- usage ----------------------------------------------------------------------------------
async def test_usage_by_day_and_total(stack: Stack) -> None:
    rows = [("key_a", "2025-01-01", 3, 30), ("key_a", "2025-01-01", 2, 20), ("key_a", "2025-01-03", 7, 70),
            ("key_b", "2025-01-01", 100, 1000)]
    async with stack.ledger.engine.begin() as conn:
        for n, (key_id, day, docs, tokens) in enumerate(rows):
            await conn.execute(insert(usage_records).values(
                key_id=key_id, request_id=f"r{n}", model=MODEL, queries=1, documents=docs,
                prompt_tokens=tokens, computed_tokens=tokens // 2, idempotency_key=None,
                created_at=datetime.now(UTC), day=day))
    report = await stack.ledger.usage("key_a")
    assert [(d, t.requests, t.documents, t.prompt_tokens) for d, t in report.days] == [
        ("2025-01-01", 2, 5, 50), ("2025-01-03", 1, 7, 70)]
    assert (report.total.requests, report.total.documents, report.total.computed_tokens) == (3, 12, 60)
    since = await stack.ledger.usage("key_a", since=date(2025, 1, 2))
    assert [d for d, _ in since.days] == ["2025-01-03"]
    until = await stack.ledger.usage("key_a", until=date(2025, 1, 2))
    assert until.total.documents == 5
    assert await stack.ledger.billed_by_key() == {"key_a": 12, "key_b": 100}


async def test_stored_replies_keep_any_text_exactly(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    docs = ["nul \x00 inside", "emoji 🦀 and 東京", "quote \" backslash \\ newline \n", "\u2028\ufeff"]
    q = RerankQuery("query", docs, return_documents=True)
    first = await stack.core.rerank(RerankCall([q], api_key=key, idempotency_key="text"))
    again = await stack.core.rerank(RerankCall([q], api_key=key, idempotency_key="text"))
    assert again.replayed
    assert sorted(r.document or "" for r in again.outcomes[0].results) == sorted(docs)
    assert again.outcomes == first.outcomes


async def test_idempotency_records_hold_no_document_text(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    docs = ["secret alpha text", "secret beta text", "secret gamma text"]
    q = RerankQuery("query", docs, top_n=2, return_documents=True)
    first = await stack.core.rerank(RerankCall([q], api_key=key, idempotency_key="private"))
    assert {r.document for r in first.outcomes[0].results} <= set(docs)
    async with stack.ledger.engine.connect() as conn:
        (stored,) = (await conn.execute(select(idempotency_records.c.reply))).scalars().all()
    assert not any(d in stored for d in docs) and "secret" not in stored
    again = await stack.core.rerank(RerankCall([q], api_key=key, idempotency_key="private"))
    assert again.replayed and again.outcomes == first.outcomes  # the text re-attached by index
    assert [r.document for r in again.outcomes[0].results] == [docs[r.index] for r in first.outcomes[0].results]


async def test_records_stored_with_text_by_older_versions_still_replay(stack: Stack) -> None:
    key = (await stack.keys.create("alice")).key
    q = RerankQuery("query", ["one", "two"], return_documents=True)
    first = await stack.core.rerank(RerankCall([q], api_key=key, idempotency_key="legacy"))
    async with stack.ledger.engine.begin() as conn:  # rewrite the record as a version that kept the text did
        await conn.execute(update(idempotency_records).values(reply=first.to_json()))
        (stored,) = (await conn.execute(select(idempotency_records.c.reply))).scalars().all()
    assert '"one"' in stored
    again = await stack.core.rerank(RerankCall([q], api_key=key, idempotency_key="legacy"))
    assert again.replayed and again.outcomes == first.outcomes
    assert len(await stack.ledger.records()) == 1


async def test_a_replica_that_loses_the_race_returns_the_winners_reply_with_documents(stack: Stack) -> None:
    """Two replicas (two cores, one ledger) score the same keyed call at once: the loser's
    reply is the winner's stored one, which holds no text, with the caller's documents."""
    replicas = [open_core(stack), open_core(stack)]
    q = RerankQuery("query", ["first doc", "second doc", "third doc"], return_documents=True)
    stack.runner.gate.clear()
    tasks = [asyncio.create_task(core.rerank(RerankCall([q], idempotency_key="race"))) for core in replicas]
    await held(stack.runner)
    stack.runner.gate.set()
    replies = await asyncio.gather(*tasks)
    assert scored_rows(stack.runner) == 6 and len(await stack.ledger.records()) == 1  # both scored, one billed
    assert len({r.request_id for r in replies}) == 1  # the loser returned the winner's reply
    for reply in replies:
        assert [r.document for r in reply.outcomes[0].results] == [q.documents[r.index]
                                                                   for r in reply.outcomes[0].results]


async def test_key_scoped_to_other_models_is_permission_denied(stack: Stack) -> None:
    other = await stack.keys.create("big-tier", models=["Qwen/Qwen3-Reranker-8B"])
    mine = await stack.keys.create("this-tier", models=[MODEL, "Qwen/Qwen3-Reranker-8B"])
    assert (await stack.keys.authenticate(other.key)).models == frozenset({"Qwen/Qwen3-Reranker-8B"})
    assert await code_of(stack.core.rerank(call(other.key))) is Code.PERMISSION_DENIED
    await stack.core.rerank(call(mine.key))
    assert [r.key_id for r in await stack.ledger.records()] == [mine.record.key_id]
