"""Composition: one config builds the engine, the core and the servers, in one order.

``App`` starts its components (the gRPC server, the metrics endpoint, and whatever
``http_components`` adds), then loads and warms the model in the background while health
says NOT_SERVING, then says SERVING. Shutdown is the reverse: NOT_SERVING, an optional drain
delay for load balancers to notice, every component stops accepting and finishes in-flight
calls within the grace period, then the batcher closes.

The knobs are ``service.config.ServeConfig``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.config import FrontConfig, ServeConfig
from service.core import Authenticator, Engine, Limits, RateLimiter, RerankCore, UsageLedger
from service.grpc_server import GrpcServer
from service.local import BatcherEngine
from service.metrics import Metrics, MetricsServer
from worker.batcher import Batcher
from worker.queue import POLICIES
from worker.types import PRECISIONS, LoadedModel

log = logging.getLogger(__name__)

def load_model_runner(config: ServeConfig) -> LoadedModel:
    """The real model; imports torch, so only the serve path calls it."""
    from worker.runner import ModelRunner

    if not config.model:
        raise ValueError("no model: pass --model PATH_OR_HUB_ID or set RERANK_MODEL")
    return ModelRunner.load(config.model, device=config.device, dtype=config.dtype,
                            max_length=config.max_length, prefix_cache_mb=config.prefix_cache_mb,
                            compile=config.compile, attention=config.attention, precision=config.precision)


# -- seams ---------------------------------------------------------------------------------
class Component(Protocol):
    """Something the app starts and stops: a server, an endpoint."""

    async def start(self) -> None: ...
    async def stop(self, grace_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class CoreParts:
    """What the core is built with beyond the engine: auth, rate limits, billing."""

    auth: Authenticator | None = None
    limiter: RateLimiter | None = None
    ledger: UsageLedger | None = None


def billing_parts(config: FrontConfig) -> CoreParts:
    """The key store, rate limiter and usage ledger on ``--db`` (``service.billing``)."""
    billing = config.open_billing()
    return CoreParts(auth=billing.auth, limiter=billing.limiter, ledger=billing.ledger)


def build_core(config: FrontConfig, engine: Engine, *, model_name: str, limits: Limits,
               aliases: Sequence[str] = (), parts: CoreParts | None = None) -> RerankCore:
    """The one composition of a billed core, for ``rerank serve``, ``rerank gateway`` and the
    test stacks alike: ``parts`` default to the production billing of ``config``."""
    parts = parts if parts is not None else billing_parts(config)
    return RerankCore(engine, model_name=model_name, limits=limits, auth=parts.auth, limiter=parts.limiter,
                      ledger=parts.ledger, model_aliases=aliases)


def http_components(config: ServeConfig, app: App) -> list[Component]:
    """The HTTP gateway on ``--http-port``: the same core as gRPC, in process."""
    if config.http_port is None:
        return []
    from service.gateway import create_app  # fastapi and uvicorn: only when serving
    from service.http_server import HttpServer

    # /ready says 503 from the drain on; calls are taken until the servers stop, as on gRPC
    gateway = create_app(app.core, metrics=app.metrics, edge=config.edge_limits(),
                         ready=lambda: app.batcher is not None and not app.draining,
                         accepting=lambda: app.batcher is not None and not app.stopping)
    return [HttpServer(gateway, host=config.host, port=config.http_port, grace_s=config.grace_s,
                       limits=config.edge_limits())]


# -- the app ---------------------------------------------------------------------------------
class App:
    def __init__(self, config: ServeConfig, load_runner: Callable[[], LoadedModel] | None = None,
                 core_parts: CoreParts | None = None) -> None:
        if config.scheduler not in POLICIES:
            raise ValueError(f"--scheduler must be {' or '.join(POLICIES)}, not {config.scheduler!r}")
        if config.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {config.precision!r}")
        self.config = config
        self.draining = False  # NOT_SERVING: from SIGTERM on; calls are still taken
        self.stopping = False  # new calls refused: after the drain delay
        self._load_runner = load_runner or (lambda: load_model_runner(config))
        self.metrics = Metrics()
        self.engine = BatcherEngine()
        name = config.model_name or config.model or "unnamed"
        aliases = [config.model] if config.model and config.model != name else []
        self.core = build_core(config, self.engine, model_name=name, limits=config.limits(), aliases=aliases,
                               parts=core_parts)
        self.grpc = GrpcServer(self.core, self.metrics, host=config.host, port=config.grpc_port,
                               tls=config.tls(), max_connection_age_s=config.max_connection_age_s,
                               limits=config.grpc_limits(), bdp_probe=config.grpc_bdp_probe)
        self.components: list[Component] = [self.grpc]
        if config.metrics_port is not None:
            self.components.append(MetricsServer(self.metrics, config.host, config.metrics_port))
        self.components += http_components(config, self)
        self._warming: asyncio.Task[None] | None = None

    @property
    def batcher(self) -> Batcher | None:
        return self.engine.batcher

    async def start(self) -> None:
        """Serve (NOT_SERVING) at once; load and warm the model in the background."""
        for component in self.components:
            await component.start()
        self._warming = asyncio.create_task(self._warm(), name="warm-model")

    async def wait_ready(self) -> None:
        """Until the model is warm; raises what loading raised."""
        if self._warming is None:
            raise RuntimeError("App.start() first")
        await asyncio.shield(self._warming)

    async def _warm(self) -> None:
        runner = await asyncio.to_thread(self._load_runner)  # seconds to minutes; health keeps answering
        info = runner.info()
        batcher = Batcher(runner, runner.builder, self.config.batcher_config(info.device),
                          on_batch=self.metrics.on_batch)
        batcher.start()
        await batcher.warmup()
        self.metrics.watch_queue(lambda: batcher.queued_docs)
        self.engine.batcher = batcher
        self.metrics.ready.set(1)
        await self.grpc.set_serving(True)
        log.info("ready: %s", info)

    async def drain(self) -> None:
        self.draining = True  # the HTTP gateway's /ready answers 503 from now on; calls are still taken
        await self.grpc.drain()
        self.metrics.ready.set(0)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, stop every component within the grace period, then close the batcher."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.drain()
        self.stopping = True  # both fronts refuse new calls from here (gRPC: its server's stop)
        await asyncio.gather(*(c.stop(grace) for c in self.components))
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()  # a load still running in its thread finishes unobserved
            await asyncio.gather(self._warming, return_exceptions=True)
        if self.batcher is not None:
            # the servers have finished or cancelled every call, so nothing is left to wait
            # for; a positive timeout because the batcher reads 0 as "wait forever"
            await self.batcher.close(grace_s=0.001)
        close_ledger = getattr(self.core.ledger, "close", None)  # last: calls bill until the servers stop
        if close_ledger is not None:
            await close_ledger()
