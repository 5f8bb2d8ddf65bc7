"""``rerank usage``: what the ledger billed, per key and day, for invoices and audits."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import date
from typing import TYPE_CHECKING

from service.commands.keys import add_database_arguments, run_on_ledger

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

HELP = "show billed usage from the ledger: every key's total, or one key by UTC day"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key_id", nargs="?", help="one key (key_...): its usage by day; omit for all keys' totals")
    parser.add_argument("--since", type=date.fromisoformat, metavar="YYYY-MM-DD", help="first UTC day (inclusive)")
    parser.add_argument("--until", type=date.fromisoformat, metavar="YYYY-MM-DD", help="last UTC day (inclusive)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_database_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_on_ledger(args, lambda engine, _: _show(args, engine))


async def _show(args: argparse.Namespace, engine: AsyncEngine) -> int:
    from service.billing.ledger import SqlLedger

    ledger = SqlLedger(engine)
    if args.key_id is None:
        _print_totals(await ledger.billed_by_key(), args.json)
    else:
        report = await ledger.usage(args.key_id, since=args.since, until=args.until)
        _print_report(asdict(report), args.json)
    return 0


def _print_totals(billed: dict[str, int], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"documents_by_key": billed}))
        return
    print(f"{'KEY_ID':22} {'DOCUMENTS':>12}")
    for key_id, documents in sorted(billed.items()):
        print(f"{key_id:22} {documents:>12}")


def _print_report(report: dict, as_json: bool) -> None:  # type: ignore[type-arg]
    if as_json:
        print(json.dumps(report))
        return
    print(f"{'DAY (UTC)':10} {'REQUESTS':>9} {'DOCUMENTS':>10} {'PROMPT_TOK':>11} {'COMPUTED_TOK':>13}")
    for day, t in [*report["days"], ("total", report["total"])]:
        print(f"{day:10} {t['requests']:>9} {t['documents']:>10} {t['prompt_tokens']:>11} {t['computed_tokens']:>13}")
