"""Per-request cost of each layer, in one process: engine, core (auth, limits, billing), gRPC.

    python bench/overhead.py --model-dir DIR [--requests 200]

A real gRPC server on loopback in this process, driven by the real async client, so the
figures hold the servicer's and the core's work and not two processes fighting over cores
(``bench/service.py`` measures that case). Prints p50 per layer, with and without the SQLite
usage ledger (auth off).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serving import running_app, target  # noqa: E402

from clients import AsyncRerankClient  # noqa: E402
from service.app import CoreParts, billing_parts  # noqa: E402
from service.calls import RerankCall, RerankQuery  # noqa: E402
from service.config import ServeConfig  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402

DOCS = ["river city capital " * 10] * 4


async def measure(runner: ModelRunner, parts: CoreParts, requests: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"engine": [], "core": [], "grpc": []}
    async with running_app(runner, parts=parts) as app, AsyncRerankClient(target(app)) as client:
        await client.rerank("warm up", DOCS)
        for i in range(requests):  # interleaved, so drift hits every layer alike
            # a fresh query per call and layer: no layer may find its prefix already cached
            calls = {"engine": app.engine.score(RerankQuery(f"engine {i}", DOCS), "", 0),
                     "core": app.core.rerank(RerankCall([RerankQuery(f"core {i}", DOCS)])),
                     "grpc": client.rerank(f"grpc {i}", DOCS)}
            for layer, call in calls.items():
                started = time.perf_counter()
                await call
                times[layer].append(time.perf_counter() - started)
    return {layer: 1000 * statistics.median(t) for layer, t in times.items()}


async def main(args: argparse.Namespace) -> None:
    runner = ModelRunner.load(args.model_dir)
    runner.warmup()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = billing_parts(ServeConfig(model="x", db_url=f"sqlite:///{tmp}/ledger.sqlite3", auth=False))
        for label, parts in (("no ledger", CoreParts()), ("SQLite ledger", ledger)):
            p50 = await measure(runner, parts, args.requests)
            print(f"{label}: p50 engine {p50['engine']:.2f} ms, core {p50['core']:.2f} ms, "
                  f"gRPC {p50['grpc']:.2f} ms; gRPC over engine {p50['grpc'] - p50['engine']:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--requests", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
