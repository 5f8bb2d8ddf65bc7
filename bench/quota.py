"""What a quota costs the ledger: billing alone against reserve + billing, per call.

    python bench/quota.py [--db URL] [--calls 400] [--concurrency 1,16]

No model: each call is the ledger's part of a real call (``reserve`` when the key has a
quota, then ``record`` with a one-document reply), run ``--concurrency`` at a time for one
key, the worst case for the key's lock. A fresh SQLite file by default; ``--db`` a
PostgreSQL URL (an empty database: the tables are created, then the key's rows deleted).
Prints calls per second and p50/p99 per call, side by side, and the check that no quota was
overshot.
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

from service.billing import prepare_schema  # noqa: E402
from service.billing.db import database_url, open_engine  # noqa: E402
from service.billing.keys import KeyStore  # noqa: E402
from service.billing.ledger import SqlLedger  # noqa: E402
from service.calls import QueryOutcome, RankedDoc, RerankReply  # noqa: E402
from service.seams import Principal  # noqa: E402


def reply(n: int) -> RerankReply:
    return RerankReply(f"req-{n}", "bench", [QueryOutcome([RankedDoc(0, 0.5, 0.0, False)], 1, 80, 80)])


async def one_call(ledger: SqlLedger, principal: Principal, n: int) -> float:
    started = time.perf_counter()
    reservation = await ledger.reserve(principal, 1)
    await ledger.record(principal, reply(n), None, "", reservation)
    return time.perf_counter() - started


async def run(ledger: SqlLedger, principal: Principal, calls: int, concurrency: int) -> dict[str, float]:
    seconds: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def bounded(n: int) -> None:
        async with gate:
            seconds.append(await one_call(ledger, principal, n))

    started = time.perf_counter()
    await asyncio.gather(*(bounded(n) for n in range(calls)))
    wall = time.perf_counter() - started
    ms = sorted(1000 * s for s in seconds)
    return {"calls_per_s": calls / wall, "p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))]}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url(args.db or f"{tmp}/ledger.sqlite3")
        prepare_schema(url)
        engine = open_engine(url)
        try:
            keys, ledger = KeyStore(engine), SqlLedger(engine)
            for concurrency in args.concurrency:
                for label, quota in (("no quota", None), ("quota", args.calls)):
                    principal = (await keys.create(label, quota_documents=quota)).record.principal()
                    r = await run(ledger, principal, args.calls, concurrency)
                    billed = len(await ledger.records(principal.key_id))
                    print(f"{engine.dialect.name} concurrency {concurrency:3d} {label:9s}: "
                          f"{r['calls_per_s']:7.0f} calls/s, p50 {r['p50_ms']:6.2f} ms, p99 {r['p99_ms']:6.2f} ms"
                          f"; billed {billed} of {quota or '-'}")
                    if quota is not None and billed != quota:
                        raise SystemExit(f"quota of {quota} ended with {billed} billed: this is a bug")
        finally:
            await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="PostgreSQL URL (default: a fresh SQLite file)")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 16])
    asyncio.run(main(parser.parse_args()))
