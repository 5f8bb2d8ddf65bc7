"""The batcher, deterministically: a fake runner that blocks on an event, no sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import AsyncIterator

import pytest

import worker.batcher
from worker.batcher import Batcher, BatcherConfig, BatchStats
from worker.cost import CostModel, Shape
from worker.fake import FakeRunner, fake_logit
from worker.types import (
    Batch,
    BatchScores,
    InvalidInput,
    ModelFailure,
    Overloaded,
    PromptOptions,
    ScoreRequest,
    ShuttingDown,
    Truncation,
)


async def entered(runner: FakeRunner) -> None:
    """Wait until the model thread is inside score()."""
    assert await asyncio.to_thread(runner.entered.wait, 10), "the model was never called"
    runner.entered.clear()


@pytest.fixture
async def blocked() -> AsyncIterator[tuple[Batcher, FakeRunner, list[BatchStats]]]:
    runner = FakeRunner()
    runner.gate.clear()
    stats: list[BatchStats] = []
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_tokens=10_000, max_batch_size=64,
                                                            max_wait_ms=0, max_queued_docs=20),
                      on_batch=stats.append)
    batcher.start()
    yield batcher, runner, stats
    runner.gate.set()
    await batcher.close()


def request(n: int, query: str = "q") -> ScoreRequest:
    return ScoreRequest(query, [f"document number {i} " * (i + 1) for i in range(n)])


async def test_results_in_input_order_with_fake_scores(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, _ = blocked
    runner.gate.set()
    result = await batcher.score(request(5))
    prompts = runner.builder.build("q", request(5).documents, None)
    assert [s.index for s in result.scores] == [0, 1, 2, 3, 4]
    assert [s.logit for s in result.scores] == [fake_logit(ids) for ids in prompts.sequences]
    assert result.prompt_tokens == sum(map(len, prompts.sequences))


async def test_waiting_requests_are_coalesced_into_one_batch(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, stats = blocked
    first = asyncio.ensure_future(batcher.score(request(1, "first")))
    await entered(runner)  # the model is busy with `first`
    others = [asyncio.ensure_future(batcher.score(request(3, f"q{i}"))) for i in range(3)]
    while batcher.queued_docs < 9:
        await asyncio.sleep(0)  # let the three requests finish tokenizing
    runner.gate.set()
    await asyncio.gather(first, *others)
    assert [len(b) for b in runner.batches] == [1, 9]
    assert stats[1].requests == 3 and not stats[1].failed


async def test_budget_splits_batches() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_tokens=200, max_batch_size=3, max_wait_ms=0))
    batcher.start()
    try:
        await batcher.score(ScoreRequest("q", ["x " * n for n in range(1, 12)]))
    finally:
        await batcher.close()
    for rows in runner.batches:
        costs = [length - prefix for length, prefix in rows]
        assert len(rows) <= 3
        assert len(rows) == 1 or max(costs) * len(rows) <= 200
    assert sum(map(len, runner.batches)) == 11


async def test_cancelled_caller_leaves_no_work(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, _ = blocked
    first = asyncio.ensure_future(batcher.score(request(1, "first")))
    await entered(runner)
    doomed = asyncio.ensure_future(batcher.score(request(4, "doomed")))
    while batcher.queued_docs < 4:
        await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    runner.gate.set()
    await first
    after = await batcher.score(request(2, "after"))
    assert len(after.scores) == 2
    assert [len(b) for b in runner.batches] == [1, 2]  # the 4 cancelled rows never ran
    assert batcher.queued_docs == 0


async def test_deadline_cancels_like_a_caller(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, _ = blocked
    first = asyncio.ensure_future(batcher.score(request(1)))
    await entered(runner)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.score(request(3)), timeout=0.05)
    runner.gate.set()
    await first
    await batcher.score(request(1))
    assert sum(map(len, runner.batches)) == 2


async def test_model_error_fails_only_its_batch(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, stats = blocked
    runner.fail_next = True
    runner.gate.set()
    with pytest.raises(ModelFailure, match="injected model fault"):
        await batcher.score(request(3))
    result = await batcher.score(request(2))
    assert len(result.scores) == 2
    assert [s.failed for s in stats] == [True, False]


async def test_full_queue_is_overloaded_with_retry_hint(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, _ = blocked
    first = asyncio.ensure_future(batcher.score(request(1)))
    await entered(runner)
    queued = asyncio.ensure_future(batcher.score(request(15)))
    while batcher.queued_docs < 15:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await batcher.score(request(6))  # 15 + 6 > 20
    assert info.value.retry_after_s > 0
    runner.gate.set()
    await asyncio.gather(first, queued)


async def test_no_documents_is_an_error_not_a_hang(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, _, _ = blocked
    with pytest.raises(InvalidInput, match="no documents"):
        await asyncio.wait_for(batcher.score(ScoreRequest("q", [])), timeout=5)


async def test_invalid_input_is_raised_before_queueing(blocked) -> None:  # type: ignore[no-untyped-def]
    batcher, runner, _ = blocked
    runner.gate.set()
    with pytest.raises(InvalidInput):
        await batcher.score(ScoreRequest("q", ["word " * 10_000], options=PromptOptions(Truncation.NONE)))
    assert batcher.queued_docs == 0 and runner.batches == []


async def test_close_finishes_in_flight_then_refuses() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    in_flight = asyncio.ensure_future(batcher.score(request(2)))
    await entered(runner)
    closing = asyncio.ensure_future(batcher.close(grace_s=10))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        await batcher.score(request(1))
    runner.gate.set()
    await closing
    assert len((await in_flight).scores) == 2


async def test_close_fails_what_the_grace_period_cannot_finish() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    first = asyncio.ensure_future(batcher.score(request(1)))
    await entered(runner)
    queued = asyncio.ensure_future(batcher.score(request(2)))
    while batcher.queued_docs < 2:
        await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.close(grace_s=0.01))
    with pytest.raises(ShuttingDown):
        await queued
    runner.gate.set()  # let the model thread finish so close() can join it
    await closing
    with pytest.raises(ShuttingDown):
        await first


async def test_close_without_grace_fails_in_flight_at_once() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    in_flight = asyncio.ensure_future(batcher.score(request(1)))
    await entered(runner)
    closing = asyncio.ensure_future(batcher.close(grace_s=0))
    with pytest.raises(ShuttingDown):
        await in_flight  # failed at once, while the model thread is still busy
    assert not closing.done()  # joining the model thread waits off the loop ...
    runner.gate.set()
    await closing  # ... and ends when the batch does


async def test_stats_separate_prefill_from_rows_own_tokens() -> None:
    stats: list[BatchStats] = []
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0), on_batch=stats.append)
    batcher.start()
    try:
        await batcher.score(request(3))
    finally:
        await batcher.close()
    (batch,) = stats
    assert batch.computed_tokens - batch.prefill_tokens <= batch.padded_tokens


@pytest.mark.parametrize("reuse", [True, False])
async def test_what_each_request_shares(reuse: bool) -> None:
    """Several documents share their request's prefix; a lone document shares the template's
    system prompt (with every request); with reuse off, nothing is shared."""
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0, prefix_reuse=reuse))
    batcher.start()
    try:
        await batcher.score(request(3))
        await batcher.score(request(1, "a lone document"))
    finally:
        await batcher.close()
    many, lone = runner.batches
    shared = runner.builder.build("q", request(3).documents, None).shared_len
    assert shared > len(runner.builder.prefix_ids) > 0
    assert [prefix for _, prefix in many] == [shared if reuse else 0] * 3
    assert [prefix for _, prefix in lone] == [len(runner.builder.prefix_ids) if reuse else 0]


async def test_queued_tokens_are_a_limit_too() -> None:
    """Few documents but much work: refused by tokens, while one call alone is always taken."""
    runner = FakeRunner()
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_tokens=10_000, max_wait_ms=0,
                                                            max_queued_docs=1000, max_queued_tokens=400))
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.score(request(1)))
        await entered(runner)
        big = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["word " * 500])))  # > 400 alone
        while batcher.queued_docs < 1:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="tokens queued") as info:
            await batcher.score(ScoreRequest("q", ["word " * 10]))  # 1 document, but over the tokens
        assert info.value.retry_after_s > 0
        runner.gate.set()
        await asyncio.gather(first, big)
    finally:
        runner.gate.set()
        await batcher.close()


# fair: after one turn of the flood (it came first), not after all of it; fifo: last
@pytest.mark.parametrize(("scheduler", "small_runs_in_batch"), [("fair", 2), ("fifo", 5)])
async def test_a_small_call_does_not_wait_for_another_keys_large_call(scheduler: str,
                                                                     small_runs_in_batch: int) -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_tokens=128, max_wait_ms=0, scheduler=scheduler))
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.score(request(1)))
        await entered(runner)  # the model is busy; what follows queues
        large = asyncio.ensure_future(batcher.score(
            ScoreRequest("q", [f"long {i} " + "word " * 50 for i in range(8)], tenant="flood")))
        while batcher.queued_docs < 8:
            await asyncio.sleep(0)
        small = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["short"], tenant="quiet")))
        while batcher.queued_docs < 9:
            await asyncio.sleep(0)
        runner.gate.set()
        await asyncio.gather(first, large, small)
        small_len = runner.builder.build("q", ["short"], None).sequences[0]
        where = [n for n, rows in enumerate(runner.batches) if (len(small_len), len(runner.builder.prefix_ids))
                 in rows]
        assert where == [small_runs_in_batch]
        assert len(runner.batches) == 6  # the large call's 8 rows took four batches either way
    finally:
        runner.gate.set()
        await batcher.close()


async def test_a_small_call_is_not_tokenized_behind_large_ones() -> None:
    """Large calls tokenize for seconds; with every tokenizer thread busy on them, a short
    call still gets its own lane (it waited behind them: p99 1.3 s in bench/noisy_neighbour.py)."""
    runner = FakeRunner()
    release = threading.Event()
    build = runner.builder.build

    def slow_for_large(query: str, documents: list[str], *rest: object) -> object:
        if len(documents) > 1:
            assert release.wait(10), "never released"
        return build(query, documents, *rest)  # type: ignore[arg-type]

    runner.builder.build = slow_for_large  # type: ignore[method-assign, assignment]
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0, tokenizer_threads=2))
    batcher.start()
    try:
        large = [asyncio.ensure_future(batcher.score(ScoreRequest(f"large {i}", ["word " * 2000] * 2)))
                 for i in range(2)]  # 20,000 characters each
        await asyncio.sleep(0.05)  # both tokenizer threads are now held by the large calls
        small = await asyncio.wait_for(batcher.score(ScoreRequest("q", ["short"])), timeout=5)
        assert len(small.scores) == 1 and not any(t.done() for t in large)
        release.set()
        await asyncio.gather(*large)
    finally:
        release.set()
        await batcher.close()


async def test_linger_gathers_company_until_the_batch_is_full() -> None:
    """With max_wait_ms > 0 a lone request waits for company, and a full batch goes at once
    (a minute's linger would time the test out)."""
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_size=3, max_wait_ms=60_000))
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.score(request(1, "first")))
        while batcher.queued_docs < 1:
            await asyncio.sleep(0)  # tokenized and queued: the loop lingers for more
        await asyncio.wait_for(asyncio.gather(first, batcher.score(request(2, "second"))), 10)
    finally:
        await batcher.close()
    assert [len(b) for b in runner.batches] == [3]


async def test_linger_counts_from_the_oldest_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that already waited max_wait_ms for a busy model runs as soon as the model
    is free; it does not linger afresh after every batch."""
    skipped = [0.0]  # seconds the batcher's clock is ahead of the real one
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0])
    monkeypatch.setattr(worker.batcher, "time", clock)
    runner = FakeRunner()
    runner.gate.clear()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_size=2, max_wait_ms=60_000))
    batcher.start()
    try:
        busy = asyncio.ensure_future(batcher.score(request(2, "a full batch")))  # no linger: full
        await entered(runner)
        waiting = asyncio.ensure_future(batcher.score(request(1, "waits")))
        while batcher.queued_docs < 1:
            await asyncio.sleep(0)
        skipped[0] = 61.0  # it has now waited longer than max_wait_ms for the model
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(busy, waiting), 10)
    finally:
        runner.gate.set()
        await batcher.close()
    assert [len(b) for b in runner.batches] == [2, 1]


async def test_a_query_asked_again_finds_its_prefix() -> None:
    """The runner caches prefix K/V by the ``Prefix`` object: a request repeating an earlier
    query (the next page, a retry, another caller) must carry the same object, or its prefix
    is computed again; a different query must not."""
    seen: list[object] = []

    class Recording(FakeRunner):
        def score(self, batch: Batch) -> BatchScores:
            seen.extend(p for p in batch.prefixes if p is not self.builder.system)
            return super().score(batch)

    runner = Recording()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    try:
        for query in ("capital of France", "capital of France", "yellow fruit"):
            await batcher.score(ScoreRequest(query, ["Paris is the capital.", "Bananas are yellow."]))
    finally:
        await batcher.close()
    assert len(seen) == 3
    assert seen[0] is seen[1] and seen[2] is not seen[0]


async def test_a_full_queue_still_takes_one_call_of_a_key_with_nothing_in_flight(blocked) -> None:  # type: ignore[no-untyped-def]
    """One key's flood fills the queue: another key is not locked out (one call at a time),
    while the flooding key is refused."""
    batcher, runner, _ = blocked
    first = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["d"], tenant="flood")))
    await entered(runner)
    flood = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["d"] * 19, tenant="flood")))
    while batcher.queued_docs < 19:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await batcher.score(ScoreRequest("q", ["d"] * 2, tenant="flood"))  # 19 + 2 > 20
    quiet = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["d"] * 2, tenant="quiet")))
    while batcher.queued_docs < 21 and not quiet.done():
        await asyncio.sleep(0)
    assert not quiet.done(), quiet.exception()  # queued past the limit, not refused
    with pytest.raises(Overloaded):
        await batcher.score(ScoreRequest("q", ["e"] * 2, tenant="quiet"))  # its first is still queued
    runner.gate.set()
    await asyncio.gather(first, flood, quiet)


async def test_first_calls_of_many_tenants_stop_at_twice_the_limit(blocked) -> None:  # type: ignore[no-untyped-def]
    """Each tenant's first call passes a full queue, but not past twice its limit: a caller
    that can name many tenants cannot grow the queue without bound."""
    batcher, runner, _ = blocked  # max_queued_docs=20
    first = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["d"], tenant="t-0")))
    await entered(runner)
    taken = [asyncio.ensure_future(batcher.score(ScoreRequest("q", ["d"] * 5, tenant=f"t-{n}")))
             for n in range(1, 9)]  # 8 tenants x 5 = 40 documents queued: twice the limit
    while batcher.queued_docs < 40:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        # a new tenant, past twice the limit: refused at once (admitted, it would wait on the gate)
        await asyncio.wait_for(batcher.score(ScoreRequest("q", ["d"], tenant="t-9")), 5)
    runner.gate.set()
    await asyncio.gather(first, *taken)


# -- the time budget -------------------------------------------------------------------------
class SlowRunner(FakeRunner):
    """A device that takes 2 ms a batch plus 50 ms per 1,000 tokens the rows compute."""

    def score(self, batch: Batch) -> BatchScores:
        out = super().score(batch)
        time.sleep((2 + 0.05 * sum(len(r.ids) - batch.prefix_len(r) for r in batch.rows)) / 1000)
        return out


async def test_warmup_fits_the_cost_model_on_the_device_at_hand() -> None:
    runner = SlowRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_ms=100, max_batch_tokens=8192))
    await batcher.warmup()
    await batcher.close()
    fit = batcher.cost.coefficients()
    assert 25 <= fit["kilotoken"] <= 100  # 50 ms per 1k tokens, give or take a busy machine
    lone = [rows for rows in runner.batches if len(rows) == 1]
    own = [length - prefix for (length, prefix), in lone]
    assert own == sorted(own) and own[-1] >= 4000 > own[-2]  # doubled until one row took twice the budget


async def test_no_time_budget_means_no_calibration() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_ms=0))
    await batcher.warmup()
    await batcher.close()
    assert runner.warmed and runner.batches == [] and not batcher.cost.fitted


async def test_a_quiet_call_waits_for_one_short_batch_behind_a_flood() -> None:
    """Ten flood rows fit the token budget; at 100 ms a row the time budget takes two a batch,
    and the quiet call that arrives meanwhile runs in the very next batch."""
    runner = FakeRunner()
    runner.gate.clear()
    cost = CostModel()
    for rows in (1, 2, 4):
        cost.calibrate(Shape.of([(6, 50)] * rows), 100.0 * rows)
    stats: list[BatchStats] = []
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_tokens=10_000, max_wait_ms=0,
                                                            max_batch_ms=250), on_batch=stats.append, cost=cost)
    batcher.start()
    try:
        flood = asyncio.ensure_future(batcher.score(ScoreRequest("flood", ["a b c d e f"] * 10, tenant="f")))
        await entered(runner)
        quiet = asyncio.ensure_future(batcher.score(ScoreRequest("quiet", ["x"], tenant="q")))
        while batcher.queued_docs < 9:
            await asyncio.sleep(0)
        runner.gate.set()
        await asyncio.gather(flood, quiet)
    finally:
        runner.gate.set()
        await batcher.close()
    assert len(runner.batches[0]) == 2  # not 10: the token budget alone would take them all
    quiet_row = runner.builder.build("quiet", ["x"], None).sequences[0]
    assert len(quiet_row) in [length for length, _ in runner.batches[1]]  # flood rows are 57 tokens
    assert all(length == 57 for rows in runner.batches[2:] for length, _ in rows)
    assert stats[0].estimated_seconds == pytest.approx(0.2, rel=0.01)


def test_a_negative_time_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_ms"):
        BatcherConfig(max_batch_ms=-1)


async def test_a_long_documents_chunks_are_rows_of_its_request_and_its_score_is_the_best() -> None:
    """Chunks run as rows on the request's prefix; each document's score is its best chunk's
    (the fake model's logit of exactly that chunk's ids), and billing still counts documents."""
    runner = FakeRunner(max_length=96)
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_batch_tokens=10_000, max_wait_ms=0))
    batcher.start()
    try:
        docs = ["short", " ".join(f"w{i}" for i in range(300)), "also short"]
        result = await batcher.score(ScoreRequest("q", docs, options=PromptOptions(max_chunks=10)))
    finally:
        await batcher.close()
    prompts = runner.builder.build("q", docs, None, PromptOptions(max_chunks=10))
    assert prompts.chunks[0] == 1 and prompts.chunks[1] > 2 and len(result.scores) == 3
    rows = [fake_logit(ids) for ids in prompts.sequences]
    long_ = rows[1: 1 + prompts.chunks[1]]
    assert [s.logit for s in result.scores] == [rows[0], max(long_), rows[-1]]
    assert [(s.chunks, s.best_chunk) for s in result.scores] == [(1, 0), (len(long_), long_.index(max(long_))), (1, 0)]
    assert result.prompt_tokens == sum(map(len, prompts.sequences))
    assert all(prefix == prompts.shared_len for batch in runner.batches for _, prefix in batch)


LONG_DOC = " ".join(f"w{i}" for i in range(1200))  # 20 chunks at max_length 96 (the fake tokenizer's words)


# fair: after one turn of the flood, as for a call of many documents; fifo (the control, so the
# test can fail): after every chunk of it
@pytest.mark.parametrize(("scheduler", "docs"), [("fair", 1), ("fair", 3), ("fifo", 1)])
async def test_a_long_documents_chunks_do_not_stall_another_keys_short_call(scheduler: str, docs: int) -> None:
    """The chunks of one very long document (or of several) are rows of the flood's call: the
    fair queue serves the quiet key's short call after the batch in flight and one turn of the
    flood (the queue's promise: the turns of tenants no further ahead, one batch each), each
    batch keeps to the token budget, and every chunk row is at most max_length."""
    runner = FakeRunner(max_length=96)
    runner.gate.clear()
    config = BatcherConfig(max_batch_tokens=160, max_wait_ms=0, scheduler=scheduler, max_queued_docs=1000)
    batcher = Batcher(runner, runner.builder, config)
    batcher.start()
    flood_docs = [f"doc {d} " + LONG_DOC for d in range(docs)]
    rows = sum(runner.builder.build("q", flood_docs, None, PromptOptions(max_chunks=100)).chunks)
    try:
        first = asyncio.ensure_future(batcher.score(request(1)))
        await entered(runner)  # the model is busy; what follows queues
        flood = asyncio.ensure_future(batcher.score(ScoreRequest("q", flood_docs, options=PromptOptions(max_chunks=100),
                                                                  tenant="flood")))
        while batcher.queued_docs < rows:
            await asyncio.sleep(0)
        small = asyncio.ensure_future(batcher.score(ScoreRequest("q", ["short"], tenant="quiet")))
        while batcher.queued_docs < rows + 1:
            await asyncio.sleep(0)
        runner.gate.set()
        flooded, _, _ = await asyncio.gather(flood, first, small)
    finally:
        runner.gate.set()
        await batcher.close()
    assert rows >= 20 * docs and [s.chunks for s in flooded.scores] == [rows // docs] * docs
    small_len = len(runner.builder.build("q", ["short"], None).sequences[0])
    where = [n for n, batch in enumerate(runner.batches) if (small_len, len(runner.builder.prefix_ids)) in batch]
    # the batch in flight (0), the flood's one turn (it queued first), then the quiet call
    assert where == ([2] if scheduler == "fair" else [len(runner.batches) - 1])
    for batch in runner.batches:
        assert all(length <= 96 for length, _ in batch)
        assert max(length - prefix for length, prefix in batch) * len(batch) <= config.max_batch_tokens
