"""Composition: one config builds the engine, the core and the servers, in one order.

``App`` starts its components (the gRPC server, the metrics endpoint, and whatever
``http_components`` adds), then loads and warms the model in the background while health
says NOT_SERVING, then says SERVING. Shutdown is the reverse: NOT_SERVING, an optional drain
delay for load balancers to notice, every component stops accepting and finishes in-flight
calls within the grace period, then the engine and the ledger close. ``rerank gateway`` is the
same app on a ``RemoteEngine`` whose backends answered at start: HTTP only, nothing to load.

The knobs are ``service.config.ServeConfig`` (``GatewayConfig`` for the gateway).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

from service import tracing
from service.calls import Limits
from service.config import FrontConfig, ServeConfig
from service.core import RerankCore
from service.grpc.servicer import GrpcServer
from service.local import BatcherEngine
from service.metrics import Metrics, MetricsServer
from service.remote import RemoteEngine
from service.seams import Authenticator, Engine, RateLimiter, UsageLedger
from worker.batcher import Batcher, BatchStats
from worker.prompt import LoadedModel
from worker.types import DType, Precision

if TYPE_CHECKING:
    from service.billing import Billing

log = logging.getLogger(__name__)

def load_model_runner(config: ServeConfig) -> LoadedModel:
    """The real model; imports torch, so only the serve path calls it."""
    from worker.runner import ModelRunner

    if not config.model:
        raise ValueError("no model: pass --model PATH_OR_HUB_ID or set RERANK_MODEL")
    plain = config.dtype in (Precision.FLOAT32, Precision.BFLOAT16, Precision.FLOAT16)  # else precision.py picks
    dtype, precision = (DType(config.dtype), None) if plain else (None, config.dtype)
    return ModelRunner.load(config.model, device=config.device, dtype=dtype, max_length=config.max_length,
                            prefix_cache_mb=config.prefix_cache_mb, compile=config.compile,
                            attention=config.attention, precision=precision)


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


def open_front_billing(config: FrontConfig) -> Billing:
    """The key store, rate limiter and usage ledger on ``--db``, its schema prepared."""
    from service.billing import open_billing  # sqlalchemy: only when serving

    return open_billing(config.db_url, config.data_dir, require_keys=config.auth, replicas=config.replicas,
                        default_rps=config.rate_limit_rps, default_dps=config.rate_limit_dps,
                        idempotency_ttl_h=config.idempotency_ttl_h)


def billing_parts(config: FrontConfig) -> CoreParts:
    """The key store, rate limiter and usage ledger on ``--db`` (``service.billing``)."""
    billing = open_front_billing(config)
    return CoreParts(auth=billing.auth, limiter=billing.limiter, ledger=billing.ledger)


def build_core(config: FrontConfig, engine: Engine, *, model_name: str, limits: Limits,
               aliases: Sequence[str] = (), parts: CoreParts | None = None) -> RerankCore:
    """The one composition of a billed core, for ``rerank serve``, ``rerank gateway`` and the
    test stacks alike: ``parts`` default to the production billing of ``config``."""
    parts = parts if parts is not None else billing_parts(config)
    return RerankCore(engine, model_name=model_name, limits=limits, auth=parts.auth, limiter=parts.limiter,
                      ledger=parts.ledger, model_aliases=aliases)


def http_components(config: FrontConfig, app: App) -> list[Component]:
    """The HTTP API on ``--http-port``: the same core as gRPC, in process."""
    if config.http_port is None:
        return []
    from service.http.app import create_app  # fastapi and uvicorn: only when serving
    from service.http.server import HttpServer

    # /ready says 503 from the drain on; calls are taken until the servers stop, as on gRPC
    api = create_app(app.core, metrics=app.metrics, edge=config.edge_limits(),
                     ready=lambda: app.warm and not app.draining, accepting=lambda: app.warm and not app.stopping)
    return [HttpServer(api, host=config.host, port=config.http_port, grace_s=config.grace_s,
                       limits=config.edge_limits())]


# -- the app ---------------------------------------------------------------------------------
class App:
    def __init__(self, config: FrontConfig, load_runner: Callable[[], LoadedModel] | None = None,
                 core_parts: CoreParts | None = None, *, remote: RemoteEngine | None = None) -> None:
        """``rerank serve`` (a ``ServeConfig``), or ``rerank gateway`` (``remote``, connected)."""
        self.config = config
        self._tracing = config.tracing()  # read first: an OTEL_* setting it cannot honour stops the start
        self._traced = False
        self.draining = False  # NOT_SERVING: from SIGTERM on; calls are still taken
        self.stopping = False  # new calls refused: after the drain delay
        self.metrics = Metrics()
        self.engine: BatcherEngine | RemoteEngine = remote or BatcherEngine()
        self.grpc: GrpcServer | None = None
        self.components: list[Component] = []
        if remote is not None and remote.model is not None:
            self.core = build_core(config, remote, model_name=remote.model.model, parts=core_parts,
                                   limits=Limits(**asdict(remote.model.limits)))
        elif isinstance(config, ServeConfig):
            self._compose_serve(config, load_runner or (lambda: load_model_runner(config)), core_parts)
        else:
            raise ValueError("a gateway's App needs a RemoteEngine whose backends answered (connect() first)")
        self.components += http_components(config, self)
        self._warming: asyncio.Task[None] | None = None

    def _compose_serve(self, config: ServeConfig, load_runner: Callable[[], LoadedModel],
                       core_parts: CoreParts | None) -> None:
        self._serve, self._load_runner = config, load_runner
        name = config.model_name or config.model or "unnamed"
        aliases = [config.model] if config.model and config.model != name else []
        self.core = build_core(config, self.engine, model_name=name, limits=config.limits(), aliases=aliases,
                               parts=core_parts)
        self.grpc = GrpcServer(self.core, self.metrics, host=config.host, port=config.grpc_port,
                               tls=config.tls(), max_connection_age_s=config.max_connection_age_s,
                               limits=config.grpc_limits(), bdp_probe=config.grpc_bdp_probe)
        self.components.append(self.grpc)
        if config.metrics_port is not None:
            self.components.append(MetricsServer(self.metrics, config.host, config.metrics_port))

    @property
    def batcher(self) -> Batcher | None:
        return self.engine.batcher if isinstance(self.engine, BatcherEngine) else None

    @property
    def warm(self) -> bool:
        """The engine can score: the model is loaded, or the backends answered."""
        return self.batcher is not None or isinstance(self.engine, RemoteEngine)

    async def start(self) -> None:
        """Serve (NOT_SERVING) at once; load and warm the model in the background."""
        if self._tracing is not None and not tracing.enabled():
            tracing.start(self._tracing, "rerank-serve" if self.grpc is not None else "rerank-gateway")
            self._traced = True  # this app set it up: it shuts it down
        for component in self.components:
            await component.start()
        self._warming = asyncio.create_task(self._warm(), name="warm-model")

    async def wait_ready(self) -> None:
        """Until the model is warm; raises what loading raised."""
        if self._warming is None:
            raise RuntimeError("App.start() first")
        await asyncio.shield(self._warming)

    async def _warm(self) -> None:
        if self.grpc is None:  # a gateway: its backends answered before it was built
            self.metrics.ready.set(1)  # (else the replica-not-ready alert would page on every gateway)
            return
        runner = await asyncio.to_thread(self._load_runner)  # seconds to minutes; health keeps answering
        info = runner.info()
        batcher = Batcher(runner, runner.builder, self._serve.batcher_config(info.device),
                          on_batch=self._on_batch if tracing.enabled() else self.metrics.on_batch)
        batcher.start()
        await batcher.warmup()
        self.metrics.watch_queue(lambda: batcher.queued_docs, lambda: batcher.queue.queued_tokens,
                                 batcher.config.max_queued_docs, batcher.config.max_queued_tokens)
        assert isinstance(self.engine, BatcherEngine), "a served app's engine is local: this is a bug"
        self.engine.batcher = batcher
        self.metrics.ready.set(1)
        await self.grpc.set_serving(True)
        log.info("ready: %s", info)

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.on_batch(stats)
        tracing.batch(stats)

    async def drain(self) -> None:
        self.draining = True  # the HTTP API's /ready answers 503 from now on; calls are still taken
        if self.grpc is not None:
            await self.grpc.drain()
        self.metrics.ready.set(0)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, stop every component within the grace period, then close the engine and the ledger."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.drain()
        self.stopping = True  # both fronts refuse new calls from here (gRPC: its server's stop)
        await asyncio.gather(*(c.stop(grace) for c in self.components))
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()  # a load still running in its thread finishes unobserved
            await asyncio.gather(self._warming, return_exceptions=True)
        await self.engine.close()  # the servers have finished or cancelled every call
        if self.core.ledger is not None:  # last: calls bill until the servers stop
            await self.core.ledger.close()
        if self._traced:  # after the engine: its last batches' spans are made
            self._traced = False
            await asyncio.to_thread(tracing.shutdown)  # exports what is buffered (blocking)
