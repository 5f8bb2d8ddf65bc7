"""``rerank serve``: the gRPC server (and, as they are added, the other fronts) on one model.

Start-up logs the bound ports (``--grpc-port 0`` picks a free one), loads and warms the model
while health says NOT_SERVING, then serves. SIGTERM or SIGINT drains: NOT_SERVING, the drain
delay, new calls refused, in-flight calls finished within ``--grace-s``, exit 0. A second
signal cuts the grace period short.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

from service import config as serve_config
from service import logs

if TYPE_CHECKING:
    from service.app import App

HELP = ("serve the reranker over gRPC and HTTP/JSON (every knob also reads RERANK_<KNOB> from the "
        "environment)")
log = logging.getLogger("rerank.serve")
MODEL_HINT = ("--model takes a Hugging Face hub id (which needs network access or the model in the local Hugging "
              "Face cache) or a local checkpoint directory; `rerank make-test-model DIR` writes a random-weight "
              "one for offline trials")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # what the hub accepts as a repo id
HUB_PROBE_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = serve_config.from_args(args)
    logs.use(config.log_format)
    if not config.model:
        log.error("no model: pass --model PATH_OR_HUB_ID or set RERANK_MODEL")
        return 2
    import service.app  # noqa: F401  the serve extra, first: a client-only install hears that before anything
    problem = model_problem(config.model)
    if problem is not None:
        log.error("cannot load --model %s: %s. %s", config.model, problem, MODEL_HINT)
        return 2
    return asyncio.run(serve(config))


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be loaded, found in seconds and before any port is bound; None:
    worth loading. from_pretrained on an unreachable hub id retries for most of a minute and
    logs pages; this asks once, quickly: a local directory, the local Hugging Face cache,
    HF_HUB_OFFLINE, then one metadata request to the hub."""
    if Path(model).expanduser().is_dir():
        return None
    if not HUB_ID.fullmatch(model):
        return "no such directory"
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return None  # cached: loads without the network
    if constants.HF_HUB_OFFLINE:
        return "not a directory, not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(model, "config.json"), timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # unreachable, unknown, gated: loading would fail the same way, slower
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"not a directory, not in the local Hugging Face cache, and the hub did not serve it ({reason})"
    return None


async def serve(config: serve_config.ServeConfig) -> int:
    try:
        from service.app import App  # the serve extra: only when serving
    except ImportError as exc:
        log.error("rerank serve needs the serve extra (pip install 'qwen3-rerank[serve]'): %s", exc)
        return 2
    try:
        app = App(config)
    except (ValueError, OSError) as exc:  # contradictory knobs, unreadable TLS files
        log.error("cannot start: %s", exc)
        return 2
    try:
        await app.start()
    except (OSError, RuntimeError) as exc:  # a port taken
        log.error("cannot start: %s", exc)
        await app.stop(grace_s=0)
        return 2
    stops = Stops.install()
    if not await _ready_unless_stopped(app, stops):
        await app.stop(grace_s=0)
        return 1
    await stops.first.wait()
    await _shut_down(app, config, stops)
    log.info("stopped")
    return 0


async def _ready_unless_stopped(app: App, stops: Stops) -> bool:
    """False if the model failed to load; True once warm, or once asked to stop."""
    ready = asyncio.ensure_future(app.wait_ready())
    stopped = asyncio.ensure_future(stops.first.wait())
    await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not ready.done():
        ready.cancel()  # stopping while loading: stop() cancels the load
        return True
    failure = ready.exception()
    if failure is not None:
        # OSError: from_pretrained found no checkpoint; anything else says what to change itself
        hint = f"\n{MODEL_HINT}" if isinstance(failure, OSError) else ""
        log.error("model failed to load: %s%s", failure, hint)
        return False
    return True


async def _shut_down(app: App, config: serve_config.ServeConfig, stops: Stops) -> None:
    """NOT_SERVING, the drain delay, then stop within the grace period; a second signal
    skips what is left of both."""
    log.info("draining: NOT_SERVING for %.1fs, then up to %.1fs for in-flight calls",
             config.drain_delay_s, config.grace_s)
    await app.drain()
    if config.drain_delay_s > 0:
        await _first([asyncio.sleep(config.drain_delay_s), stops.second.wait()])
    stopping = asyncio.ensure_future(app.stop(grace_s=0.0 if stops.second.is_set() else config.grace_s))
    await _first([stopping, stops.second.wait()])
    if not stopping.done():
        log.warning("second signal: cancelling in-flight calls")
        if app.grpc is not None:
            await app.grpc.server.stop(0)
        await stopping


async def _first(aws: list[Awaitable[object]]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks[1:]:
        task.cancel()


class Stops:
    """SIGTERM/SIGINT: the first starts a graceful shutdown, the second hurries it (``rerank
    serve``; ``rerank gateway`` waits for the first only)."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()

    @classmethod
    def install(cls) -> Stops:
        stops = cls()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stops.signal)
        return stops

    def signal(self) -> None:
        (self.second if self.first.is_set() else self.first).set()
