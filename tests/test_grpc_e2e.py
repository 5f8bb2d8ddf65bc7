"""End to end with the tiny real model: client -> gRPC -> core -> batcher -> Qwen3 -> back.

The reference is the scoring contract's, computed independently of the service: each
(query, document) prompt alone through transformers' ``AutoModelForCausalLM``, logits at the
last position, softmax over (no=2152, yes=9693). A document over max_length is scored as the
server's default number of chunks (docs/SCORING.md): the reference runs each chunk's ids alone
and keeps the best.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from serving import running_app, target

from clients import AsyncRerankClient, Query, RerankResult
from service.app import App
from service.calls import Limits
from worker.prompt import PromptBuilder
from worker.runner import ModelRunner
from worker.types import Batch, BatchScores, PromptOptions, RunnerInfo

MAX_LENGTH = 192
NO_ID, YES_ID = 2152, 9693
TOL_SCORE = 1e-5
TOL_LOGIT = 1e-4

QUERIES = [("what is the capital of France?", None),
           ("sort a list in python", "Given a programming question, retrieve code that solves it"),
           ("東京の人口", None)]
DOCUMENTS = ["Paris is the capital and most populous city of France.", "Bananas are yellow.",
             "def sort_list(xs):\n    return sorted(xs)\n", "東京都の人口は約1400万人です。", "",
             "A long document about rivers and their deltas. " * 30]  # over MAX_LENGTH: chunked
CHUNKS = Limits().max_chunks_per_doc  # what a call that names none gets

# (query, doc) -> (score, log-odds, cut, chunks, best chunk)
Reference = dict[tuple[int, int], tuple[float, float, bool, int, int]]


class GatedRunner:
    """The real runner, with a gate to hold the model thread (so concurrent callers can be
    queued deterministically) and a record of batch sizes."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.builder = runner.builder
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_rows: list[int] = []

    def score(self, batch: Batch) -> BatchScores:
        self.entered.set()
        self.gate.wait()
        self.batch_rows.append(len(batch.rows))
        return self.runner.score(batch)

    def warmup(self) -> None:
        self.runner.warmup()

    def info(self) -> RunnerInfo:
        return self.runner.info()


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> GatedRunner:
    return GatedRunner(ModelRunner.load(str(tiny_model_dir), max_length=MAX_LENGTH))


@pytest.fixture(scope="module")
async def app(runner: GatedRunner) -> AsyncIterator[App]:
    async with running_app(runner, model="tiny-qwen3", max_wait_ms=0.0) as served:
        yield served


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    """(query number, document number) -> (score, log-odds, truncated, chunks, best chunk), one
    pair (one chunk) at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_model_dir), MAX_LENGTH)
    out = {}
    with torch.inference_mode():
        for qn, (query, instruction) in enumerate(QUERIES):
            prompts = builder.build(query, DOCUMENTS, instruction, PromptOptions(max_chunks=CHUNKS))
            rows = iter(prompts.sequences)
            for dn, chunks in enumerate(prompts.chunks):
                two = [model(torch.tensor([next(rows)])).logits[0, -1, [NO_ID, YES_ID]] for _ in range(chunks)]
                logits = [float(t[1] - t[0]) for t in two]
                best = logits.index(max(logits))
                out[qn, dn] = (float(torch.softmax(two[best], dim=-1)[1]), logits[best], prompts.truncated[dn],
                               chunks, best)
    return out


def assert_matches(result: RerankResult, qn: int, reference: Reference) -> None:
    assert sorted(result.indices) == list(range(len(DOCUMENTS)))
    for r in result.results:
        score, logit, truncated, chunks, best = reference[qn, r.index]
        assert r.score == pytest.approx(score, abs=TOL_SCORE)
        assert r.logit == pytest.approx(logit, abs=TOL_LOGIT)
        assert (r.truncated, r.chunks, r.best_chunk) == (truncated, chunks, best)
    scores = [r.score for r in result.results]
    assert scores == sorted(scores, reverse=True)


def test_reference_scores_spread_and_one_document_is_chunked(
        reference: Reference) -> None:
    # a parity test against near-constant scores could not see a wrong answer
    scores = [r[0] for r in reference.values()]
    assert max(scores) - min(scores) > 0.2
    assert [r[3] > 1 and not r[2] for (qn, _), r in reference.items() if qn == 0].count(True) == 1


async def test_scores_equal_the_reference(app: App, reference: Reference) -> None:
    async with AsyncRerankClient(target(app)) as client:
        for qn, (query, instruction) in enumerate(QUERIES):
            assert_matches(await client.rerank(query, DOCUMENTS, instruction=instruction), qn, reference)


async def test_batch_call_scores_equal_the_reference(
        app: App, reference: Reference) -> None:
    queries = [Query(q, DOCUMENTS, instruction=i) for q, i in QUERIES]
    async with AsyncRerankClient(target(app)) as client:
        results = await client.rerank_batch(queries)
    for qn, result in enumerate(results):
        assert_matches(result, qn, reference)


async def test_concurrent_clients_share_batches_without_cross_talk(
        app: App, runner: GatedRunner, reference: Reference) -> None:
    clients = [AsyncRerankClient(target(app)) for _ in range(6)]
    try:
        runner.gate.clear()
        runner.entered.clear()
        holder = asyncio.create_task(clients[0].rerank("hold", ["the model"]))
        await asyncio.to_thread(runner.entered.wait, 10)
        before = len(runner.batch_rows)
        calls = [asyncio.create_task(c.rerank(QUERIES[n % 3][0], DOCUMENTS, instruction=QUERIES[n % 3][1]))
                 for n, c in enumerate(clients)]
        while app.batcher is not None and app.batcher.queued_docs < len(clients) * len(DOCUMENTS):
            await asyncio.sleep(0.01)
        runner.gate.set()
        results = await asyncio.gather(*calls)
        await holder
    finally:
        runner.gate.set()
        for c in clients:
            await c.close()
    for n, result in enumerate(results):
        assert_matches(result, n % 3, reference)
    assert max(runner.batch_rows[before:]) > len(DOCUMENTS)  # callers' documents ran together


async def test_truncation_off_refuses_the_long_document_only_where_chunks_cannot_hold_it(app: App) -> None:
    from clients import RerankError

    async with AsyncRerankClient(target(app)) as client:
        whole = await client.rerank("q", DOCUMENTS, truncate=False)  # chunked: every token scored
        with pytest.raises(RerankError) as err:
            await client.rerank("q", DOCUMENTS, truncate=False, max_chunks_per_doc=1)
        with pytest.raises(RerankError) as over:
            await client.rerank("q", DOCUMENTS[:5] + [DOCUMENTS[5] * CHUNKS], truncate=False)
    assert [r.chunks for r in sorted(whole.results, key=lambda r: r.index)][5] > 1
    assert err.value.code.name == "INVALID_ARGUMENT" and "document 5 needs" in err.value.details
    assert over.value.code.name == "INVALID_ARGUMENT" and f"more than {CHUNKS} chunks" in over.value.details


async def test_max_chunks_per_doc_per_call_bills_documents_and_counts_every_chunks_tokens(
        app: App, reference: Reference) -> None:
    query, instruction = QUERIES[0]
    async with AsyncRerankClient(target(app)) as client:
        default = await client.rerank(query, DOCUMENTS, instruction=instruction)
        one = await client.rerank(query, DOCUMENTS, instruction=instruction, max_chunks_per_doc=1)
        clamped = await client.rerank(query, DOCUMENTS, instruction=instruction, max_chunks_per_doc=10**6)
        two, = await client.rerank_batch([Query(query, DOCUMENTS, instruction=instruction, max_chunks_per_doc=2)])
    chunks = reference[0, 5][3]
    by_index = {r.index: r for r in one.results}
    assert (by_index[5].chunks, by_index[5].best_chunk, by_index[5].truncated) == (1, 0, True)
    assert [r.chunks for r in two.results if r.index == 5] == [min(2, chunks)]
    assert_matches(clamped, 0, reference)
    assert clamped.warnings == [f"max_chunks_per_doc 1000000 is more than this server scores; clamped to {CHUNKS}"]
    assert not default.warnings and not one.warnings
    # billed per document, whatever the chunks; tokens count every chunk's
    assert default.usage.documents == one.usage.documents == len(DOCUMENTS)
    assert default.usage.prompt_tokens > one.usage.prompt_tokens
    assert default.usage.computed_tokens > one.usage.computed_tokens
