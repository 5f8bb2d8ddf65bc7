"""``rerank keys create|list|update|revoke``: manage the API keys both fronts accept.

``create`` prints the new key alone on the last line of its output, so a script can take it
with ``tail -n 1``; it is shown only this once (the database keeps its hash). ``update``
changes a key's limits in place (``none`` removes one); every replica sees it on the key's
next call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when run: `rerank --help` stays light
    from sqlalchemy.ext.asyncio import AsyncEngine

    from service.billing.keys import KeyRecord, KeyStore
    from service.billing.ledger import SqlLedger

HELP = "create, list, update and revoke API keys (stored in the usage ledger database)"

# flag (its dest) -> KeyStore setting; `update` takes the same flags as `create`
_SETTING_FLAGS = {"rps": "rate_limit_rps", "dps": "rate_limit_dps", "tpm": "rate_limit_tpm",
                  "quota": "quota_documents", "default_priority": "default_priority",
                  "best_priority": "best_priority"}


def _add_setting_arguments(parser: argparse.ArgumentParser, parse: Callable[[type], Callable[[str], object]],
                           unset: Callable[[str], str]) -> None:
    """The key settings' flags; ``unset(meaning)`` says what leaving one out does."""
    parser.add_argument("--rps", type=parse(float), help=f"rate limit: requests per second ({unset('no limit')})")
    parser.add_argument("--dps", type=parse(float), help=f"rate limit: documents per second ({unset('no limit')})")
    parser.add_argument("--tpm", type=parse(float),
                        help=f"rate limit: prompt tokens per minute ({unset('no limit')})")
    parser.add_argument("--quota", type=parse(int), help=f"lifetime quota of billed documents ({unset('no quota')})")
    parser.add_argument("--default-priority", type=parse(int), metavar="N",
                        help=f"scheduling priority, 0 (first) to 999, of calls that name none ({unset('0')})")
    parser.add_argument("--best-priority", type=parse(int), metavar="N",
                        help=f"the best (lowest) priority the key's calls may ask for; better is clamped "
                             f"to it ({unset('any')})")


def _as_is(kind: type) -> Callable[[str], object]:
    return kind


def _or_none(kind: type) -> Callable[[str], object]:
    """``kind``, or the word ``none``: remove the setting."""
    def parse(value: str) -> object:
        return "none" if value == "none" else kind(value)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a key and print it (once)",
                            formatter_class=parser.formatter_class)
    create.add_argument("--name", required=True, help="who or what the key is for (shown in lists)")
    _add_setting_arguments(create, _as_is, lambda meaning: f"unset: {meaning}")
    create.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="restrict the key to this served model name; repeat for several (default: any). "
                             "For several deployments sharing one ledger database")
    listing = sub.add_parser("list", help="list keys (never the keys themselves) with billed usage",
                             formatter_class=parser.formatter_class)
    update = sub.add_parser("update", help="change a key's limits and priorities, at once on every server "
                                           "sharing the database")
    update.add_argument("key_id", help="the key's id (key_...), as `keys list` shows it")
    _add_setting_arguments(update, _or_none, lambda meaning: f"default: unchanged; 'none' unsets it: {meaning}")
    revoke = sub.add_parser("revoke", help="revoke a key at once, on every server sharing the database",
                            formatter_class=parser.formatter_class)
    revoke.add_argument("key_id", help="the key's id (key_...), as `keys list` shows it")
    for p in (create, listing, update, revoke):
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
    from service.billing.keys import KeyStore
    from service.billing.ledger import SqlLedger

    store = KeyStore(engine)
    if args.keys_command == "create":
        return await _create(store, args, where)
    if args.keys_command == "list":
        return await _list(store, SqlLedger(engine))
    if args.keys_command == "update":
        return await _update(store, args)
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
    except (OSError, ValueError) as exc:  # unreachable, or a ledger too old to migrate
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


@asynccontextmanager
async def _ledger_database(args: argparse.Namespace) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """The ``--db`` / ``--data-dir`` database, schema ensured, and how to name it in output."""
    from service.billing import prepare_schema
    from service.billing.db import database_url, describe_url, open_engine

    url = database_url(args.db, args.data_dir)
    await asyncio.to_thread(prepare_schema, url)  # an older ledger is migrated here too
    engine = open_engine(url)
    try:
        yield engine, describe_url(url)
    finally:
        await engine.dispose()


async def _create(store: KeyStore, args: argparse.Namespace, where: str) -> int:
    try:
        new = await store.create(args.name, models=args.models, **_settings_given(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created {new.record.key_id} ({new.record.name}) in {where}; {_settings(new.record)}")
    print("the key is shown only now; store it:")
    print(new.key)
    return 0


async def _update(store: KeyStore, args: argparse.Namespace) -> int:
    changes = {name: (None if value == "none" else value) for name, value in _settings_given(args).items()
               if value is not None}
    try:
        record = await store.update(args.key_id, **changes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if record is None:
        print(f"error: no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"updated {record.key_id} ({record.name}); {_settings(record)}")
    return 0


def _settings_given(args: argparse.Namespace) -> dict[str, Any]:  # a value, None (not given) or 'none'
    return {setting: getattr(args, flag) for flag, setting in _SETTING_FLAGS.items()}


def _settings(r: KeyRecord) -> str:
    return (f"rps={_opt(r.rate_limit_rps)} dps={_opt(r.rate_limit_dps)} tpm={_opt(r.rate_limit_tpm)} "
            f"quota={_opt(r.quota_documents)} priority={_priorities(r)} models={_models(r.models)}")


def _priorities(r: KeyRecord) -> str:
    """default/best, as in `list`."""
    return f"{_opt(r.default_priority)}/{_opt(r.best_priority)}"


async def _list(store: KeyStore, ledger: SqlLedger) -> int:
    billed = await ledger.billed_by_key()
    print(f"{'KEY_ID':22} {'PREFIX':14} {'STATUS':8} {'RPS':>7} {'DPS':>7} {'TPM':>9} {'QUOTA':>10} "
          f"{'BILLED':>10} {'PRIORITY':>8}  {'CREATED':19}  {'MODELS':12} NAME")
    for r in await store.list():
        status = "revoked" if r.revoked else "active"
        print(f"{r.key_id:22} {r.display_prefix + '…':14} {status:8} {_opt(r.rate_limit_rps):>7} "
              f"{_opt(r.rate_limit_dps):>7} {_opt(r.rate_limit_tpm):>9} {_opt(r.quota_documents):>10} "
              f"{billed.get(r.key_id, 0):>10} {_priorities(r):>8}  "
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
