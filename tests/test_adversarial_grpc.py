"""The gRPC front under hostile traffic, at the wire level: raw request bytes through a
generic ``unary_unary`` with identity serializers, so nothing client-side fixes them first,
and raw HTTP/2 frames (``h2_support``) where a caller announces more than it sends.

Every call must end in a status that says what the caller did (INVALID_ARGUMENT,
UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...) or a retryable UNAVAILABLE: never INTERNAL or
UNKNOWN (docs/SECURITY.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc
import pytest
from h2_support import RawCall, RawConnection
from rerank.v1 import rerank_pb2 as pb
from serving import eventually, running_app, target

from service.app import App, CoreParts
from service.config import add_arguments, from_args
from service.edge import GrpcLimits
from service.errors import Code, ServiceError
from service.grpc.edge import BUDGET_WAIT_S
from service.memory import Trimmer
from service.seams import Principal
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


# -- keyless callers and large messages (KeyGuard, --grpc-max-message-bytes-in-flight) -------
GOOD_KEY = "rk_live_" + "g" * 43
KEYED = (("authorization", f"Bearer {GOOD_KEY}"),)
MIB = 2**20
STREAM_WINDOW = 65_535  # HTTP/2's initial window: all a keyless call may send (BDP probing off)


class Keys:
    """One valid key; counts lookups."""

    def __init__(self) -> None:
        self.lookups = 0

    async def authenticate(self, api_key: str | None) -> Principal:
        self.lookups += 1
        if not api_key:
            raise ServiceError(Code.UNAUTHENTICATED, "missing API key")
        if api_key != GOOD_KEY:
            raise ServiceError(Code.UNAUTHENTICATED, "unknown API key")
        return Principal("key_good", "good")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # the server runs in this process; the raw client holds one payload
        return int(f.read().split()[1]) * 4096


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """The most resident memory seen while the block runs (sampled every 10 ms), in ``[0]``."""
    peak, stop = [rss_bytes()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def message_of(size: int) -> memoryview:
    """A valid RerankRequest of exactly ``size`` bytes: one document of x's."""
    chars = size - 16
    while len(data := pb.RerankRequest(query="q", documents=["x" * chars]).SerializeToString()) != size:
        chars += size - len(data)
    return memoryview(data)


async def flood(app: App, payload: memoryview, calls: int, per_connection: int,
                metadata: tuple[tuple[str, str], ...] = ()) -> list[RawCall]:
    """``calls`` calls at once, each announcing all of ``payload``, on raw connections."""
    conns = [await RawConnection.open("127.0.0.1", app.grpc.port) for _ in range(-(-calls // per_connection))]
    try:
        return await asyncio.wait_for(asyncio.gather(
            *(conns[i // per_connection].call(RERANK, payload, len(payload), metadata) for i in range(calls))), 60)
    finally:
        for conn in conns:
            await conn.close()


@pytest.fixture
async def keyed_app() -> AsyncIterator[tuple[App, Keys]]:
    keys = Keys()
    async with running_app(parts=CoreParts(auth=keys)) as served:  # --max-request-bytes at its 16 MiB
        yield served, keys


async def test_memory_comes_back_after_a_burst_of_large_keyed_messages(keyed_app: tuple[App, Keys]) -> None:
    """Keyed calls may carry large messages (here 3 rounds of 16 at 14 MiB, refused by the core
    after they are read): once they are done, resident memory returns to within 100 MiB of
    idle (freed messages go back to the OS: service.memory.Trimmer; no call's frames keep
    its message: service.grpc.edge._without_frames). First of the memory tests: a process
    whose heap an earlier test has grown would pass it whatever the server did."""
    app, _ = keyed_app
    payload = message_of(14 * MIB)
    await flood(app, message_of(1000), 8, 8, KEYED)
    idle = rss_bytes()
    for _ in range(3):
        calls = await flood(app, payload, 16, 16, KEYED)
        assert all(c.status == grpc.StatusCode.INVALID_ARGUMENT.value[0] for c in calls)
    deadline = time.monotonic() + 5
    while rss_bytes() - idle > 100 * MIB and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert rss_bytes() - idle <= 100 * MIB, f"RSS {idle / MIB:.0f} -> {rss_bytes() / MIB:.0f} MiB"


async def test_a_keyless_flood_of_large_messages_is_refused_before_its_bytes(keyed_app: tuple[App, Keys]) -> None:
    """The issue's attack: 128 calls at once, without a key or with a bad one, each announcing a
    14 MiB message (under --max-request-bytes). Each is UNAUTHENTICATED having sent at most one
    HTTP/2 stream window, the server's memory does not grow by their messages, and a keyed
    caller is served meanwhile. Before KeyGuard each message was received whole (1.8 GB)."""
    app, keys = keyed_app
    payload = message_of(14 * MIB)
    await flood(app, message_of(1000), 8, 8, KEYED)  # grpcio's own buffers, before the baseline
    idle = rss_bytes()
    with peak_rss() as peak:
        keyless = asyncio.gather(flood(app, payload, 64, 32), flood(app, payload, 64, 32,
                                                                    (("authorization", "Bearer rk_live_bad"),)))
        served = await asyncio.gather(*(raw_call(app, RERANK, bytes(message_of(1000)), KEYED) for _ in range(8)))
        calls = [c for batch in await keyless for c in batch]
    assert {c.status for c in calls} == {grpc.StatusCode.UNAUTHENTICATED.value[0]}, {c.status for c in calls}
    assert max(c.sent for c in calls) <= STREAM_WINDOW, sorted(c.sent for c in calls)[-5:]
    assert (peak[0] - idle) < 64 * MIB, f"RSS {idle / MIB:.0f} -> {peak[0] / MIB:.0f} MiB"
    assert [code for code, _ in served] == [grpc.StatusCode.OK] * 8, served


@pytest.mark.parametrize("bdp_probe", [False, True])
async def test_the_window_of_a_keyless_call_does_not_grow_with_traffic(bdp_probe: bool) -> None:
    """grpcio's BDP probing grows the windows it grants while data flows (to megabytes); off
    (the default; --grpc-bdp-probe turns it on), each keyless call of a 200-call flood on two
    connections sends one window."""
    async with running_app(parts=CoreParts(auth=Keys()), grpc_bdp_probe=bdp_probe) as app:
        calls = await flood(app, message_of(14 * MIB), 200, 100)
    assert {c.status for c in calls} == {grpc.StatusCode.UNAUTHENTICATED.value[0]}
    largest = max(c.sent for c in calls)
    assert largest > 4 * STREAM_WINDOW if bdp_probe else largest <= STREAM_WINDOW, largest


async def test_a_keyed_call_is_looked_up_once(keyed_app: tuple[App, Keys]) -> None:
    """KeyGuard's check answers the core's: a valid call costs one key lookup, as before."""
    app, keys = keyed_app
    before = keys.lookups
    assert (await raw_call(app, RERANK, bytes(message_of(1000)), KEYED))[0] is grpc.StatusCode.OK
    assert keys.lookups - before == 1


async def test_a_failing_key_store_is_internal_never_unknown() -> None:
    """A key store that raises something other than a ServiceError (a bug) fails the call
    with INTERNAL, as the servicer would, before the message is read."""
    class Broken:
        async def authenticate(self, api_key: str | None) -> Principal:
            raise RuntimeError("a bug in the key store")

    async with running_app(parts=CoreParts(auth=Broken())) as app:
        code, details = await raw_call(app, RERANK, bytes(message_of(1000)), KEYED)
    assert code is grpc.StatusCode.INTERNAL and "server log" in details, (code, details)


async def test_message_bytes_in_flight_are_capped_whatever_the_key() -> None:
    """--grpc-max-message-bytes-in-flight: a message being read holds --max-request-bytes of the
    budget; a call that finds no room within BUDGET_WAIT_S is RESOURCE_EXHAUSTED with
    retry-after-ms, keyed or not (here: --no-auth's anonymous caller), and the budget frees."""
    data = pb.RerankRequest(query="q", documents=["a"]).SerializeToString()
    async with running_app(max_request_bytes=MIB, grpc_max_message_bytes_in_flight=MIB) as app:
        conn = await RawConnection.open("127.0.0.1", app.grpc.port)
        held = asyncio.create_task(conn.call(RERANK, message_of(MIB - 100), MIB - 100, send_at_most=4096))
        await asyncio.sleep(0.2)  # its message is being read: the whole budget is reserved for it
        async with grpc.aio.insecure_channel(target(app)) as channel:
            call = channel.unary_unary(RERANK, request_serializer=None, response_deserializer=None)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(data, timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            assert time.monotonic() - started >= BUDGET_WAIT_S * 0.9
            assert dict(refused.value.trailing_metadata() or ())["retry-after-ms"] == "1000"
            held.cancel()
            await conn.close()
            await eventually(lambda: app.grpc.guard.budget.held == 0)
            assert await call(data, timeout=10)  # the budget came back


async def test_connections_past_the_cap_are_closed_and_the_cap_frees() -> None:
    """--grpc-max-connections: grpcio closes a connection past it as soon as it is accepted."""
    async with running_app(grpc_max_connections=2) as app:
        first = await RawConnection.open("127.0.0.1", app.grpc.port)
        second = await RawConnection.open("127.0.0.1", app.grpc.port)
        with pytest.raises(ConnectionError):
            await RawConnection.open("127.0.0.1", app.grpc.port)
        await first.close()

        async def reopened() -> RawConnection | None:
            try:
                return await RawConnection.open("127.0.0.1", app.grpc.port)
            except ConnectionError:
                return None
        deadline, third = time.monotonic() + 5, None
        while third is None and time.monotonic() < deadline:
            third = await reopened()
            await asyncio.sleep(0.05)
        assert third is not None, "the cap did not free when a connection closed"
        await second.close()
        await third.close()


@pytest.mark.parametrize(("peaks", "trims"), [
    ([1 * MIB, 2 * MIB], 0),  # small bursts: not worth a heap walk
    ([40 * MIB], 1),
    ([40 * MIB, 1 * MIB, 40 * MIB], 1),  # drains in quick succession: one trim, after the last
])
async def test_a_trim_follows_a_large_burst_once_quiet(peaks: list[int], trims: int) -> None:
    ran: list[float] = []
    trimmer = Trimmer(threshold_bytes=32 * MIB, quiet_s=0.05, trim=lambda: ran.append(time.monotonic()))
    for peak in peaks:
        trimmer.after_burst(peak)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert len(ran) == trimmer.trims == trims
