"""``python -m bench.load``: sweep concurrency over gRPC and HTTP, then reconcile the ledger.

    # everything local: a tiny model, a SQLite ledger, one `rerank serve`, the full sweep
    python -m bench.load --spawn --clients 1,2,4,8,16,32,64,128,256

    # a server you started (loopback only); --db reconciles against its ledger
    python -m bench.load --grpc 127.0.0.1:50051 --http http://127.0.0.1:8080 \\
        --api-key rk_live_... --db postgresql://user:pw@127.0.0.1/rerank

Every level runs ``--clients`` closed-loop clients for at most ``--requests-per-client``
requests each and at most ``--time-limit-s`` seconds, so the sweep ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.load.driver import Level, LevelRun, Outcome, RetryPolicy, Transport, resolve, run_level
from bench.load.reconcile import read_records, reconcile
from bench.load.report import LevelSummary, markdown_table
from bench.load.servers import ServeProcess, create_api_key, require_loopback
from bench.load.transports import GrpcTransport, HttpTransport
from bench.load.workload import Workload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("where")
    where.add_argument("--spawn", action="store_true", help="start a local `rerank serve` (tiny model "
                       "unless --model) with a SQLite ledger and an API key, and stop it afterwards")
    where.add_argument("--model", help="with --spawn: checkpoint directory or hub id to serve")
    where.add_argument("--serve-arg", action="append", default=[], help="with --spawn: extra "
                       "`rerank serve` argument (repeatable, e.g. --serve-arg=--max-batch-tokens=4096)")
    where.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                       help="with --spawn: environment for the server (repeatable, e.g. OMP_NUM_THREADS=1)")
    where.add_argument("--grpc", action="append", default=[], help="gRPC target host:port (repeat for "
                       "round_robin over several replicas)")
    where.add_argument("--http", action="append", default=[], help="HTTP base URL (repeat to alternate)")
    where.add_argument("--api-key", help="bearer key to send")
    where.add_argument("--db", help="ledger database URL to reconcile against")
    load = p.add_argument_group("load")
    load.add_argument("--front", default="grpc,http", help="which fronts to drive, in order")
    load.add_argument("--clients", default="1,2,4,8,16,32,64,128,256", help="concurrency levels")
    load.add_argument("--requests-per-client", type=int, default=8)
    load.add_argument("--time-limit-s", type=float, default=60.0, help="per level")
    load.add_argument("--documents", type=int, default=8, help="per request")
    load.add_argument("--words-per-document", type=int, default=24)
    load.add_argument("--timeout-s", type=float, default=30.0, help="per attempt")
    load.add_argument("--give-up-s", type=float, default=60.0, help="per logical request")
    load.add_argument("--retry-rejected", action="store_true", help="also resend after 429/RESOURCE_EXHAUSTED")
    load.add_argument("--no-resolve", dest="resolve", action="store_false", help="after the load, do not "
                      "resend (same key) the requests whose clients gave up on an unknown outcome")
    p.add_argument("--out", type=Path, help="write the summaries and reconciliation as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.spawn:
        with spawned(args) as (grpc, http, key, db):
            args.grpc, args.http, args.api_key, args.db = [grpc], [http], key, db
            return asyncio.run(sweep(args))
    if not args.grpc and not args.http:
        sys.exit("give --spawn, or --grpc and/or --http targets")
    for target in [*args.grpc, *args.http]:
        require_loopback(target)
    return asyncio.run(sweep(args))


@contextmanager
def spawned(args: argparse.Namespace) -> Iterator[tuple[str, str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="rerank-load-") as tmp:
        model = args.model or str(_tiny_model(Path(tmp) / "model"))
        db = f"sqlite:///{tmp}/ledger.sqlite3"
        key = create_api_key(db, "load")
        env = dict(item.split("=", 1) for item in args.serve_env)
        server = ServeProcess(model, Path(tmp) / "serve.log", db_url=db, extra_args=["--auth", *args.serve_arg],
                              env=env)
        with server.start():
            server.wait_ready()
            print(f"serving {model} on {server.grpc_target} and {server.http_url}", file=sys.stderr)
            yield server.grpc_target, server.http_url, key, db
            server.stop()


def _tiny_model(path: Path) -> Path:
    from worker.offline import make_random_reranker

    return Path(make_random_reranker(path, "tiny", seed=0))


def make_transport(front: str, args: argparse.Namespace, timeout_s: float | None = None) -> Transport:
    timeout_s = timeout_s or args.timeout_s
    if front == "grpc" and args.grpc:
        return GrpcTransport(args.grpc, api_key=args.api_key, timeout_s=timeout_s)
    if front == "http" and args.http:
        return HttpTransport(args.http, api_key=args.api_key, timeout_s=timeout_s)
    raise SystemExit(f"front {front!r}: no target given for it")


async def sweep(args: argparse.Namespace) -> int:
    workload = Workload(documents=args.documents, words_per_document=args.words_per_document)
    policy = RetryPolicy(give_up_s=args.give_up_s, retry_rejected=args.retry_rejected)
    runs: list[LevelRun] = []
    final: list[Outcome] = []  # after resolving unknown outcomes: what reconciliation compares
    for front in args.front.split(","):
        transport = make_transport(front, args)
        try:
            mine: list[LevelRun] = []
            for clients in (int(c) for c in args.clients.split(",")):
                level = Level(clients, args.requests_per_client, args.time_limit_s)
                mine.append(await run_level(transport, level, workload, policy, first_n=_next_n(runs + mine)))
                print(markdown_table([LevelSummary.of(mine[-1])]).splitlines()[-1], file=sys.stderr)
            outcomes = [o for r in mine for o in r.outcomes]
            final += await _resolve(front, args, outcomes) if args.resolve else outcomes
            runs += mine
        finally:
            await transport.close()
    return await _finish(args, workload, runs, final)


async def _resolve(front: str, args: argparse.Namespace, outcomes: list[Outcome]) -> list[Outcome]:
    """Resend the requests given up on an unknown outcome, now that the load is over: patiently,
    whatever the load's own timeouts were."""
    transport = make_transport(front, args, timeout_s=_PATIENT.give_up_s)
    try:
        return await resolve(transport, outcomes, _PATIENT)
    finally:
        await transport.close()


_PATIENT = RetryPolicy(max_attempts=10, give_up_s=60.0)


def _next_n(runs: Sequence[LevelRun]) -> int:
    return sum(r.level.clients * r.level.requests_per_client for r in runs)


async def _finish(args: argparse.Namespace, workload: Workload, runs: Sequence[LevelRun],
                  outcomes: Sequence[Outcome]) -> int:
    summaries = [LevelSummary.of(r) for r in runs]
    print(markdown_table(summaries))
    gave_up = [o for r in runs for o in r.outcomes if o.unresolved]
    resolved = {o.key: o for o in outcomes if o.key in {g.key for g in gave_up}}
    replayed = sum(o.ok and o.final.replayed for o in resolved.values())
    print(f"{len(gave_up)} requests given up on an unknown outcome; resent with their keys: "
          f"{sum(o.ok for o in resolved.values())} succeeded, {replayed} of them replays of calls the "
          "server had billed after the client gave up")
    result: dict[str, object] = {"levels": [dataclasses.asdict(s) for s in summaries],
                                 "gave_up_unknown": len(gave_up), "resolved_replayed": replayed}
    status = 0
    if args.db:
        prefix = f"load-{workload.run_id}-"
        records = [r for r in await read_records(args.db) if (r.idempotency_key or "").startswith(prefix)]
        rec = reconcile(outcomes, records)
        print(rec.describe())
        result["reconciliation"] = {**dataclasses.asdict(rec), "ok": rec.ok}
        status = 0 if rec.ok else 1
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
