"""A live gateway for tests: real uvicorn on a free port, a real ledger database, fake model.

The stack runs on its own event loop in a background thread, so sync clients (the Cohere
SDK, schemathesis) and async tests alike talk to it over real HTTP without blocking it.
``FakeRunner`` stands in for the model: deterministic scores, and a ``gate`` to hold a batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.app import CoreParts
from service.billing.ledger import UsageRecord
from service.calls import Limits
from service.edge import EdgeLimits
from service.http.app import create_app
from service.http.server import HttpServer
from service.local import BatcherEngine
from worker.batcher import Batcher
from worker.fake import FakeRunner

T = TypeVar("T")
MODEL = "tiny-reranker"


@dataclass
class Options:
    limits: Limits = field(default_factory=Limits)
    auth: bool = True
    default_rps: float | None = None
    default_dps: float | None = None
    max_queued_docs: int = 4096
    edge: EdgeLimits = field(default_factory=EdgeLimits)


class LiveGateway:
    def __init__(self, db_url: str, options: Options | None = None) -> None:
        self.db_url = db_url
        self.options = options or Options()
        self.runner = FakeRunner()
        self.ready = True
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway", daemon=True)

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.gate.set()
        try:
            self.call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        return self.submit(coro).result(timeout_s)

    # -- the stack -------------------------------------------------------------------------
    async def _start(self) -> None:
        """Production's wiring (schema preparation, billing, core) on a fake model."""
        from service.app import build_core, open_front_billing
        from service.config import FrontConfig
        from worker.batcher import BatcherConfig

        opts = self.options
        billing = open_front_billing(FrontConfig(db_url=self.db_url, auth=opts.auth, rate_limit_rps=opts.default_rps,
                                                 rate_limit_dps=opts.default_dps))
        self.engine, self.keys, self.ledger = billing.engine, billing.keys, billing.ledger
        self.batcher = Batcher(self.runner, self.runner.builder,
                               BatcherConfig(max_wait_ms=0, max_queued_docs=opts.max_queued_docs))
        self.batcher.start()
        self.core = build_core(FrontConfig(), BatcherEngine(self.batcher), model_name=MODEL, limits=opts.limits,
                               parts=CoreParts(billing.auth, billing.limiter, billing.ledger))
        self.server = HttpServer(create_app(self.core, ready=lambda: self.ready, edge=opts.edge),
                                 host="127.0.0.1", port=0, limits=opts.edge)
        await self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"

    async def _stop(self) -> None:
        await self.server.stop(1)
        await self.batcher.close()
        await self.ledger.close()  # the engine too, and any background purge

    # -- helpers for tests -----------------------------------------------------------------
    def create_key(self, name: str = "test", **limits: Any) -> tuple[str, str]:
        """(key_id, key)."""
        new = self.call(self.keys.create(name, **limits))
        return new.record.key_id, new.key

    def records(self, key_id: str | None = None) -> list[UsageRecord]:
        return self.call(self.ledger.records(key_id))
