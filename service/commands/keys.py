"""``rerank keys create|list|revoke``: manage the API keys both fronts accept.

``create`` prints the new key alone on the last line of its output, so a script can take it
with ``tail -n 1``; it is shown only this once (the database keeps its hash).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when run: `rerank --help` stays light
    from sqlalchemy.ext.asyncio import AsyncEngine

    from service.keys import KeyStore
    from service.ledger import SqlLedger

HELP = "create, list and revoke API keys (stored in the usage ledger database)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a key and print it (once)",
                            formatter_class=parser.formatter_class)
    create.add_argument("--name", required=True, help="who or what the key is for (shown in lists)")
    create.add_argument("--rps", type=float, help="rate limit: requests per second (default: none)")
    create.add_argument("--dps", type=float, help="rate limit: documents per second (default: none)")
    create.add_argument("--quota", type=int, help="lifetime quota of billed documents (default: none)")
    create.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="restrict the key to this served model name; repeat for several (default: any). "
                             "For several deployments sharing one ledger database")
    listing = sub.add_parser("list", help="list keys (never the keys themselves) with billed usage",
                             formatter_class=parser.formatter_class)
    revoke = sub.add_parser("revoke", help="revoke a key at once, on every server sharing the database",
                            formatter_class=parser.formatter_class)
    revoke.add_argument("key_id", help="the key's id (key_...), as `keys list` shows it")
    for p in (create, listing, revoke):
        add_database_arguments(p)


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    """``--db`` / ``--data-dir``: shared by ``keys`` and ``serve`` so both open the same ledger."""
    parser.add_argument("--db", metavar="URL",
                        help="ledger database: postgresql://user:pass@host/db, sqlite:///path, or a "
                             "file path (default: ledger.sqlite3 in --data-dir)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where the default SQLite ledger lives (default: $RERANK_DATA_DIR, else "
                             "$XDG_DATA_HOME/rerank, else ~/.local/share/rerank)")


def run(args: argparse.Namespace) -> int:
    return run_on_ledger(args, lambda engine, where: _dispatch(args, engine, where))


async def _dispatch(args: argparse.Namespace, engine: AsyncEngine, where: str) -> int:
    from service.keys import KeyStore
    from service.ledger import SqlLedger

    store = KeyStore(engine)
    if args.keys_command == "create":
        return await _create(store, args, where)
    if args.keys_command == "list":
        return await _list(store, SqlLedger(engine))
    return await _revoke(store, args.key_id)


def run_on_ledger(args: argparse.Namespace, action: Callable[[AsyncEngine, str], Awaitable[int]]) -> int:
    """Run ``action`` on the ``--db`` ledger (schema ensured); an unreachable or failing
    database is one line on stderr and exit status 1, not a traceback."""
    return asyncio.run(_on_ledger(args, action))


async def _on_ledger(args: argparse.Namespace, action: Callable[[AsyncEngine, str], Awaitable[int]]) -> int:
    from service.errors import ServiceError

    try:
        async with _ledger_database(args) as (engine, where):
            return await action(engine, where)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


@asynccontextmanager
async def _ledger_database(args: argparse.Namespace) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """The ``--db`` / ``--data-dir`` database, schema ensured, and how to name it in output."""
    from service.db import create_schema, database_url, describe_url, open_engine

    url = database_url(args.db, args.data_dir)
    engine = open_engine(url)
    try:
        await create_schema(engine)
        yield engine, describe_url(url)
    finally:
        await engine.dispose()


async def _create(store: KeyStore, args: argparse.Namespace, where: str) -> int:
    try:
        new = await store.create(args.name, rate_limit_rps=args.rps, rate_limit_dps=args.dps,
                                 quota_documents=args.quota, models=args.models)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r = new.record
    print(f"created {r.key_id} ({r.name}) in {where}; rps={_opt(r.rate_limit_rps)} "
          f"dps={_opt(r.rate_limit_dps)} quota={_opt(r.quota_documents)} models={_models(r.models)}")
    print("the key is shown only now; store it:")
    print(new.key)
    return 0


async def _list(store: KeyStore, ledger: SqlLedger) -> int:
    billed = await ledger.billed_by_key()
    print(f"{'KEY_ID':22} {'PREFIX':14} {'STATUS':8} {'RPS':>7} {'DPS':>7} {'QUOTA':>10} "
          f"{'BILLED':>10}  {'CREATED':19}  {'MODELS':12} NAME")
    for r in await store.list():
        status = "revoked" if r.revoked else "active"
        print(f"{r.key_id:22} {r.display_prefix + '…':14} {status:8} {_opt(r.rate_limit_rps):>7} "
              f"{_opt(r.rate_limit_dps):>7} {_opt(r.quota_documents):>10} {billed.get(r.key_id, 0):>10}  "
              f"{_when(r.created_at)}  {_models(r.models):12} {r.name}")
    return 0


async def _revoke(store: KeyStore, key_id: str) -> int:
    record = await store.revoke(key_id)
    if record is None:
        print(f"error: no key {key_id}", file=sys.stderr)
        return 1
    print(f"revoked {record.key_id} ({record.name}) at {_when(record.revoked_at)}")
    return 0


def _opt(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def _models(models: frozenset[str] | None) -> str:
    return "any" if models is None else ",".join(sorted(models))


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")
