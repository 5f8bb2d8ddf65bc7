"""The gRPC front under hostile traffic, at the wire level: raw request bytes through a
generic ``unary_unary`` with identity serializers, so nothing client-side fixes them first.

Every call must end in a status that says what the caller did (INVALID_ARGUMENT,
UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...) or a retryable UNAVAILABLE: never INTERNAL or
UNKNOWN (docs/SECURITY.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator

import grpc
import pytest
from rerank.v1 import rerank_pb2 as pb
from serving import eventually, running_app, target

from service.app import App
from service.config import add_arguments, from_args
from service.edge import GrpcLimits
from worker.fake import FakeRunner

RERANK = "/rerank.v1.RerankService/Rerank"
BATCH = "/rerank.v1.RerankService/RerankBatch"
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(FakeRunner(max_length=64), max_request_bytes=2**16) as served:
        yield served


async def raw_call(app: App, method: str, data: bytes,
                   metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(target(app)) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            await call(data, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""


def field(message: type, name: str, value: bytes) -> bytes:
    """A length-delimited field, bytes as given (a real client would refuse to encode them)."""
    number = message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]
    assert number < 16 and len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


@pytest.mark.parametrize("data", [
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a length varint that never ends
    b"\x0a\x10abc",  # a length past the end
    b"\x0f",  # wire type 7
    b"\x00\x01",  # field number 0
    bytes(range(256)),
])
async def test_corrupt_protobuf_is_invalid_argument_and_not_called_utf8(app: App, data: bytes) -> None:
    code, details = await raw_call(app, RERANK, data)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed protobuf" in details and "UTF-8" not in details, details


async def test_invalid_utf8_names_the_field(app: App) -> None:
    R = pb.RerankRequest
    code, details = await raw_call(app, RERANK, field(R, "query", b"q") + field(R, "documents", b"ok")
                                   + field(R, "documents", b"bad \xff"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "documents[1] is not valid UTF-8" in details, details


async def test_invalid_utf8_in_a_batch_names_the_query(app: App) -> None:
    good = pb.BatchQuery(query="q", documents=["a"]).SerializeToString()
    bad = field(pb.BatchQuery, "query", b"q") + field(pb.BatchQuery, "documents", b"\xc3")
    data = field(pb.RerankBatchRequest, "queries", good) + field(pb.RerankBatchRequest, "queries", bad)
    code, details = await raw_call(app, BATCH, data)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "queries[1].documents[0] is not valid UTF-8" in details


async def test_a_batch_error_from_the_model_names_its_query(app: App) -> None:
    request = pb.RerankBatchRequest(queries=[pb.BatchQuery(query="q", documents=["short"]),
                                             pb.BatchQuery(query="q", documents=["word " * 200],
                                                           truncation=pb.TRUNCATION_NONE)])
    code, details = await raw_call(app, BATCH, request.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("queries[1]: document 0 needs"), details


@pytest.mark.parametrize(("authorization", "says"), [
    ("Basic dXNlcjpwYXNz", "'Basic' scheme"),
    ("rk_live_barekey", "no scheme"),
    ("Bearer", "carries no key"),
])
async def test_the_bearer_rule_is_the_http_one(app: App, authorization: str, says: str) -> None:
    data = pb.RerankRequest(query="q", documents=["a"]).SerializeToString()
    code, details = await raw_call(app, RERANK, data, (("authorization", authorization),))
    assert code is grpc.StatusCode.UNAUTHENTICATED and says in details, details


async def test_random_bytes_never_make_an_internal_error(app: App) -> None:
    rng = random.Random(0)
    for method in (RERANK, BATCH, "/rerank.v1.RerankService/GetModelInfo"):
        for _ in range(100):
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
            code, details = await raw_call(app, method, data)
            assert code not in NEVER, (method, data, details)


async def test_an_oversized_message_is_resource_exhausted(app: App) -> None:
    data = pb.RerankRequest(query="q", documents=["x" * 2**16]).SerializeToString()
    code, _ = await raw_call(app, RERANK, data)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_calls_during_the_drain_delay_are_taken(app: App) -> None:
    """docs/OPERATIONS.md: NOT_SERVING during --drain-delay-s, calls still served."""
    await app.drain()
    data = pb.RerankRequest(query="q", documents=["a"]).SerializeToString()
    assert (await raw_call(app, RERANK, data))[0] is grpc.StatusCode.OK


async def test_a_call_cut_at_the_end_of_the_grace_period_is_retryable() -> None:
    runner = FakeRunner()
    async with running_app(runner) as app:
        runner.gate.clear()
        data = pb.RerankRequest(query="q", documents=["a"]).SerializeToString()
        call = asyncio.create_task(raw_call(app, RERANK, data))
        await asyncio.to_thread(runner.entered.wait, 5)
        stopping = asyncio.create_task(app.stop(grace_s=0.5))
        code, details = await call
        runner.gate.set()
        await stopping
    assert code is grpc.StatusCode.UNAVAILABLE, (code, details)


async def test_a_cut_call_says_why_and_when_to_retry() -> None:
    """Like HTTP's JSON 503 with Retry-After: the cut call is told the server is shutting down
    and given a retry hint, not grpcio's bare "Cancelling all calls"; its work is not billed."""
    from clients import AsyncRerankClient, RerankError

    runner = FakeRunner()
    async with running_app(runner) as app, AsyncRerankClient(target(app), retries=0) as client:
        runner.gate.clear()
        call = asyncio.create_task(client.rerank("q", ["a"]))
        await asyncio.to_thread(runner.entered.wait, 5)
        stopping = asyncio.create_task(app.stop(grace_s=0.5))
        with pytest.raises(RerankError) as cut:
            await call
        runner.gate.set()
        await stopping
    assert cut.value.code is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in cut.value.details and cut.value.retry_after_s == 1.0


# -- the server's limits (--grpc-*: docs/SECURITY.md) ----------------------------------------
async def test_calls_past_the_concurrent_rpc_cap_are_resource_exhausted() -> None:
    runner = FakeRunner()
    data = pb.RerankRequest(query="q", documents=["a"]).SerializeToString()
    async with running_app(runner, grpc_max_concurrent_rpcs=1) as app:
        runner.gate.clear()
        held = asyncio.create_task(raw_call(app, RERANK, data))
        await asyncio.to_thread(runner.entered.wait, 5)
        code, details = await raw_call(app, RERANK, data)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        runner.gate.set()
        assert (await held)[0] is grpc.StatusCode.OK
        assert (await raw_call(app, RERANK, data))[0] is grpc.StatusCode.OK  # the cap frees


async def test_oversized_metadata_is_resource_exhausted() -> None:
    data = pb.RerankRequest(query="q", documents=["a"]).SerializeToString()
    async with running_app(grpc_max_metadata_bytes=2048) as app:
        assert (await raw_call(app, RERANK, data, (("x-pad", "a" * 512),)))[0] is grpc.StatusCode.OK
        for _ in range(20):  # every time, not by chance (grpcio's soft limit refuses at random)
            code, details = await raw_call(app, RERANK, data, (("x-pad", "a" * 4096),))
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)


async def test_an_idle_connection_is_closed() -> None:
    async with running_app(grpc_max_connection_idle_s=0.2) as app, \
            grpc.aio.insecure_channel(target(app)) as channel:
        call = channel.unary_unary(RERANK, request_serializer=None, response_deserializer=None)
        await call(pb.RerankRequest(query="q", documents=["a"]).SerializeToString(), timeout=10)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        await eventually(lambda: channel.get_state() is grpc.ChannelConnectivity.IDLE)  # the server's GOAWAY


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(GrpcLimits)])
def test_each_grpc_limit_is_a_flag_that_must_be_positive(name: str) -> None:
    flag = "--grpc-" + name.replace("_", "-")
    parser = argparse.ArgumentParser()
    add_arguments(parser, env={})
    config = from_args(parser.parse_args([flag, "7"]))
    assert getattr(config.grpc_limits(), name) == 7
    with pytest.raises(ValueError, match=flag):
        from_args(parser.parse_args([flag, "0"])).grpc_limits()
