"""Client-side pacing (clients/pacing.py): budgets, and RESOURCE_EXHAUSTED retried after the
server's hint with the same request id, so the retry is billed once (or replayed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from serving import create_schema, running_app, target

from clients import AsyncRerankClient, Pacing, RerankClient, RerankError
from service.app import App, CoreParts
from service.billing.db import open_engine
from service.billing.ledger import SqlLedger
from service.calls import PromptOptions, RerankCall, RerankQuery, RerankReply
from service.errors import Code, ServiceError
from service.local import score_request
from service.remote import RemoteEngine
from service.seams import ANONYMOUS, Principal
from worker.fake import FakeRunner
from worker.types import ScoreRequest

DOCS = ["pandas eat bamboo", "paris is in france", "a bear of china"]


class RefuseFirst:
    """A rate limiter that refuses its first ``refusals`` calls with a retry hint."""

    def __init__(self, refusals: int, retry_after_s: float | None) -> None:
        self.refusals = refusals
        self.retry_after_s = retry_after_s
        self.admits = 0

    async def admit(self, principal: Principal, documents: int, tokens: int = 0) -> None:
        self.admits += 1
        if self.refusals:
            self.refusals -= 1
            raise ServiceError(Code.RATE_LIMITED, "over the key's rate limit", retry_after_s=self.retry_after_s)

    def refund(self, principal: Principal, tokens: int) -> None:
        pass


@asynccontextmanager
async def limited_app(tmp_path: Path, limiter: RefuseFirst) -> AsyncIterator[tuple[App, SqlLedger]]:
    engine = open_engine(str(tmp_path / "ledger.sqlite3"))
    await create_schema(engine)
    ledger = SqlLedger(engine)
    try:
        async with running_app(parts=CoreParts(limiter=limiter, ledger=ledger)) as app:
            yield app, ledger
    finally:
        await engine.dispose()


def test_pacing_refuses_nonsense() -> None:
    for bad in ({"requests_per_s": 0}, {"documents_per_s": -1.0}, {"max_retries": -1}):
        with pytest.raises(ValueError):
            Pacing(**bad)  # type: ignore[arg-type]


async def test_refusal_with_a_hint_is_retried_with_the_same_request_id_and_billed_once(tmp_path: Path) -> None:
    limiter = RefuseFirst(2, retry_after_s=0.05)
    async with limited_app(tmp_path, limiter) as (app, ledger), \
            AsyncRerankClient(target(app), pacing=Pacing(max_retries=2)) as client:
        first = await client.rerank("bears", DOCS, request_id="job-1")
        again = await client.rerank("bears", DOCS, request_id="job-1")  # a caller's own retry: replayed
        records = await ledger.records()
    # two refused attempts, the one scored, and the replay (a request against the rate, unbilled)
    assert limiter.admits == 4
    assert first.request_id == "job-1" and not first.replayed
    assert again.replayed and again.results == first.results
    assert [(r.idempotency_key, r.documents) for r in records] == [("job-1", len(DOCS))]


async def test_unpaced_client_and_exhausted_retries_give_the_refusal(tmp_path: Path) -> None:
    async with limited_app(tmp_path, RefuseFirst(5, retry_after_s=0.01)) as (app, ledger):
        for pacing in (None, Pacing(max_retries=1)):
            async with AsyncRerankClient(target(app), pacing=pacing) as client:
                with pytest.raises(RerankError) as refused:
                    await client.rerank("bears", DOCS)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await ledger.records() == []


@pytest.mark.parametrize("retry_after_s", [None, 60.0])  # no hint; a hint past the deadline
async def test_no_retry_without_a_usable_hint(tmp_path: Path, retry_after_s: float | None) -> None:
    limiter = RefuseFirst(1, retry_after_s=retry_after_s)
    async with limited_app(tmp_path, limiter) as (app, _), \
            AsyncRerankClient(target(app), timeout_s=5, pacing=Pacing(max_retries=3)) as client:
        started = time.monotonic()
        with pytest.raises(RerankError, match="RESOURCE_EXHAUSTED"):
            await client.rerank("bears", DOCS)
    assert limiter.admits == 1 and time.monotonic() - started < 5  # gave up, did not sleep the hour


async def test_sync_client_retries_the_same_way(tmp_path: Path) -> None:
    limiter = RefuseFirst(1, retry_after_s=0.05)
    async with limited_app(tmp_path, limiter) as (app, ledger):
        def call() -> str:
            with RerankClient(target(app), pacing=Pacing(max_retries=1)) as client:
                return client.rerank("bears", DOCS, request_id="sync-1").request_id

        assert await asyncio.to_thread(call) == "sync-1"
        assert [r.idempotency_key for r in await ledger.records()] == ["sync-1"]
    assert limiter.admits == 2


@pytest.mark.parametrize("pacing,calls,docs", [(Pacing(requests_per_s=20), 21, 1),  # 20 per 1 s window
                                               (Pacing(documents_per_s=30), 4, 10)])  # 30 docs per 1 s
async def test_budget_makes_calls_wait(pacing: Pacing, calls: int, docs: int) -> None:
    """Over a one-second window's budget, the last call waits for the window to slide: at
    least a second in all (a lower bound only: how fast it goes otherwise is not asserted)."""
    async with running_app() as app, AsyncRerankClient(target(app), pacing=pacing) as client:
        started = time.monotonic()
        await asyncio.gather(*(client.rerank("q", [f"d{i}" for i in range(docs)]) for _ in range(calls)))
        assert time.monotonic() - started >= 1.0


async def test_a_budget_that_cannot_admit_in_time_is_deadline_exceeded_unsent() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app), pacing=Pacing(requests_per_s=0.1)) as client:
        await client.rerank("q", ["d"])  # takes the window's one call: the next is admitted in 10 s
        started = time.monotonic()
        with pytest.raises(RerankError) as late:
            await client.rerank("q", ["d"], timeout_s=0.3)
        assert time.monotonic() - started < 5  # gave up at its deadline, not after the window
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "pacing budget" in late.value.details
    assert len(runner.batches) == 1  # the late call was never sent


async def test_gateway_backend_calls_are_paced_and_retried(tmp_path: Path) -> None:
    limiter = RefuseFirst(1, retry_after_s=0.05)
    async with limited_app(tmp_path, limiter) as (app, _):
        engine = RemoteEngine([target(app)], pacing=Pacing(max_retries=1))
        try:
            await engine.connect(timeout_s=5)
            result = await engine.score(RerankQuery("bears", DOCS), "", 0)
        finally:
            await engine.close()
    assert [s.index for s in result.scores] == [0, 1, 2] and limiter.admits == 2


async def test_gateway_passes_priority_and_document_cut_to_the_backend() -> None:
    """The gateway's core settles a call's priority (the key's default, or its clamped ask);
    the backend's scheduler must see that priority, not its own default, nor lose the cut."""
    async with running_app() as app:
        seen: list[ScoreRequest] = []
        score = app.engine.score

        async def spy(query: RerankQuery, tenant: str, priority: int) -> object:
            seen.append(score_request(query, tenant, priority))  # what the worker is asked
            return await score(query, tenant, priority)

        app.engine.score = spy  # type: ignore[method-assign]
        engine = RemoteEngine([target(app)])
        try:
            await engine.connect(timeout_s=5)
            await engine.score(RerankQuery("bears", DOCS, options=PromptOptions(max_document_tokens=2)), "key_a", 7)
            await engine.score(RerankQuery("bears", DOCS), "", 0)
        finally:
            await engine.close()
    assert [(r.priority, r.options.max_document_tokens) for r in seen] == [(7, 2), (0, None)]
    # a backend without keys shares its model by the gateway's callers, not as one tenant
    assert [r.tenant for r in seen] == ["key_a", ANONYMOUS.key_id]


async def test_gateway_asks_the_backend_only_for_scores_and_keeps_them_whole() -> None:
    """The gateway's own core validates, dedupes, ranks and bills: a backend is asked for no
    request id (so it fingerprints and remembers nothing), every document (no top_n) and no
    echoed text; every per-document fact and token count the core uses comes back intact."""
    async with running_app(FakeRunner(max_length=64)) as app:
        calls: list[tuple[RerankCall, RerankReply]] = []
        rerank = app.core.rerank

        async def spy(call: RerankCall, **kw: Any) -> RerankReply:
            reply = await rerank(call, **kw)
            calls.append((call, reply))
            return reply

        app.core.rerank = spy  # type: ignore[method-assign]
        # the last one is chunked, and cut after its 3 chunks (the core settles the cap before an engine)
        request = RerankQuery("bears", [*DOCS, "word " * 100], options=PromptOptions(max_chunks=3))
        engine = RemoteEngine([target(app)])
        try:
            await engine.connect(timeout_s=5)
            remote = await engine.score(request, "", 0)
        finally:
            await engine.close()
        local = await app.engine.score(request, "", 0)
    ((call, reply),) = calls
    assert (call.idempotency_key, call.queries[0].top_n, call.queries[0].return_documents) == (None, None, False)
    assert remote.scores == local.scores and remote.scores[-1].truncated and remote.scores[-1].chunks == 3
    assert (remote.prompt_tokens, remote.computed_tokens) == (reply.prompt_tokens, reply.computed_tokens)
    assert remote.prompt_tokens == local.prompt_tokens and remote.computed_tokens > 0
