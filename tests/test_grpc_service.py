"""The gRPC service over a real grpc.aio server on port 0, called with the real clients.

The fake runner's log-odds depend only on a prompt's ids (``worker.fake.fake_logit``), so
expected results are computed from the prompts, independently of how the server batched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rerank.v1 import rerank_pb2 as pb
from serving import eventually, running_app, target

from clients import AsyncRerankClient, Query, RerankClient, RerankError
from service.app import CoreParts
from service.errors import Code, ServiceError
from service.seams import Principal
from worker.fake import FakeRunner, fake_logit

DOCS = ["The giant panda is a bear native to China.", "Paris is the capital of France.",
        "Pandas eat bamboo almost exclusively.", "A tiny note."]


def expected_logits(runner: FakeRunner, query: str, docs: Sequence[str], instruction: str | None = None) -> list[float]:
    prompts = runner.builder.build(query, docs, instruction)
    return [fake_logit(ids) for ids in prompts.sequences]


def ranking(logits: list[float]) -> list[int]:
    return sorted(range(len(logits)), key=lambda i: (-logits[i], i))


async def test_rerank_ranks_every_document_with_its_own_scores() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app)) as client:
        got = await client.rerank("what do pandas eat?", DOCS, instruction="Find facts", request_id="req-1")
    want = expected_logits(runner, "what do pandas eat?", DOCS, "Find facts")
    assert got.indices == ranking(want)
    assert [r.logit for r in got.results] == pytest.approx([want[i] for i in got.indices], abs=1e-12)
    assert all(0 < r.score < 1 and r.document is None and not r.truncated for r in got.results)
    assert (got.request_id, got.model, got.usage.documents) == ("req-1", "fake", len(DOCS))
    assert got.usage.computed_tokens < got.usage.prompt_tokens  # the shared prefix ran once


async def test_top_n_and_return_documents() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app)) as client:
        got = await client.rerank("pandas", DOCS, top_n=2, return_documents=True)
    best = ranking(expected_logits(runner, "pandas", DOCS))[:2]
    assert got.indices == best
    assert [r.document for r in got.results] == [DOCS[i] for i in best]
    assert got.usage.documents == len(DOCS)  # every document is billed, not only the top_n


async def test_rerank_batch_equals_one_call_per_query() -> None:
    runner = FakeRunner()
    queries = [Query("pandas", DOCS[:3], top_n=1), Query("france", DOCS, instruction="Find capitals")]
    async with running_app(runner) as app, AsyncRerankClient(target(app)) as client:
        batch = await client.rerank_batch(queries)
        singles = [await client.rerank(q.query, q.documents, instruction=q.instruction, top_n=q.top_n)
                   for q in queries]
    assert [b.results for b in batch] == [s.results for s in singles]
    assert [b.usage.documents for b in batch] == [3, 4]


async def test_model_info_reports_the_model_and_limits() -> None:
    async with running_app(max_documents=7, max_request_bytes=2**20) as app, \
            AsyncRerankClient(target(app)) as client:
        info = await client.model_info()
    assert (info.model, info.max_length, info.device) == ("fake", 8192, "cpu")
    assert (info.limits.max_documents, info.limits.max_request_bytes) == (7, 2**20)


async def test_the_blocking_client_works_too() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app:
        def call() -> list[int]:
            with RerankClient(target(app)) as client:
                return client.rerank("pandas", DOCS).indices

        assert await asyncio.to_thread(call) == ranking(expected_logits(runner, "pandas", DOCS))


async def test_concurrent_callers_are_batched_together_and_get_their_own_results() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app)) as client:
        runner.gate.clear()
        runner.entered.clear()
        blocker = asyncio.create_task(client.rerank("hold the model", ["x"]))
        await asyncio.to_thread(runner.entered.wait, 5)
        queries = [f"query number {n}" for n in range(6)]
        calls = [asyncio.create_task(client.rerank(q, DOCS[n % 3:n % 3 + 2])) for n, q in enumerate(queries)]
        assert app.batcher is not None
        await eventually(lambda: app.batcher is not None and app.batcher.queued_docs == 12)
        runner.gate.set()
        results = await asyncio.gather(*calls)
        await blocker
    for n, (q, got) in enumerate(zip(queries, results)):
        want = expected_logits(runner, q, DOCS[n % 3:n % 3 + 2])
        assert [r.logit for r in got.results] == pytest.approx(sorted(want, reverse=True), abs=1e-12)
    assert [len(b) for b in runner.batches] == [1, 12]  # six callers, one model batch


async def test_api_key_reaches_the_core_from_bearer_metadata() -> None:
    class Keys:
        def __init__(self) -> None:
            self.seen: list[str | None] = []

        async def authenticate(self, api_key: str | None) -> Principal:
            self.seen.append(api_key)
            if api_key != "sk-good":
                raise ServiceError(Code.UNAUTHENTICATED, "unknown API key")
            return Principal("k1", "tester")

    keys = Keys()
    async with running_app(parts=CoreParts(auth=keys)) as app:
        async with AsyncRerankClient(target(app), api_key="sk-good") as good:
            assert len((await good.rerank("q", ["d"])).results) == 1
        async with AsyncRerankClient(target(app), api_key="sk-bad") as bad:
            with pytest.raises(RerankError) as err:
                await bad.rerank("q", ["d"])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert keys.seen == ["sk-good", "sk-bad"]


async def test_one_access_log_line_per_call_without_text_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    async with running_app() as app, AsyncRerankClient(target(app), api_key="sk-secret") as client:
        with caplog.at_level(logging.INFO, logger="rerank.access"):
            await client.rerank("secret query words", ["confidential document body"], request_id="r-42")
            with pytest.raises(RerankError):
                await client.rerank("  ", ["confidential document body"])
    lines = [r.getMessage() for r in caplog.records if r.name == "rerank.access"]
    assert len(lines) == 2
    assert "code=OK" in lines[0] and "request_id=r-42" in lines[0] and "documents=1" in lines[0]
    assert "code=INVALID_ARGUMENT" in lines[1]
    for text in ("secret query", "confidential", "sk-secret"):
        assert not any(text in line for line in lines)


async def test_metrics_count_requests_batches_and_documents() -> None:
    async with running_app() as app, AsyncRerankClient(target(app)) as client:
        await client.rerank("pandas", DOCS)
        with pytest.raises(RerankError):
            await client.rerank("pandas", [])
        sample = app.metrics.registry.get_sample_value
        assert sample("rerank_requests_total", {"method": "Rerank", "code": "OK"}) == 1
        assert sample("rerank_requests_total", {"method": "Rerank", "code": "INVALID_ARGUMENT"}) == 1
        assert sample("rerank_documents_scored_total") == len(DOCS)
        assert sample("rerank_batch_rows_count") == 1
        assert sample("rerank_batch_tokens_sum") > 0
        assert sample("rerank_queue_documents") == 0 and sample("rerank_queue_tokens") == 0
        assert sample("rerank_queue_max_documents") == app.batcher.config.max_queued_docs  # type: ignore[union-attr]
        assert sample("rerank_ready") == 1


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    import urllib.request

    async with running_app(metrics_port=0) as app, AsyncRerankClient(target(app)) as client:
        await client.rerank("pandas", DOCS)
        (endpoint,) = [c for c in app.components if hasattr(c, "metrics")]
        url = f"http://127.0.0.1:{endpoint.port}/metrics"  # type: ignore[attr-defined]
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'rerank_requests_total{code="OK",method="Rerank"} 1.0' in body
    assert "rerank_batch_padding_ratio_bucket" in body


# -- health, reflection, shutdown ------------------------------------------------------------
async def health_status(app_target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(app_target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=5)
    return int(reply.status)


async def test_health_is_not_serving_until_warm_then_serving_then_not_while_draining() -> None:
    import threading

    loaded = threading.Event()
    runner = FakeRunner()

    def slow_load() -> FakeRunner:
        loaded.wait(10)
        return runner

    from service.app import App
    from service.config import ServeConfig

    app = App(ServeConfig(model="fake", host="127.0.0.1", grpc_port=0, http_port=0), load_runner=slow_load,
              core_parts=CoreParts())
    await app.start()
    try:
        for service in ("", "rerank.v1.RerankService"):
            assert await health_status(target(app), service) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with AsyncRerankClient(target(app), retries=0) as client:
            with pytest.raises(RerankError) as err:
                await client.rerank("q", ["d"])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.retry_after_s == 1.0
            loaded.set()
            await app.wait_ready()
            assert await health_status(target(app)) == health_pb2.HealthCheckResponse.SERVING
            await app.drain()
            assert await health_status(target(app)) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert len((await client.rerank("q", ["d"])).results) == 1  # draining still serves
    finally:
        loaded.set()
        await app.stop(grace_s=0)


async def test_reflection_lists_and_describes_the_service() -> None:
    async with running_app() as app, grpc.aio.insecure_channel(target(app)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="rerank.v1.RerankService")]
        replies = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=5)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"rerank.v1.RerankService", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    file = descriptor_pb2.FileDescriptorProto.FromString(replies[1].file_descriptor_response.file_descriptor_proto[0])
    assert [m.name for m in file.service[0].method] == ["Rerank", "RerankBatch", "GetModelInfo"]


async def test_shutdown_finishes_in_flight_calls_and_refuses_new_ones() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app), retries=0) as client:
        runner.gate.clear()
        runner.entered.clear()
        in_flight = asyncio.create_task(client.rerank("slow", DOCS))
        await asyncio.to_thread(runner.entered.wait, 5)
        stopping = asyncio.create_task(app.stop(grace_s=10))
        await eventually(lambda: app.grpc.stopping)
        with pytest.raises(RerankError) as err:
            await client.rerank("too late", ["d"], timeout_s=5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        runner.gate.set()
        assert len((await in_flight).results) == len(DOCS)
        await stopping


async def test_unknown_truncation_value_is_invalid_argument() -> None:
    # a newer client's enum value reaches an older server as a bare number
    async with running_app() as app, grpc.aio.insecure_channel(target(app)) as channel:
        call = channel.unary_unary("/rerank.v1.RerankService/Rerank",
                                   request_serializer=pb.RerankRequest.SerializeToString,
                                   response_deserializer=pb.RerankResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(pb.RerankRequest(query="q", documents=["d"], truncation=7), timeout=5)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncation" in (err.value.details() or "")


def test_connection_age_is_off_unless_asked() -> None:
    from service.grpc.servicer import connection_options

    assert connection_options(None) == []
    assert dict(connection_options(300))["grpc.max_connection_age_ms"] == 300_000
