"""Composition: one config builds the engine, the core and the servers, in one order.

``App`` starts its components (the gRPC server, the metrics endpoint, and whatever
``extension_components`` adds), then loads and warms the model in the background while health
says NOT_SERVING, then says SERVING. Shutdown is the reverse: NOT_SERVING, an optional drain
delay for load balancers to notice, every component stops accepting and finishes in-flight
calls within the grace period, then the batcher closes.

The knobs are ``service.config.ServeConfig``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service.config import ServeConfig
from service.core import Authenticator, BatcherEngine, RateLimiter, RerankCore, UsageLedger
from service.errors import Code, ServiceError
from service.grpc_server import GrpcServer
from service.metrics import Metrics, MetricsServer
from worker.batcher import Batcher
from worker.types import ATTENTION_KINDS, PRECISIONS, Runner, ScoreRequest, ScoreResult

log = logging.getLogger(__name__)

def load_model_runner(config: ServeConfig) -> Runner:
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


def extension_core_parts(config: ServeConfig) -> CoreParts:
    """The key store, rate limiter and usage ledger on ``--db`` (``service.billing``)."""
    from service.billing import open_billing  # sqlalchemy: only when serving

    billing = open_billing(config.db_url, config.data_dir, require_keys=config.auth, replicas=config.replicas,
                           default_rps=config.rate_limit_rps, default_dps=config.rate_limit_dps,
                           idempotency_ttl_h=config.idempotency_ttl_h)
    return CoreParts(auth=billing.auth, limiter=billing.limiter, ledger=billing.ledger)


def extension_components(config: ServeConfig, app: App) -> list[Component]:
    """The HTTP gateway on ``--http-port``: the same core as gRPC, in process."""
    if config.http_port is None:
        return []
    from service.gateway import create_app  # fastapi and uvicorn: only when serving
    from service.http_server import HttpServer

    gateway = create_app(app.core, metrics=app.metrics,
                         ready=lambda: app.batcher is not None and not app.draining)
    return [HttpServer(gateway, host=config.host, port=config.http_port, grace_s=config.grace_s)]


# -- the engine while the model loads --------------------------------------------------------
class WarmingEngine:
    """The core's engine: UNAVAILABLE until the model is loaded and warm, then the batcher."""

    def __init__(self) -> None:
        self.batcher: Batcher | None = None
        self._engine: BatcherEngine | None = None

    def attach(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self._engine = BatcherEngine(batcher)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self._ready().score(request)

    def info(self) -> dict[str, str]:
        return self._ready().info()

    def _ready(self) -> BatcherEngine:
        if self._engine is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is loading; retry shortly", retry_after_s=1.0)
        return self._engine


# -- the app ---------------------------------------------------------------------------------
class App:
    def __init__(self, config: ServeConfig, load_runner: Callable[[], Runner] | None = None,
                 core_parts: CoreParts | None = None) -> None:
        if config.attention not in ATTENTION_KINDS:
            raise ValueError(f"--attention must be padded or varlen, not {config.attention!r}")
        if config.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {config.precision!r}")
        self.config = config
        self.draining = False
        self._load_runner = load_runner or (lambda: load_model_runner(config))
        self.metrics = Metrics()
        self.engine = WarmingEngine()
        parts = core_parts if core_parts is not None else extension_core_parts(config)
        name = config.model_name or config.model or "unnamed"
        aliases = [config.model] if config.model and config.model != name else []
        self.core = RerankCore(self.engine, model_name=name, limits=config.limits(), auth=parts.auth,
                               limiter=parts.limiter, ledger=parts.ledger, model_aliases=aliases)
        self.grpc = GrpcServer(self.core, self.metrics, host=config.host, port=config.grpc_port,
                               tls=config.tls(), max_connection_age_s=config.max_connection_age_s)
        self.components: list[Component] = [self.grpc]
        if config.metrics_port is not None:
            self.components.append(MetricsServer(self.metrics, config.host, config.metrics_port))
        self.components += extension_components(config, self)
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
        batcher = Batcher(runner, self.config.batcher_config(runner.describe()["device"]),
                          on_batch=self.metrics.on_batch)
        batcher.start()
        await batcher.warmup()
        self.metrics.watch_queue(lambda: batcher.queued_docs)
        self.engine.attach(batcher)
        self.metrics.ready.set(1)
        await self.grpc.set_serving(True)
        log.info("ready: %s", runner.describe())

    async def drain(self) -> None:
        self.draining = True  # the HTTP gateway's /ready and new calls answer 503 from now on
        await self.grpc.drain()
        self.metrics.ready.set(0)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, stop every component within the grace period, then close the batcher."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.drain()
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
