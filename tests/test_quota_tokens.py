"""Per-key prompt tokens per minute through the core: admitted by an upper bound, settled to
the real count, and the upper bound checked against the real Qwen3 tokenizer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from service.billing.ratelimit import KeyRateLimiter
from service.calls import PromptOptions, RerankCall, RerankQuery
from service.core import RerankCore
from service.errors import Code, ServiceError
from service.local import BatcherEngine, estimate_prompt_tokens
from service.seams import Principal
from worker.batcher import Batcher, BatcherConfig
from worker.fake import FakeRunner
from worker.prompt import PromptBuilder

TEXTS = ["short", "a longer document about rerankers and the documents they rank " * 20,
         "東京の天気は晴れです。" * 30, "emoji 🦀🦀 and \x00 nul", "  spaces\n\n\tand tabs  ", "x" * 5000]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("instruction", [None, "Find the passage in Japanese"])
@pytest.mark.parametrize("max_length", [8192, 400])
def test_estimate_bounds_the_real_prompt_tokens(tokenizer: Any, instruction: str | None, max_length: int) -> None:
    builder = PromptBuilder(tokenizer, max_length)
    for query in ("what is a reranker", "ラーメン " * 40):
        prompts = builder.build(query, TEXTS, instruction)
        real = [len(ids) for ids in prompts.sequences]
        bounds = [estimate_prompt_tokens([RerankQuery(query, [doc], instruction)], max_length) for doc in TEXTS]
        assert all(r <= b <= max_length for r, b in zip(real, bounds)), (real, bounds)
        assert estimate_prompt_tokens([RerankQuery(query, TEXTS, instruction)] * 2, max_length) == 2 * sum(bounds)


@pytest.mark.parametrize("max_chunks", [1, 2, 10, 1000])
@pytest.mark.parametrize("max_length", [8192, 400, 160])
def test_estimate_bounds_every_chunks_tokens(tokenizer: Any, max_length: int, max_chunks: int) -> None:
    """Chunked, a document's prompts are all its chunks: the estimate the limiter admits by
    bounds their sum. It counts the template and query in bytes, so it guesses more chunks than
    a document needs where they are a large part of max_length (the limiter refunds it); where
    a document's bytes fit one chunk, it is the unchunked estimate."""
    builder = PromptBuilder(tokenizer, max_length)
    query = "what is a reranker"
    prompts = builder.build(query, TEXTS, None, PromptOptions(max_chunks=max_chunks))
    rows = iter(prompts.sequences)
    for doc, chunks in zip(TEXTS, prompts.chunks, strict=True):
        real = sum(len(next(rows)) for _ in range(chunks))
        chunked = RerankQuery(query, [doc], options=PromptOptions(max_chunks=max_chunks))
        bound = estimate_prompt_tokens([chunked], max_length)
        assert real <= bound <= max_chunks * max_length, (doc[:20], real, bound)
        unchunked = estimate_prompt_tokens([RerankQuery(query, [doc])], max_length)
        assert bound == unchunked or max_length < 8192
    assert max(prompts.chunks) > 1 or max_length == 8192 or max_chunks == 1


class Keys:
    """Every call is made by one key with ``tpm`` prompt tokens per minute."""

    def __init__(self, tpm: float) -> None:
        self.principal = Principal("key_t", "t", rate_limit_tpm=tpm)

    async def authenticate(self, api_key: str | None) -> Principal:
        return self.principal


@pytest.fixture
async def batcher() -> AsyncIterator[Batcher]:
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    yield batcher
    await batcher.close()


def call(docs: list[str]) -> RerankCall:
    return RerankCall([RerankQuery("what is a reranker", docs)], api_key="k")


async def test_calls_over_the_token_limit_are_refused_with_retry_after(batcher: Batcher) -> None:
    docs = ["word " * 100] * 4
    estimate = estimate_prompt_tokens(call(docs).queries, 8192)
    real = (await RerankCore(BatcherEngine(batcher), model_name="m").rerank(call(docs))).prompt_tokens
    assert real < estimate / 2  # the fake tokenizer makes a word one token: a loose bound
    tpm = estimate + 1.5 * real  # room for two calls only if each call's overestimate is refunded
    limiter = KeyRateLimiter(clock=lambda: 0.0)  # a frozen clock: nothing refills
    core = RerankCore(BatcherEngine(batcher), model_name="m", auth=Keys(tpm), limiter=limiter)
    await core.rerank(call(docs))
    await core.rerank(call(docs))
    with pytest.raises(ServiceError) as err:  # 0.5 * real tokens left: under the bound
        await core.rerank(call(docs))
    assert err.value.code is Code.RATE_LIMITED
    assert err.value.retry_after_s == pytest.approx(0.5 * real / (tpm / 60))
