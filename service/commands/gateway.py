"""``rerank gateway``: the billed HTTP gateway alone, in front of remote gRPC Rerank servers.

The same gateway, key store, ledger and limiter as ``rerank serve``, on a ``RemoteEngine``
instead of an in-process model: auth, limits and billing happen here; the backends (run
``rerank serve --no-auth`` on a private network) only score. The model name and the limits
come from the backends' ``GetModelInfo``. SIGTERM or SIGINT: /ready answers 503, new calls
are refused, in-flight calls finish within ``--grace-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from service.commands.keys import add_database_arguments

if TYPE_CHECKING:
    from service.billing import Billing
    from service.http_server import HttpServer
    from service.remote import RemoteEngine

HELP = "run the billed HTTP gateway alone, in front of remote gRPC Rerank servers"
log = logging.getLogger("rerank.gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", required=True, metavar="HOST:PORT",
                        help="a gRPC Rerank server to score on (repeat for several; round robin)")
    parser.add_argument("--host", default="0.0.0.0", metavar="H", help="address to bind")
    parser.add_argument("--http-port", type=int, default=8080, metavar="N", help="HTTP port; 0 picks a free one")
    add_database_arguments(parser)
    parser.add_argument("--auth", default=True, action=argparse.BooleanOptionalAction,
                        help="require API keys; --no-auth serves everyone as 'anonymous' (trusted networks only)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="gateways sharing each key's rate limit")
    parser.add_argument("--rate-limit-rps", type=float, metavar="X", help="requests/s per key without its own limit")
    parser.add_argument("--rate-limit-dps", type=float, metavar="X", help="documents/s per key without its own limit")
    parser.add_argument("--idempotency-ttl-h", type=float, default=24.0, metavar="X",
                        help="hours an Idempotency-Key is remembered: a retry within it replays the stored "
                             "reply unbilled; after it, the key starts a new, billed call (default: 24)")
    parser.add_argument("--backend-api-key", default=os.environ.get("RERANK_BACKEND_API_KEY"), metavar="KEY",
                        help="key the backends require, if they run with auth [env RERANK_BACKEND_API_KEY]")
    parser.add_argument("--backend-tls", action="store_true", help="TLS to the backends")
    parser.add_argument("--timeout-s", type=float, default=60.0, metavar="X", help="deadline of one backend call")
    parser.add_argument("--connect-timeout-s", type=float, default=600.0, metavar="X",
                        help="wait this long at start for a backend to answer (they may be loading)")
    parser.add_argument("--grace-s", type=float, default=30.0, metavar="X",
                        help="on SIGTERM, let in-flight calls finish this long")


@dataclass
class Gateway:
    engine: RemoteEngine
    billing: Billing
    server: HttpServer
    draining: asyncio.Event  # set: /ready and new calls answer 503

    async def stop(self, grace_s: float) -> None:
        self.draining.set()
        await self.server.stop(grace_s)
        await self.engine.close()
        await self.billing.ledger.close()


async def start(args: argparse.Namespace) -> Gateway:
    """Open the ledger, find the backends' model, serve HTTP; raises OSError/ValueError."""
    from service.billing import open_billing
    from service.core import Limits, RerankCore
    from service.gateway import create_app
    from service.http_server import HttpServer
    from service.remote import RemoteEngine

    billing = open_billing(args.db, args.data_dir, require_keys=args.auth, replicas=args.replicas,
                           default_rps=args.rate_limit_rps, default_dps=args.rate_limit_dps,
                           idempotency_ttl_h=args.idempotency_ttl_h)
    engine = RemoteEngine(args.backend, api_key=args.backend_api_key, tls=args.backend_tls,
                          timeout_s=args.timeout_s)
    try:
        model = await engine.connect(args.connect_timeout_s)
    except BaseException:
        await engine.close()
        await billing.ledger.close()
        raise
    core = RerankCore(engine, model_name=model.model, limits=Limits(**asdict(model.limits)), auth=billing.auth,
                      limiter=billing.limiter, ledger=billing.ledger)
    draining = asyncio.Event()
    server = HttpServer(create_app(core, ready=lambda: not draining.is_set()), host=args.host,
                        port=args.http_port, grace_s=args.grace_s)
    await server.start()
    log.info("gateway for %s on %d backend(s): %s", model.model, len(args.backend), ", ".join(args.backend))
    return Gateway(engine, billing, server, draining)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    try:
        gateway = await start(args)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: up to %.1fs for in-flight calls", args.grace_s)
    await gateway.stop(args.grace_s)
    log.info("stopped")
    return 0
