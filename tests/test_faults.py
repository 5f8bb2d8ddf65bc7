"""Faults inside one server: the model raising, callers giving up, slow and vanishing clients.

These run the real App (gRPC and HTTP fronts, batcher, SQLite ledger) in-process around
``FakeRunner``, whose ``gate`` holds a batch in the model thread and whose ``fail_next``
makes the model raise: each fault is injected at a known moment, so nothing here depends on
timing. Faults of whole processes and of the database (kill -9, SIGTERM, PostgreSQL stopped)
are in test_faults_process.py.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import create_schema, eventually, running_app, target

from clients import AsyncRerankClient, RerankError
from service.app import App, CoreParts
from service.billing.db import open_engine
from service.billing.ledger import SqlLedger
from service.http.server import HttpServer
from worker.batcher import Group
from worker.fake import FakeRunner

DOCS = ["pandas eat bamboo", "paris is in france", "a bear of china", "tea is a drink"]


@asynccontextmanager
async def billed_app(tmp_path: Path, runner: FakeRunner, **config: object) -> AsyncIterator[tuple[App, SqlLedger]]:
    """A real App whose calls are billed to a fresh SQLite ledger."""
    engine = open_engine(str(tmp_path / "ledger.sqlite3"))
    await create_schema(engine)
    ledger = SqlLedger(engine)
    try:
        async with running_app(runner, parts=CoreParts(ledger=ledger), **config) as app:
            yield app, ledger
    finally:
        await engine.dispose()


async def billed_keys(ledger: SqlLedger) -> list[str | None]:
    return sorted(r.idempotency_key for r in await ledger.records())


async def health(app: App) -> int:
    async with grpc.aio.insecure_channel(target(app)) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def sample(app: App, name: str) -> float:
    """A metric's value summed over all its labels."""
    return sum(s.value for family in app.metrics.registry.collect() for s in family.samples if s.name == name)


async def test_model_fault_fails_only_its_batch_and_the_server_stays_healthy(tmp_path: Path) -> None:
    runner = FakeRunner()
    async with billed_app(tmp_path, runner) as (app, ledger), \
            AsyncRerankClient(target(app), retries=0) as client:
        runner.gate.clear()
        doomed = asyncio.create_task(client.rerank("doomed query", DOCS, request_id="doomed"))
        assert await asyncio.to_thread(runner.entered.wait, 5)  # its batch is in the model
        runner.fail_next = True
        others = [asyncio.create_task(client.rerank(f"query {i}", DOCS, request_id=f"ok-{i}"))
                  for i in range(3)]
        await eventually(lambda: app.batcher is not None and app.batcher.queued_docs == 3 * len(DOCS))
        runner.gate.set()

        with pytest.raises(RerankError) as failed:
            await doomed
        assert failed.value.code == grpc.StatusCode.INTERNAL
        assert all(r.usage.documents == len(DOCS) for r in await asyncio.gather(*others))
        assert await health(app) == health_pb2.HealthCheckResponse.SERVING
        assert sample(app, "rerank_batches_failed_total") == 1
        assert await billed_keys(ledger) == ["ok-0", "ok-1", "ok-2"]  # the failure is not billed

        retried = await client.rerank("doomed query", DOCS, request_id="doomed")  # same key, now fine
        assert not retried.replayed and retried.usage.documents == len(DOCS)
        assert await billed_keys(ledger) == ["doomed", "ok-0", "ok-1", "ok-2"]


# -- callers that give up, disconnect, or crawl --------------------------------------------------
def live_groups() -> list[Group]:
    """Requests the batcher still holds anywhere (a queue entry keeps its group alive)."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Group]  # type(): some objects warn on __class__


def http_port(app: App) -> int:
    return next(c for c in app.components if isinstance(c, HttpServer)).port


@asynccontextmanager
async def blocked_model(app: App, runner: FakeRunner, client: AsyncRerankClient) -> AsyncIterator[asyncio.Task[object]]:
    """A call holds the model thread (gate closed), so everything sent meanwhile queues."""
    runner.gate.clear()
    blocker = asyncio.create_task(client.rerank("blocker", DOCS, request_id="blocker"))
    assert await asyncio.to_thread(runner.entered.wait, 5)
    try:
        yield blocker
    finally:
        runner.gate.set()


async def test_callers_that_give_up_or_disconnect_leave_no_work_and_are_not_billed(tmp_path: Path) -> None:
    runner = FakeRunner()
    async with billed_app(tmp_path, runner) as (app, ledger), \
            AsyncRerankClient(target(app), retries=0) as client, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port(app)}") as http:
        # groups an earlier test left to the garbage collector are not this test's to judge
        # (held here, so their ids are not reused by this test's groups)
        before = live_groups()
        async with blocked_model(app, runner, client) as blocker:
            deadlines = [asyncio.create_task(client.rerank(f"deadline {i}", DOCS, request_id=f"deadline-{i}",
                                                           timeout_s=0.5)) for i in range(10)]
            cancelled = [asyncio.create_task(client.rerank(f"cancel {i}", DOCS, request_id=f"cancel-{i}"))
                         for i in range(10)]
            hung_up = [asyncio.create_task(http.post("/v1/rerank", json={"query": f"hang up {i}", "documents": DOCS},
                                                     headers={"Idempotency-Key": f"hangup-{i}"}, timeout=0.5))
                       for i in range(10)]
            await eventually(lambda: app.batcher is not None and app.batcher.queued_docs == 30 * len(DOCS))
            for task in cancelled:
                task.cancel()
            outcomes = await asyncio.gather(*deadlines, *cancelled, *hung_up, return_exceptions=True)
            # every departed call has been finished on the server's side (and counted)
            await eventually(lambda: sample(app, "rerank_requests_total") >= 30)
            rows_before = sum(len(b) for b in runner.batches)
        await blocker
        after = await client.rerank("after", DOCS, request_id="after")
        assert app.batcher is not None and app.batcher.queued_docs == 0
        # the batcher's loop keeps its last batch until the next one: "after"
        held = [g for g in live_groups() if not any(g is old for old in before)]
        assert len(held) <= 1 and not any(g.cancelled for g in held), \
            f"{sum(g.cancelled for g in held)} requests of departed callers are still held"
        assert await billed_keys(ledger) == ["after", "blocker"]

    assert all(isinstance(e, RerankError) and e.code is grpc.StatusCode.DEADLINE_EXCEEDED for e in outcomes[:10])
    assert all(isinstance(e, asyncio.CancelledError) for e in outcomes[10:20])
    assert all(isinstance(e, httpx.TimeoutException) for e in outcomes[20:])
    computed = sum(len(b) for b in runner.batches) - rows_before  # after the gate opened
    assert computed == 2 * len(DOCS), "documents of callers that had gone were computed anyway"
    assert after.usage.documents == len(DOCS)


async def test_slow_and_stalled_connections_do_not_hold_up_other_callers(tmp_path: Path) -> None:
    """Connections that send half a request and stall (HTTP headers promising a body that
    never comes; a gRPC connection that stops after the HTTP/2 preface) hold a socket each,
    nothing more: other callers are served as usual, and closing them leaves nothing behind."""
    runner = FakeRunner()
    async with billed_app(tmp_path, runner) as (app, ledger), \
            AsyncRerankClient(target(app), retries=0) as client:
        stalled = [await stall_http(http_port(app)) for _ in range(20)]
        stalled += [await stall_grpc(app.grpc.port) for _ in range(20)]
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(client.rerank(f"q{i}", DOCS, request_id=f"ok-{i}") for i in range(20)))
        elapsed = asyncio.get_running_loop().time() - started
        for writer in stalled:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in stalled), return_exceptions=True)
        assert all(r.usage.documents == len(DOCS) for r in results)
        assert elapsed < 5, f"20 calls took {elapsed:.1f}s beside stalled connections"
        assert await billed_keys(ledger) == sorted(f"ok-{i}" for i in range(20))
        await asyncio.sleep(0.2)  # the server notices the closed connections
        assert app.batcher is not None and app.batcher.queued_docs == 0


async def stall_http(port: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"query\": \"never fin")
    await writer.drain()
    return writer


async def stall_grpc(port: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the HTTP/2 preface, then nothing
    await writer.drain()
    return writer
