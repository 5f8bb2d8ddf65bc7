"""Faults inside one server: the model raising, callers giving up, slow and vanishing clients.

These run the real App (gRPC and HTTP fronts, batcher, SQLite ledger) in-process around
``FakeRunner``, whose ``gate`` holds a batch in the model thread and whose ``fail_next``
makes the model raise: each fault is injected at a known moment, so nothing here depends on
timing. Faults of whole processes and of the database (kill -9, SIGTERM, PostgreSQL stopped)
are in test_faults_process.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import AsyncRerankClient, RerankError
from service.app import App, CoreParts
from service.db import create_schema, open_engine
from service.ledger import SqlLedger
from serving import eventually, running_app, target
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
    value = app.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


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
