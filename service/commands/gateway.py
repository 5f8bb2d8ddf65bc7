"""``rerank gateway``: the billed HTTP gateway alone, in front of remote gRPC Rerank servers.

The same ``App`` as ``rerank serve`` (HTTP API, keys, ledger, limiter, start and shutdown) on a
``RemoteEngine`` instead of an in-process model: auth, limits and billing happen here; the
backends (run ``rerank serve --no-auth`` on a private network) only score. The model name and
the limits come from the backends' ``GetModelInfo``. SIGTERM or SIGINT: /ready answers 503, new calls
are refused, in-flight calls finish within ``--grace-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING

from service import config as knobs
from service import logs
from service.commands.serve import Stops

if TYPE_CHECKING:
    from clients import Pacing
    from service.app import App

HELP = ("run the billed HTTP gateway alone, in front of remote gRPC Rerank servers (every knob also reads "
        "RERANK_<KNOB> from the environment)")
log = logging.getLogger("rerank.gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    knobs.add_arguments(parser, config=knobs.GatewayConfig)


def backend_pacing(config: knobs.GatewayConfig) -> Pacing | None:
    """The client's pacing for backend calls, when any of its knobs asks for it."""
    from clients import Pacing

    if config.backend_rps is None and config.backend_dps is None and not config.backend_retries:
        return None
    return Pacing(requests_per_s=config.backend_rps, documents_per_s=config.backend_dps,
                  max_retries=config.backend_retries)


async def start(args: argparse.Namespace) -> App:
    """Open the ledger, find the backends' model, serve HTTP; raises OSError/ValueError."""
    from service.app import App, billing_parts
    from service.remote import RemoteEngine

    config = knobs.config_from_args(args, knobs.GatewayConfig)
    if not config.backend or config.http_port is None:
        raise ValueError("no backend or no HTTP port: pass --backend HOST:PORT and --http-port N")
    config.tracing()  # an OTEL_* setting it cannot honour fails now, not after the backends answer
    parts = billing_parts(config)
    engine = RemoteEngine(list(config.backend), api_key=config.backend_api_key, tls=config.backend_tls,
                          timeout_s=config.timeout_s, pacing=backend_pacing(config))
    try:
        model = await engine.connect(config.connect_timeout_s)
        app = App(config, core_parts=parts, remote=engine)
    except BaseException:
        await engine.close()
        if parts.ledger is not None:
            await parts.ledger.close()
        raise
    await app.start()
    log.info("gateway for %s on %d backend(s): %s", model.model, len(config.backend), ", ".join(config.backend))
    return app


def run(args: argparse.Namespace) -> int:
    logs.use(args.log_format)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    try:
        app = await start(args)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    await Stops.install().first.wait()  # a second signal changes nothing here
    log.info("draining: up to %.1fs for in-flight calls", args.grace_s)
    await app.stop(args.grace_s)
    log.info("stopped")
    return 0
