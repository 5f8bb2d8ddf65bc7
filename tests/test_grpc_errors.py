"""Every error path returns its gRPC status, over a real server, with the real client.

Cancellation and deadlines are checked where they matter: in the worker. A caller that gives
up must leave nothing for the model to compute.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from rerank.v1 import rerank_pb2 as pb
from serving import eventually, running_app, target

from clients import AsyncRerankClient, Query, RerankError
from service.app import App
from worker.fake import FakeRunner

LIMITS = {"max_documents": 5, "max_queries": 2, "max_document_chars": 1000}

BAD_CALLS = [
    # (what, call kwargs, status, words the message must contain)
    ("empty query", {"query": "", "documents": ["d"]}, "INVALID_ARGUMENT", "query is empty"),
    ("blank query", {"query": " \n ", "documents": ["d"]}, "INVALID_ARGUMENT", "query is empty"),
    ("no documents", {"query": "q", "documents": []}, "INVALID_ARGUMENT", "documents is empty"),
    ("too many documents", {"query": "q", "documents": ["d"] * 6}, "INVALID_ARGUMENT", "limit is 5"),
    ("document too long in characters", {"query": "q", "documents": ["x" * 1001]}, "INVALID_ARGUMENT",
     "documents[0] has 1001 characters"),
    ("too long in tokens with truncation and chunking off",
     {"query": "q", "documents": ["short", "word " * 80], "truncate": False, "max_chunks_per_doc": 1},
     "INVALID_ARGUMENT", "document 1 needs"),
    ("too long for its chunks with truncation off",
     {"query": "q", "documents": ["short", "word " * 80], "truncate": False, "max_chunks_per_doc": 2},
     "INVALID_ARGUMENT", "document 1 needs"),
    ("max_chunks_per_doc 0", {"query": "q", "documents": ["d"], "max_chunks_per_doc": 0}, "INVALID_ARGUMENT",
     "max_chunks_per_doc must be at least 1"),
    ("max_chunks_per_doc negative", {"query": "q", "documents": ["d"], "max_chunks_per_doc": -3},
     "INVALID_ARGUMENT", "got -3"),
    ("lone surrogate (refused by the client)", {"query": "q", "documents": ["\ud800"]}, "INVALID_ARGUMENT",
     "surrogates not allowed"),
    ("unknown model", {"query": "q", "documents": ["d"], "model": "other"}, "NOT_FOUND", "not served here"),
]


@pytest.mark.parametrize(("what", "kwargs", "status", "words"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
async def test_bad_calls_get_a_status_and_a_message_that_says_what_is_wrong(
        what: str, kwargs: dict[str, object], status: str, words: str) -> None:
    async with running_app(FakeRunner(max_length=64), **LIMITS) as app, \
            AsyncRerankClient(target(app), retries=0) as client:
        query, documents = kwargs.pop("query"), kwargs.pop("documents")
        with pytest.raises(RerankError) as err:
            await client.rerank(query, documents, **kwargs)  # type: ignore[arg-type]
        assert err.value.code.name == status
        assert words in err.value.details
        assert len((await client.rerank("still serving", ["d"])).results) == 1


async def test_batch_limits_count_every_query() -> None:
    async with running_app(**LIMITS) as app, AsyncRerankClient(target(app), retries=0) as client:
        with pytest.raises(RerankError) as too_many_queries:
            await client.rerank_batch([Query("q", ["d"])] * 3)
        with pytest.raises(RerankError) as too_many_docs:
            await client.rerank_batch([Query("q", ["d"] * 3), Query("p", ["d"] * 3)])
        with pytest.raises(RerankError) as bad_second:
            await client.rerank_batch([Query("q", ["d"]), Query("", ["d"])])
    assert "3 queries" in too_many_queries.value.details
    assert "6 documents" in too_many_docs.value.details
    assert bad_second.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "queries[1].query is empty" in bad_second.value.details


async def test_invalid_utf8_on_the_wire_is_a_clean_invalid_argument() -> None:
    raw = pb.RerankRequest(query="QQ", documents=["dd"]).SerializeToString().replace(b"QQ", b"\xff\xfe")
    async with running_app() as app, grpc.aio.insecure_channel(target(app)) as channel:
        send_bytes = channel.unary_unary("/rerank.v1.RerankService/Rerank")  # no serializer: raw bytes
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send_bytes(raw, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (err.value.details() or "")
        assert app.metrics.registry.get_sample_value(
            "rerank_requests_total", {"method": "Rerank", "code": "INVALID_ARGUMENT"}) == 1
        async with AsyncRerankClient(target(app)) as client:
            assert len((await client.rerank("still serving", ["d"])).results) == 1


async def test_a_message_over_the_size_limit_is_resource_exhausted() -> None:
    async with running_app(max_request_bytes=64 * 1024) as app, \
            AsyncRerankClient(target(app), retries=0) as client:
        with pytest.raises(RerankError) as err:
            await client.rerank("q", ["x" * 40_000, "y" * 40_000])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len((await client.rerank("q", ["x" * 40_000])).results) == 1


async def test_a_model_fault_is_internal_and_the_server_keeps_serving() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app), retries=0) as client:
        runner.fail_next = True
        with pytest.raises(RerankError) as err:
            await client.rerank("q", ["d"])
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert len((await client.rerank("q", ["d"])).results) == 1


# -- overload, deadlines, cancellation: the worker's side --------------------------------------
async def hold_the_model(runner: FakeRunner, client: AsyncRerankClient) -> asyncio.Task[object]:
    """A one-document call that sits in the model until ``runner.gate`` is set."""
    runner.gate.clear()
    runner.entered.clear()
    task: asyncio.Task[object] = asyncio.create_task(client.rerank("hold the model", ["x"]))
    await asyncio.to_thread(runner.entered.wait, 5)
    return task


def cancelled_calls(app: App) -> float:
    return app.metrics.registry.get_sample_value(
        "rerank_requests_total", {"method": "Rerank", "code": "CANCELLED"}) or 0.0


async def test_overload_is_resource_exhausted_with_a_retry_hint() -> None:
    runner = FakeRunner()
    async with running_app(runner, max_queued_docs=4) as app, \
            AsyncRerankClient(target(app), retries=0) as client:
        blocker = await hold_the_model(runner, client)
        queued = asyncio.create_task(client.rerank("fills the queue", ["a", "b", "c", "d"]))
        await eventually(lambda: app.batcher is not None and app.batcher.queued_docs == 4)
        with pytest.raises(RerankError) as err:
            await client.rerank("one too many", ["e"])
        runner.gate.set()
        await asyncio.gather(blocker, queued)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
    assert "queued" in err.value.details


async def test_a_passed_deadline_leaves_no_work_behind() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app)) as client:
        blocker = await hold_the_model(runner, client)
        with pytest.raises(RerankError) as err:
            await client.rerank("gives up", ["a", "b", "c"], timeout_s=0.2)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await _assert_dropped(app, runner, blocker)


async def test_a_cancelled_call_leaves_no_work_behind() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app)) as client:
        blocker = await hold_the_model(runner, client)
        gone = asyncio.create_task(client.rerank("gives up", ["a", "b", "c"]))
        await eventually(lambda: app.batcher is not None and app.batcher.queued_docs == 3)
        gone.cancel()
        await _assert_dropped(app, runner, blocker)


async def _assert_dropped(app: App, runner: FakeRunner, blocker: asyncio.Task[object]) -> None:
    """The abandoned three-document call reached the worker as a cancellation, and its
    documents never reach the model, while everyone else is still served."""
    await eventually(lambda: cancelled_calls(app) == 1)
    runner.gate.set()
    await blocker
    async with AsyncRerankClient(target(app)) as probe:
        await probe.rerank("after", ["z"])
    assert [len(batch) for batch in runner.batches] == [1, 1]
    assert app.batcher is not None and app.batcher.queued_docs == 0


@pytest.mark.parametrize("priority", [-1, 1000, 2**31 - 1])
async def test_a_priority_out_of_range_is_invalid_argument_naming_it(priority: int) -> None:
    from rerank.v1 import rerank_pb2_grpc as pb_grpc

    async with running_app(FakeRunner(max_length=64), **LIMITS) as app, \
            grpc.aio.insecure_channel(target(app)) as channel:
        stub = pb_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Rerank(pb.RerankRequest(query="q", documents=["d"], priority=priority))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert "priority must be an integer from 0 to 999" in details and details.endswith(f"got {priority}")
        with pytest.raises(grpc.aio.AioRpcError) as batch_err:
            await stub.RerankBatch(pb.RerankBatchRequest(queries=[pb.BatchQuery(query="q", documents=["d"])],
                                                         priority=priority))
        assert batch_err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        ok = await stub.Rerank(pb.RerankRequest(query="q", documents=["d"], priority=999))
        assert len(ok.results) == 1 and list(ok.warnings) == []
