"""The core on its own: ranking, top_n, and multi-query calls that fail part-way."""

from __future__ import annotations

import asyncio

import pytest

from service.core import RerankCall, RerankCore, RerankQuery
from service.errors import Code, ServiceError
from service.local import BatcherEngine
from worker.batcher import Batcher, BatcherConfig
from worker.fake import FakeRunner
from worker.types import Truncation


async def test_failing_query_cancels_its_siblings() -> None:
    """One query of a batch call is refused after another was queued: the queued one must
    not be left for the model to compute for nobody."""
    runner = FakeRunner(max_length=64)
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    core = RerankCore(BatcherEngine(batcher), model_name="fake")
    try:
        blocker = asyncio.ensure_future(core.rerank(RerankCall([RerankQuery("first", ["a"])])))
        assert await asyncio.to_thread(runner.entered.wait, 10)  # the model is busy
        call = RerankCall([RerankQuery("queued", ["b", "c", "d"]),
                           RerankQuery("too long", ["word " * 500], truncation=Truncation.NONE)])
        with pytest.raises(ServiceError) as info:
            await core.rerank(call)
        assert info.value.code is Code.INVALID_ARGUMENT
        runner.gate.set()
        await blocker
        await core.rerank(RerankCall([RerankQuery("after", ["e"])]))
        assert [len(b) for b in runner.batches] == [1, 1]  # b, c, d never ran
    finally:
        runner.gate.set()
        await batcher.close()


async def test_results_ranked_by_log_odds_and_cut_to_top_n() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    core = RerankCore(BatcherEngine(batcher), model_name="fake")
    docs = [f"document {i}" for i in range(7)]
    try:
        full = await core.rerank(RerankCall([RerankQuery("q", docs)]))
        top = await core.rerank(RerankCall([RerankQuery("q", docs, top_n=3, return_documents=True)]))
    finally:
        await batcher.close()
    ranked = full.outcomes[0].results
    assert [r.logit for r in ranked] == sorted((r.logit for r in ranked), reverse=True)
    assert sorted(r.index for r in ranked) == list(range(7))
    assert [r.index for r in top.outcomes[0].results] == [r.index for r in ranked[:3]]
    assert [r.document for r in top.outcomes[0].results] == [docs[r.index] for r in ranked[:3]]
    assert top.billed_documents == 7  # every document sent is billed, not only the top_n


async def test_only_a_keyed_call_is_fingerprinted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint hashes every document; only a call with an idempotency key is ever
    compared with one, so no other call pays for it."""
    seen: list[str | None] = []
    real = RerankCall.fingerprint

    def spy(call: RerankCall) -> str:
        seen.append(call.idempotency_key)
        return real(call)

    monkeypatch.setattr(RerankCall, "fingerprint", spy)
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    core = RerankCore(BatcherEngine(batcher), model_name="fake")
    try:
        await core.rerank(RerankCall([RerankQuery("q", ["d"])]))
        await core.rerank(RerankCall([RerankQuery("q", ["d"])], idempotency_key="retry-1"))
    finally:
        await batcher.close()
    assert seen == ["retry-1"]
