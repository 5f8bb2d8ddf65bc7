"""The ledger against the clients: every success billed once, no failure billed, documents add up.

The clients know which logical requests succeeded; the usage ledger knows what was billed,
with each record's idempotency key. Matching the two by key is the whole check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.load.driver import Outcome, Verdict


class BilledRecord(Protocol):
    """A usage record as ``service.billing.ledger.SqlLedger.records`` returns it."""

    @property
    def idempotency_key(self) -> str | None: ...
    @property
    def documents(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Reconciliation:
    succeeded: int
    failed: int
    records: int
    billed_documents: int
    succeeded_documents: int  # what the clients were told they were billed
    missing: list[str] = field(default_factory=list)  # succeeded, never billed
    duplicated: list[str] = field(default_factory=list)  # billed more than once
    billed_failures: list[str] = field(default_factory=list)  # failed, billed anyway
    wrong_documents: list[str] = field(default_factory=list)  # billed other documents than reported
    unknown: int = 0  # records whose key no client sent (or without a key)

    @property
    def ok(self) -> bool:
        return (not self.missing and not self.duplicated and not self.billed_failures and not self.unknown
                and not self.wrong_documents and self.billed_documents == self.succeeded_documents)

    def describe(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (f"ledger {verdict}: {self.succeeded} succeeded, {self.failed} failed; {self.records} "
                f"records, {self.billed_documents} documents billed vs {self.succeeded_documents} "
                f"reported to clients; missing {len(self.missing)}, duplicated {len(self.duplicated)}, "
                f"billed failures {len(self.billed_failures)}, wrong documents {len(self.wrong_documents)}, "
                f"unknown {self.unknown}")


def reconcile(outcomes: Sequence[Outcome], records: Iterable[BilledRecord]) -> Reconciliation:
    records = list(records)
    billed = Counter(r.idempotency_key for r in records)
    documents: Counter[str | None] = Counter()
    for r in records:
        documents[r.idempotency_key] += r.documents
    ok = {o.key: o for o in outcomes if o.ok}
    failed = {o.key for o in outcomes if not o.ok}
    sent = ok.keys() | failed
    return Reconciliation(
        succeeded=len(ok), failed=len(failed), records=len(records),
        billed_documents=sum(r.documents for r in records),
        succeeded_documents=sum(_billed_to_client(o) for o in ok.values()),
        missing=sorted(k for k in ok if billed[k] == 0),
        duplicated=sorted(k for k, n in billed.items() if k is not None and n > 1),
        billed_failures=sorted(k for k in failed if billed[k] > 0),
        wrong_documents=sorted(k for k, o in ok.items() if billed[k] == 1 and documents[k] != _billed_to_client(o)),
        unknown=sum(n for k, n in billed.items() if k is None or k not in sent))


def _billed_to_client(outcome: Outcome) -> int:
    """Documents the successful attempt reported; a replay reports the original's usage."""
    final = outcome.final
    if final.verdict is not Verdict.OK:
        raise AssertionError("billing asked of a request that did not succeed: this is a bug")
    return final.billed_documents


async def read_records(db_url: str, key_id: str | None = None) -> list[BilledRecord]:
    """Every usage record in the ledger at ``db_url`` (of one API key), via the service's ledger."""
    from service.billing.db import open_engine
    from service.billing.ledger import SqlLedger

    engine = open_engine(db_url)
    try:
        return list(await SqlLedger(engine).records(key_id))
    finally:
        await engine.dispose()
