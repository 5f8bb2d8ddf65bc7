"""Service-level benchmark: what the gRPC front costs over the engine, and how throughput
holds as concurrent clients rise.

One seeded workload (R requests, each one query x D documents of about T tokens) is scored

* offline: every request submitted at once to an in-process ``Batcher`` + ``ModelRunner``
  (the engine's best case: the queue always full);
* through the service: a real ``rerank serve`` process on loopback, driven by C closed-loop
  ``AsyncRerankClient`` clients for each C in ``--concurrency`` (each client sends its share
  of the R requests one after another);
* one at a time, in process and over gRPC, for the per-request overhead of the front
  (p50 of the over-gRPC latency minus p50 of the in-process latency).

    python bench/service.py --model-dir .cache/models/tiny --concurrency 1,2,4,8,16,32,64,128,256
    python bench/service.py --model-dir .cache/models/qwen3-reranker-0.6b-random --concurrency 64 \
        --requests 64 --overhead-requests 0

Writes a Markdown table to stdout, the figures to --json and, with matplotlib, a plot of
throughput against concurrency to --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load.servers import ServeProcess  # noqa: E402
from clients import AsyncRerankClient  # noqa: E402
from worker.batcher import Batcher, BatcherConfig  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402
from worker.types import ScoreRequest  # noqa: E402

WORDS = ("search ranking model query document passage answer city river capital history science "
         "code python function value result system network data paris france tokyo energy").split()


def workload(count: int, docs: int, words: int, seed: int) -> list[ScoreRequest]:
    rng = random.Random(seed)
    return [ScoreRequest(f"query {i}: " + " ".join(rng.choices(WORDS, k=8)),
                         [" ".join(rng.choices(WORDS, k=words)) for _ in range(docs)])
            for i in range(count)]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def offline(runner: ModelRunner, requests: list[ScoreRequest]) -> dict[str, float]:
    batcher = Batcher(runner, runner.builder, BatcherConfig.for_device(runner.info().device))
    batcher.start()
    try:
        started = time.perf_counter()
        await asyncio.gather(*(batcher.score(r) for r in requests))
        seconds = time.perf_counter() - started
        one_by_one = []
        for r in requests[: ARGS.overhead_requests]:
            t0 = time.perf_counter()
            await batcher.score(r)
            one_by_one.append(time.perf_counter() - t0)
    finally:
        await batcher.close()
    docs = sum(len(r.documents) for r in requests)
    out = {"seconds": seconds, "docs_per_s": docs / seconds}
    if one_by_one:
        out["sequential_p50_ms"] = 1000 * statistics.median(one_by_one)
    return out


async def drive(target: str, requests: list[ScoreRequest], clients: int) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    shares = [requests[i::clients] for i in range(clients)]

    async def client(share: list[ScoreRequest]) -> None:
        nonlocal failures
        async with AsyncRerankClient(target, timeout_s=600) as c:
            for r in share:
                t0 = time.perf_counter()
                try:
                    await c.rerank(r.query, list(r.documents))
                except Exception:  # noqa: BLE001 - counted, the sweep goes on
                    failures += 1
                latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client(s) for s in shares if s))
    seconds = time.perf_counter() - started
    docs = sum(len(r.documents) for r in requests)
    return {"clients": clients, "seconds": seconds, "docs_per_s": docs / seconds, "failures": failures,
            "p50_ms": 1000 * pct(latencies, 50), "p95_ms": 1000 * pct(latencies, 95),
            "p99_ms": 1000 * pct(latencies, 99)}


async def sequential(target: str, requests: list[ScoreRequest]) -> float:
    async with AsyncRerankClient(target, timeout_s=600) as c:
        await c.rerank(requests[0].query, list(requests[0].documents))  # connect
        times = []
        for r in requests:
            t0 = time.perf_counter()
            await c.rerank(r.query, list(r.documents))
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def plot(rows: list[dict[str, float]], offline_dps: float, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["clients"] for r in rows], [r["docs_per_s"] for r in rows], marker="o", label="through gRPC")
    ax.axhline(offline_dps, linestyle="--", color="gray", label="offline engine (queue always full)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("documents / s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--doc-words", type=int, default=50)
    parser.add_argument("--overhead-requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the server process (repeatable)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    ARGS = parser.parse_args()

    requests = workload(ARGS.requests, ARGS.docs, ARGS.doc_words, ARGS.seed)
    runner = ModelRunner.load(ARGS.model_dir)
    runner.warmup()
    base = asyncio.run(offline(runner, requests))
    del runner
    print(f"offline engine: {base}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ServeProcess(
            ARGS.model_dir, Path(tmp) / "serve.log", db_url=f"sqlite:///{tmp}/ledger.sqlite3",
            extra_args=["--no-auth"], env=dict(e.split("=", 1) for e in ARGS.serve_env)) as server:
        server.start().wait_ready(timeout_s=600)
        overhead = None
        if ARGS.overhead_requests:
            p50 = asyncio.run(sequential(server.grpc_target, requests[: ARGS.overhead_requests]))
            overhead = {"grpc_p50_ms": p50, "engine_p50_ms": base["sequential_p50_ms"],
                        "overhead_p50_ms": p50 - base["sequential_p50_ms"]}
            print(f"one at a time: {overhead}", flush=True)
        for clients in map(int, ARGS.concurrency.split(",")):
            row = asyncio.run(drive(server.grpc_target, requests, clients))
            row["of_offline"] = row["docs_per_s"] / base["docs_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        server.stop()
    print(f"\nworkload: {ARGS.requests} requests x {ARGS.docs} docs of {ARGS.doc_words} words; "
          f"offline engine {base['docs_per_s']:.1f} docs/s\n")
    print("| clients | docs/s | of offline | p50 ms | p95 ms | p99 ms | failures |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['docs_per_s']:.1f} | {100 * r['of_offline']:.0f}% | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['failures']} |")
    if overhead:
        print(f"\ngRPC overhead per request (p50, one at a time): {overhead['overhead_p50_ms']:.2f} ms "
              f"({overhead['grpc_p50_ms']:.2f} ms over gRPC vs {overhead['engine_p50_ms']:.2f} ms in process)")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps({"offline": base, "overhead": overhead, "rows": rows}, indent=2))
    if ARGS.plot:
        plot(rows, base["docs_per_s"], ARGS.plot, Path(ARGS.model_dir).name)
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())
