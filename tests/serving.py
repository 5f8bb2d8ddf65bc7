"""Helpers for tests of the service: a real App (gRPC on port 0) around a given runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import App, CoreParts
from service.billing import prepare_schema
from service.billing.db import open_engine
from service.billing.keys import KeyStore
from service.billing.ledger import SqlLedger
from service.config import ServeConfig
from service.core import RerankCore
from service.local import BatcherEngine
from service.seams import RateLimiter
from worker.batcher import Batcher, BatcherConfig
from worker.fake import FakeRunner
from worker.types import Runner

MODEL = "tiny-reranker"


@asynccontextmanager
async def running_app(runner: Runner | None = None, *, parts: CoreParts | None = None,
                      ready: bool = True, **config: Any) -> AsyncIterator[App]:
    """An App serving ``runner`` (a FakeRunner by default) on 127.0.0.1, a free port."""
    runner = runner if runner is not None else FakeRunner()
    settings = {"model": "fake", "host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "max_wait_ms": 0.0,
                **config}
    app = App(ServeConfig(**settings), load_runner=lambda: runner, core_parts=parts or CoreParts())
    await app.start()
    try:
        if ready:
            await app.wait_ready()
            if isinstance(runner, FakeRunner):  # the warm-up's calibration batches are nobody's
                runner.entered.clear()
                runner.batches.clear()
        yield app
    finally:
        if isinstance(runner, FakeRunner):
            runner.gate.set()  # never leave the model thread blocked: close() joins it
        await app.stop(grace_s=0)


async def create_schema(engine: AsyncEngine) -> None:
    """The ledger's schema on a test's database, made the way a server makes it at start
    (``service.billing.prepare_schema``: tables, later columns, indexes)."""
    await asyncio.to_thread(prepare_schema, engine.url.render_as_string(hide_password=False))


@asynccontextmanager
async def schema_engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a test's database with the ledger's schema (``create_schema``), disposed after."""
    engine = open_engine(url)
    try:
        await create_schema(engine)
        yield engine
    finally:
        await engine.dispose()


@dataclass
class LedgerStack:
    """A whole billed core in process, as one replica holds it: keys and ledger on ``url``'s
    database, a batcher on a ``FakeRunner`` (its ``gate`` holds batches so calls overlap)."""

    core: RerankCore
    keys: KeyStore
    ledger: SqlLedger
    runner: FakeRunner
    batcher: Batcher

    @classmethod
    async def start(cls, url: str, *, max_queued_docs: int, limiter: RateLimiter | None = None) -> LedgerStack:
        engine = open_engine(url)
        await create_schema(engine)
        runner = FakeRunner()
        batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0, max_queued_docs=max_queued_docs))
        batcher.start()
        keys, ledger = KeyStore(engine), SqlLedger(engine)
        core = RerankCore(BatcherEngine(batcher), model_name=MODEL, auth=keys, ledger=ledger, limiter=limiter)
        return cls(core, keys, ledger, runner, batcher)

    async def stop(self) -> None:
        self.runner.gate.set()  # never leave the model thread blocked: close() joins it
        await self.batcher.close()
        await self.ledger.close()  # also ends a background purge its calls started


def target(app: App) -> str:
    return f"127.0.0.1:{app.grpc.port}"


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for something another task or thread makes true (a server-side effect the
    client cannot observe directly, such as a cancellation reaching the batcher)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
