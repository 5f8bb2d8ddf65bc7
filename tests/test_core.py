"""The core on its own: ranking, top_n, and multi-query calls that fail part-way."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.calls import RerankCall, RerankQuery, RerankReply
from service.core import RerankCore
from service.errors import Code, ServiceError
from service.local import BatcherEngine, score_request
from service.seams import ANONYMOUS, ModelInfo, Principal
from worker.batcher import Batcher, BatcherConfig
from worker.fake import FakeRunner
from worker.types import Device, DocScore, DType, PromptOptions, ScoreRequest, ScoreResult, Truncation


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
                           RerankQuery("too long", ["word " * 500], options=PromptOptions(Truncation.NONE))])
        with pytest.raises(ServiceError) as info:
            await core.rerank(call)
        assert info.value.code is Code.INVALID_ARGUMENT
        assert info.value.message.startswith("queries[1]: document 0 needs "), info.value.message
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


async def test_an_invalid_single_query_is_not_named_by_index() -> None:
    runner = FakeRunner(max_length=64)
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    core = RerankCore(BatcherEngine(batcher), model_name="fake")
    try:
        with pytest.raises(ServiceError) as info:
            await core.rerank(RerankCall([RerankQuery("q", ["word " * 500], options=PromptOptions(Truncation.NONE))]))
        assert info.value.message.startswith("document 0 needs "), info.value.message
    finally:
        await batcher.close()


class SpyEngine:
    """Records what reaches the worker; scores every document 0."""

    def __init__(self) -> None:
        self.requests: list[ScoreRequest] = []

    async def score(self, query: RerankQuery, tenant: str, priority: int) -> ScoreResult:
        self.requests.append(score_request(query, tenant, priority))  # as the worker would be asked
        return ScoreResult([DocScore(i, 0.5, 0.0, False) for i in range(len(query.documents))], 1)

    def info(self) -> ModelInfo:
        return ModelInfo("spy", 64, DType.FLOAT32, Device.CPU)

    def estimate_tokens(self, queries: Sequence[RerankQuery]) -> int:
        return 0


class OneKey:
    async def authenticate(self, api_key: str | None) -> Principal:
        return Principal(key_id="key-7", name="seven")


@pytest.mark.parametrize(("auth", "priority", "tenant", "expected"), [
    (None, None, ANONYMOUS.key_id, 0),  # --no-auth: the request's value, 0 when absent
    (None, 999, ANONYMOUS.key_id, 999),
    (OneKey(), 3, "key-7", 3),  # the key id is the tenant the scheduler shares by
])
async def test_tenant_and_priority_reach_every_query(auth: OneKey | None, priority: int | None, tenant: str,
                                                     expected: int) -> None:
    engine = SpyEngine()
    core = RerankCore(engine, model_name="spy", auth=auth)
    call = RerankCall([RerankQuery("q", ["a"]), RerankQuery("p", ["b", "c"])], priority=priority)
    reply = await core.rerank(call)
    assert [(r.tenant, r.priority) for r in engine.requests] == [(tenant, expected)] * 2
    assert all(r.documents is q.documents for r, q in zip(engine.requests, call.queries))  # never copied
    assert reply.warnings == []


@pytest.mark.parametrize("priority", [-1, 1000, 10**12])
async def test_a_priority_out_of_range_is_refused_before_any_work(priority: int) -> None:
    engine = SpyEngine()
    with pytest.raises(ServiceError) as info:
        await RerankCore(engine, model_name="spy").rerank(RerankCall([RerankQuery("q", ["a"])], priority=priority))
    assert info.value.code is Code.INVALID_ARGUMENT and "priority" in info.value.message
    assert engine.requests == []


def test_warnings_survive_the_idempotency_record() -> None:
    reply = RerankReply("r", "m", [], warnings=["priority clamped to 5"])
    assert RerankReply.from_json(reply.to_json()).warnings == ["priority clamped to 5"]
    legacy = '{"request_id": "r", "model": "m", "outcomes": [], "timings_ms": {}, "replayed": false}'
    assert RerankReply.from_json(legacy).warnings == []  # records stored before warnings existed


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


def test_the_fingerprint_of_a_body_never_changes() -> None:
    """Idempotency records outlive releases: a retry after an upgrade must hash to what the
    stored record holds, so these digests are pinned, not recomputed."""
    plain = RerankCall([RerankQuery(query="q", documents=["a", "b"])])
    full = RerankCall([RerankQuery(query="what is a panda", documents=["bears", "bamboo \u00e9"],
                                   instruction="Judge relevance", top_n=2, return_documents=True,
                                   options=PromptOptions(Truncation.NONE, 16)),
                       RerankQuery(query="p", documents=("c",))],
                      model="m", priority=5, request_id="r", idempotency_key="k")
    assert plain.fingerprint() == "3450fbae8c53efdf996fec08c499b7d575b03a63d7a0802baabf6466deae926b"
    assert full.fingerprint() == "c7455dd10abf61092ffb48ef02e8f96466b9b94b4c6737e47e4dead4b169fd17"


def test_the_chunk_cap_is_part_of_what_was_asked() -> None:
    """A call naming max_chunks_per_doc is another body than one naming none (whose digest is
    the one pinned above, from before the field): a retry must not replay the other's reply."""
    def body(n: int | None) -> str:
        query = RerankQuery(query="q", documents=["a", "b"], options=PromptOptions(max_chunks=n))
        return RerankCall([query]).fingerprint()

    assert body(None) == "3450fbae8c53efdf996fec08c499b7d575b03a63d7a0802baabf6466deae926b"
    assert len({body(None), body(1), body(3)}) == 3


# Pinned, computed before the prompt options travelled as one value: the idempotency records
# stored in databases hold these digests, so every body here must keep hashing to them.
PINNED_FINGERPRINTS = [
    (RerankCall([RerankQuery(query="q", documents=["a", "b"], options=PromptOptions(max_chunks=1))]),
     "8cef955aed692ed858b08c6e15c7580272feb8b9c786a5291de6d46650c9136b"),
    (RerankCall([RerankQuery(query="q", documents=["a", "b"], options=PromptOptions(max_chunks=3))]),
     "15e2520db05f42eb54991cccbaa7245be47a9414e4c181b8b862b4561b5f5414"),
    (RerankCall([RerankQuery(query="q", documents=["a", "b"], options=PromptOptions(max_document_tokens=7))]),
     "f3209a0b40a9959618bb4815ffd88873522584e5ab35e497688d7b56544275c9"),
    (RerankCall([RerankQuery(query="q", documents=["a", "b"], options=PromptOptions(Truncation.NONE))]),
     "fec565a96db61da436ba268b1c2a0dbbe176afc4ee0267201ef04e42566dd8b8"),
    (RerankCall([RerankQuery(query="long read", documents=["x" * 40, "\u65e5\u672c"], instruction="", top_n=1,
                             options=PromptOptions(Truncation.NONE, 512, 1000))],
                model="qwen3-reranker-0.6b"),
     "0ef9a3d7b29ec7c60f68d78d65c02a4fdb071119bd4449037ebed4427c3a9fca"),
    (RerankCall([RerankQuery(query="a", documents=["1"], options=PromptOptions(max_chunks=2)),
                 RerankQuery(query="b", documents=["2", "3"], options=PromptOptions(max_document_tokens=1),
                             return_documents=True),
                 RerankQuery(query="c", documents=["4"])], priority=9, idempotency_key="k"),
     "67deee73b9e90502b0a4fd64ccc7a45c769e6a7e9608b3e0b18eaca9db7ed5fc"),
]


@pytest.mark.parametrize(("call", "digest"), PINNED_FINGERPRINTS)
def test_every_prompt_option_hashes_as_it_always_did(call: RerankCall, digest: str) -> None:
    """Each prompt option alone, all of them, and a batch mixing them: pinned digests (above)."""
    assert call.fingerprint() == digest


@pytest.mark.parametrize(("auth", "tenant"), [
    (None, "key_a"),  # no keys here: the front that called names whose share it spends
    (OneKey(), "key-7"),  # a keyed caller is its own tenant, whatever it claims
])
async def test_on_behalf_of_names_the_tenant_only_without_keys(auth: OneKey | None, tenant: str) -> None:
    engine = SpyEngine()
    await RerankCore(engine, model_name="spy", auth=auth).rerank(
        RerankCall([RerankQuery("q", ["a"])], on_behalf_of="key_a"))
    assert [r.tenant for r in engine.requests] == [tenant]
