"""Measure: rounds of keyless callers announcing large Rerank messages on the gRPC port.

    python tests/measure_grpc_flood.py [--calls 128] [--mib 14] [--rounds 3] [--keyed] [--serve]

Server in this process (FakeRunner, keys required, default limits), or with ``--serve`` a real
``rerank serve`` on a tiny random checkpoint with a SQLite key table, in its own process (the
issue's setting; its RSS read from /proc/PID/status). The raw HTTP/2 client
(tests/h2_support.py) sends what the windows allow. Prints RSS idle -> peak -> after per
round, the statuses, and the message bytes the server let each call send.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # tests/ and the repo root (bench)

from h2_support import RawConnection  # noqa: E402
from rerank.v1 import rerank_pb2 as pb  # noqa: E402
from serving import running_app  # noqa: E402

from service.app import CoreParts  # noqa: E402
from service.errors import Code, ServiceError  # noqa: E402
from service.seams import Principal  # noqa: E402

RERANK = "/rerank.v1.RerankService/Rerank"
GOOD = "rk_live_" + "g" * 43


class Keys:
    def __init__(self) -> None:
        self.lookups = 0

    async def authenticate(self, api_key: str | None) -> Principal:
        self.lookups += 1
        if api_key != GOOD:
            raise ServiceError(Code.UNAUTHENTICATED, "missing API key" if not api_key else "unknown API key")
        return Principal("key_good", "good")


def message(size: int) -> bytes:
    """A valid RerankRequest of ``size`` bytes: one document of x's."""
    chars = size - 16
    while len(data := pb.RerankRequest(query="q", documents=["x" * chars]).SerializeToString()) != size:
        chars += size - len(data)
    return data


PID = "self"  # whose resident memory is measured: this process, or --serve's server


def rss_mib() -> float:
    for line in Path(f"/proc/{PID}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Peak(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.01)


async def round_(port: int, calls: int, size: int, payload: memoryview, metadata: tuple[tuple[str, str], ...],
                 per_conn: int) -> list[tuple[int | None, bool, int]]:
    conns = [await RawConnection.open("127.0.0.1", port) for _ in range((calls + per_conn - 1) // per_conn)]
    try:
        tasks = [conns[i // per_conn].call(RERANK, payload, size, metadata) for i in range(calls)]
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    finally:
        for c in conns:
            await c.close()
    return [(d.status, d.reset, d.sent) if not isinstance(d, BaseException) else (None, True, -1) for d in done]


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=128)
    p.add_argument("--mib", type=float, default=14)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-conn", type=int, default=16)
    p.add_argument("--keyed", action="store_true")
    p.add_argument("--serve", action="store_true", help="a real `rerank serve` (tiny checkpoint) in its own process")
    a = p.parse_args()
    size = int(a.mib * 2**20)
    payload = memoryview(message(size))
    metadata = (("authorization", f"Bearer {GOOD}"),) if a.keyed else ()
    keys = Keys()
    if a.serve:
        with tempfile.TemporaryDirectory() as tmp:
            await serve_rounds(a, Path(tmp), payload, size)
        return
    async with running_app(parts=CoreParts(auth=keys)) as app:
        await rounds(a, app.grpc.port, payload, size, metadata, keys)


async def serve_rounds(a: argparse.Namespace, tmp: Path, payload: memoryview, size: int) -> None:
    global PID
    from bench.load.servers import ServeProcess, create_api_key
    from worker.offline import make_random_reranker

    model = make_random_reranker(tmp / "tiny", "tiny", seed=0)
    db = f"sqlite:///{tmp / 'ledger.sqlite3'}"
    key = create_api_key(db, "measure")
    metadata = (("authorization", f"Bearer {key}"),) if a.keyed else ()
    with ServeProcess(str(model), tmp / "serve.log", db_url=db, extra_args=["--auth"],
                      env={"OMP_NUM_THREADS": "1"}) as server:
        server.start().wait_ready()
        assert server.proc is not None
        PID = str(server.proc.pid)
        await rounds(a, server.grpc_port, payload, size, metadata, None)


async def rounds(a: argparse.Namespace, port: int, payload: memoryview, size: int,
                 metadata: tuple[tuple[str, str], ...], keys: Keys | None) -> None:
    await asyncio.sleep(0.5)
    idle = rss_mib()
    print(f"idle {idle:.0f} MiB")
    for r in range(a.rounds):
        peak = Peak()
        peak.start()
        t0 = time.perf_counter()
        results = await round_(port, a.calls, size, payload, metadata, a.per_conn)
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        peak.stop.set()
        peak.join()
        statuses = collections.Counter((s, reset) for s, reset, _ in results)
        sent = sorted(x for _, _, x in results)
        print(f"round {r + 1}: {idle:.0f} -> {peak.peak:.0f} -> {rss_mib():.0f} MiB in {wall:.1f}s; "
              f"statuses (grpc-status, reset): {dict(statuses)}; sent KiB min/median/max "
              f"{sent[0] // 1024}/{sent[len(sent) // 2] // 1024}/{sent[-1] // 1024}"
              + (f"; lookups {keys.lookups}" if keys else ""))


if __name__ == "__main__":
    asyncio.run(main())
