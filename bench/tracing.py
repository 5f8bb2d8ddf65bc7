"""What tracing costs: one ``rerank serve`` with tracing off and one with it on (exporting over
OTLP/gRPC to a receiver in this process), side by side on the same machine, the same
closed-loop gRPC load on each in alternating rounds, so drift and noisy neighbours hit both.

    python bench/tracing.py --model-dir models/tiny [--requests 400 --concurrency 8 --docs 8 --rounds 3]
    python bench/tracing.py --in-process [--requests 400 --rounds 3]

``--in-process`` measures the spans' own cost without a model: one process, a fake model
(``worker.fake.FakeRunner``), the app started with tracing off, then on, and so on, and the
process's CPU time per call (client, server and the exporter's thread together; the same
client work in both modes), which a noisy neighbour does not inflate as it does wall time.

The tiny checkpoint makes each call's model work as small as it gets, so the per-call cost of
the spans (about a dozen per call, and one per batch) is the largest share it can be: an
upper bound for a real model's. Prints requests/s and p50/p99 latency per round and mode,
the server's CPU time per call (user + system, from /proc: steadier than throughput on a
shared machine), and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load.servers import ServeProcess  # noqa: E402
from clients import AsyncRerankClient  # noqa: E402
from tests.otlp_support import Receiver  # noqa: E402

WORDS = "search ranking query document passage answer city river capital history science".split()


async def round_of(target: str, requests: int, concurrency: int, docs: int) -> tuple[float, list[float]]:
    """(requests per second, each call's seconds): ``concurrency`` clients, each its share in turn."""
    latencies: list[float] = []

    async def client_loop(n: int) -> None:
        async with AsyncRerankClient(target, timeout_s=120) as client:
            for i in range(n, requests, concurrency):  # a fresh query per call: no prefix is cached twice
                documents = [" ".join(WORDS[(i + d + k) % len(WORDS)] for k in range(24)) for d in range(docs)]
                started = time.perf_counter()
                await client.rerank(f"query {i} {WORDS[i % len(WORDS)]}", documents)
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(n) for n in range(concurrency)))
    return requests / (time.perf_counter() - started), latencies


def cpu_seconds(server: ServeProcess) -> float:
    """The server process's user + system CPU time so far (Linux): what its calls cost it,
    whatever else runs on the machine."""
    assert server.proc is not None
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Figures = dict[str, list[tuple[float, float]]]  # mode: (requests/s, server CPU ms per call) per round


async def measure(servers: dict[str, ServeProcess], args: argparse.Namespace) -> Figures:
    figures: Figures = {mode: [] for mode in servers}
    for server in servers.values():
        await round_of(server.grpc_target, 4 * args.concurrency, args.concurrency, args.docs)  # warm up
    for r in range(args.rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))  # who goes first alternates
        for mode in order:
            cpu = cpu_seconds(servers[mode])
            rps, latencies = await round_of(servers[mode].grpc_target, args.requests, args.concurrency, args.docs)
            cpu_ms = 1000 * (cpu_seconds(servers[mode]) - cpu) / args.requests
            figures[mode].append((rps, cpu_ms))
            print(f"round {r + 1} tracing {mode:3}: {rps:7.1f} req/s, p50 {1000 * percentile(latencies, 0.5):6.1f} ms,"
                  f" p99 {1000 * percentile(latencies, 0.99):6.1f} ms, server CPU {cpu_ms:5.2f} ms a call", flush=True)
    return figures


async def in_process_round(traced: str | None, args: argparse.Namespace) -> tuple[float, float]:
    """(requests/s, process CPU ms per call) of one round on a fresh app: tracing off, or to ``traced``."""
    from tests.serving import running_app, target

    async with running_app(**({"otlp_endpoint": traced} if traced else {})) as app:
        await round_of(target(app), 4 * args.concurrency, args.concurrency, args.docs)  # warm up
        cpu = time.process_time()
        rps, _ = await round_of(target(app), args.requests, args.concurrency, args.docs)
        return rps, 1000 * (time.process_time() - cpu) / args.requests


def in_process(args: argparse.Namespace) -> None:
    modes = args.modes.split(",")
    figures: Figures = {mode: [] for mode in modes}
    with Receiver(keep=False) as receiver:
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else reversed(modes):
                rps, cpu_ms = asyncio.run(in_process_round(receiver.endpoint if mode == "on" else None, args))
                figures[mode].append((rps, cpu_ms))
                print(f"round {r + 1} tracing {mode:3}: {rps:7.1f} req/s, process CPU {cpu_ms:5.2f} ms a call",
                      flush=True)
        if len(modes) == 2:
            report(figures, receiver)
        else:  # one mode: e.g. off on this tree and on an older one, to compare by hand
            print(f"median: {statistics.median(f[1] for f in figures[modes[0]]):.3f} CPU ms a call")


def report(figures: Figures, receiver: Receiver) -> None:
    (off, off_cpu), (on, on_cpu) = ((statistics.median(f[0] for f in figures[m]),
                                     statistics.median(f[1] for f in figures[m])) for m in ("off", "on"))
    print(f"median: off {off:.1f} req/s, {off_cpu:.2f} CPU ms a call; on {on:.1f} req/s "
          f"({100 * (on / off - 1):+.1f}%), {on_cpu:.2f} CPU ms a call (+{on_cpu - off_cpu:.2f} ms); "
          f"{receiver.exports} OTLP exports, {receiver.bytes_received} bytes received")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a checkpoint for two real rerank serve processes")
    parser.add_argument("--in-process", action="store_true", help="a fake model in this process instead")
    parser.add_argument("--requests", type=int, default=400, help="calls per round and mode")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--docs", type=int, default=8, help="documents per call (~30 tokens each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="off,on", choices=["off,on", "off"],
                        help="--in-process: 'off' alone runs on a tree without tracing too (copy this file "
                             "and tests/otlp_support.py there)")
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
        return
    if not args.model_dir:
        parser.error("--model-dir or --in-process")
    with tempfile.TemporaryDirectory() as tmp, Receiver(keep=False) as receiver:
        common, env = ["--no-auth", "--data-dir", tmp], {"OMP_NUM_THREADS": "1"}  # no spinning threads' CPU
        servers = {"off": ServeProcess(args.model_dir, Path(tmp) / "off.log", extra_args=common, env=env),
                   "on": ServeProcess(args.model_dir, Path(tmp) / "on.log", env=env,
                                      extra_args=[*common, "--otlp-endpoint", receiver.endpoint])}
        for server in servers.values():
            server.start()
        try:
            for server in servers.values():
                server.wait_ready(300)
            figures = asyncio.run(measure(servers, args))
        finally:
            for server in servers.values():
                server.stop()
        report(figures, receiver)


if __name__ == "__main__":
    main()
