"""The usage ledger: exactly one usage record per successful call, never two for a retry.

``record`` writes the usage record and, for a call with an idempotency key, the stored
reply, in one transaction. The idempotency table's primary key (caller, idempotency key)
settles concurrent duplicates: the first commit wins, the loser's insert fails, its
transaction (usage record included) rolls back, and it returns the winner's reply, unbilled.

Once scoring has finished the write is shielded from cancellation: a caller that goes away
mid-write cannot leave it half done, and a retry with the same idempotency key gets the
result for free. A call whose write fails (database down) fails with UNAVAILABLE, unbilled.

Idempotency records expire after ``idempotency_ttl`` (24 hours by default, the window retries
happen in): an expired key is free again, and its next call is a new, billed one. Expired rows
are deleted in the background, at most once per ``purge_interval`` per process, after a keyed
call; usage records are never deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import delete, func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.core import Principal, RerankReply, UsageReport, UsageTotals
from service.db import idempotency_records, unavailable, usage_records
from service.errors import Code, ServiceError

log = logging.getLogger(__name__)

DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    key_id: str
    request_id: str
    model: str
    queries: int
    documents: int
    prompt_tokens: int
    computed_tokens: int
    idempotency_key: str | None
    created_at: datetime


class SqlLedger:
    """A ``UsageLedger`` on the ledger database (SQLite or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine, *, idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
                 purge_interval_s: float = 600.0) -> None:
        if idempotency_ttl <= timedelta(0):
            raise ValueError(f"the idempotency TTL must be positive, got {idempotency_ttl}")
        self.engine = engine
        self.idempotency_ttl = idempotency_ttl
        self.purge_interval_s = purge_interval_s
        self._next_purge = 0.0  # time.monotonic() after which a keyed call starts a purge
        self._purging: asyncio.Task[int] | None = None

    def _cutoff(self) -> datetime:
        """Idempotency records created before this have expired."""
        return datetime.now(UTC) - self.idempotency_ttl

    async def replay(self, principal: Principal, idempotency_key: str, fingerprint: str) -> RerankReply | None:
        table = idempotency_records
        with unavailable("looking up the idempotency key"):
            async with self.engine.connect() as conn:
                row = (await conn.execute(
                    select(table.c.fingerprint, table.c.reply)
                    .where(table.c.key_id == principal.key_id,
                           table.c.idempotency_key == idempotency_key,
                           table.c.created_at >= self._cutoff()))).first()
        if row is None:
            return None
        if row.fingerprint != fingerprint:
            raise ServiceError(Code.IDEMPOTENCY_CONFLICT,
                               "this idempotency key was already used for a different request; "
                               "send a new key for a new request")
        return dataclasses.replace(RerankReply.from_json(row.reply), replayed=True)

    async def record(self, principal: Principal, reply: RerankReply, idempotency_key: str | None,
                     fingerprint: str) -> RerankReply:
        recorded = await asyncio.shield(self._record(principal, reply, idempotency_key, fingerprint))
        if idempotency_key:
            self._maybe_purge()
        return recorded

    async def _record(self, principal: Principal, reply: RerankReply, idempotency_key: str | None,
                      fingerprint: str) -> RerankReply:
        now = datetime.now(UTC)
        with unavailable("billing the call"):
            # A second try only when the key is taken: by an expired record (rare, and deleted
            # in the retry's transaction, so the common path costs no extra statement) or by
            # a live one, which fails the retry too and is replayed below.
            for retry in (False, True) if idempotency_key else (False,):
                try:
                    async with self.engine.begin() as conn:
                        if idempotency_key:  # first: a duplicate fails before anything is written
                            if retry:
                                await conn.execute(delete(idempotency_records).where(
                                    idempotency_records.c.key_id == principal.key_id,
                                    idempotency_records.c.idempotency_key == idempotency_key,
                                    idempotency_records.c.created_at < now - self.idempotency_ttl))
                            await conn.execute(insert(idempotency_records).values(
                                key_id=principal.key_id, idempotency_key=idempotency_key,
                                fingerprint=fingerprint, reply=reply.to_json(), created_at=now))
                        await conn.execute(insert(usage_records).values(
                            key_id=principal.key_id, request_id=reply.request_id, model=reply.model,
                            queries=len(reply.outcomes), documents=reply.billed_documents,
                            prompt_tokens=reply.prompt_tokens, computed_tokens=reply.computed_tokens,
                            idempotency_key=idempotency_key or None, created_at=now,
                            day=now.date().isoformat()))
                    return reply
                except IntegrityError:
                    if not idempotency_key:
                        raise
        # A concurrent duplicate committed first: its reply stands, and this call is free.
        assert idempotency_key is not None
        stored = await self.replay(principal, idempotency_key, fingerprint)
        if stored is None:
            raise AssertionError("idempotency record missing after a unique violation: this is a bug")
        return stored

    async def purge_expired(self, chunk: int = 5000) -> int:
        """Delete expired idempotency records; how many. In transactions of ``chunk`` rows, so a
        first purge of a large old table never holds the write lock (SQLite's is the whole
        database) long enough to stall billing. Safe on several replicas at once."""
        t = idempotency_records
        cutoff = self._cutoff()
        expired = select(t.c.key_id, t.c.idempotency_key).where(t.c.created_at < cutoff).limit(chunk)
        purged = 0
        while True:
            with unavailable("deleting expired idempotency records"):
                async with self.engine.begin() as conn:
                    result = await conn.execute(
                        delete(t).where(tuple_(t.c.key_id, t.c.idempotency_key).in_(expired)))
            deleted = int(result.rowcount or 0)
            purged += deleted
            if deleted < chunk:
                return purged

    def _maybe_purge(self) -> None:
        """Start a background purge when one is due and none is running (never awaited by a call)."""
        now = time.monotonic()
        if now < self._next_purge or (self._purging is not None and not self._purging.done()):
            return
        self._next_purge = now + self.purge_interval_s
        self._purging = asyncio.create_task(self._purge_logged(), name="purge-idempotency-records")

    async def _purge_logged(self) -> int:
        try:
            purged = await self.purge_expired()
        except ServiceError:  # already logged by `unavailable`; the next interval tries again
            return 0
        if purged:
            log.info("deleted %d idempotency records older than %s", purged, self.idempotency_ttl)
        return purged

    async def close(self) -> None:
        """Close the database's connection pool (shared with the key store): after the servers."""
        if self._purging is not None and not self._purging.done():
            self._purging.cancel()
            await asyncio.gather(self._purging, return_exceptions=True)
        await self.engine.dispose()

    # -- reading ---------------------------------------------------------------------------
    async def used_documents(self, key_id: str) -> int:
        """Documents billed to ``key_id`` so far (for quotas)."""
        with unavailable("reading usage"):
            async with self.engine.connect() as conn:
                total = await conn.scalar(select(func.coalesce(func.sum(usage_records.c.documents), 0))
                                          .where(usage_records.c.key_id == key_id))
        return int(total or 0)

    async def usage(self, key_id: str, since: date | None = None, until: date | None = None) -> UsageReport:
        """Usage of one key by UTC day, ``since`` and ``until`` inclusive."""
        u = usage_records
        query = (select(u.c.day, func.count(), func.sum(u.c.documents), func.sum(u.c.prompt_tokens),
                        func.sum(u.c.computed_tokens))
                 .where(u.c.key_id == key_id).group_by(u.c.day).order_by(u.c.day))
        if since is not None:
            query = query.where(u.c.day >= since.isoformat())
        if until is not None:
            query = query.where(u.c.day <= until.isoformat())
        with unavailable("reading usage"):
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        days = [(str(day), UsageTotals(*(int(v) for v in values))) for day, *values in rows]
        return UsageReport(key_id, days, sum((t for _, t in days), UsageTotals()))

    async def billed_by_key(self) -> dict[str, int]:
        """Documents billed so far, per key."""
        u = usage_records
        with unavailable("reading usage"):
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(u.c.key_id, func.sum(u.c.documents)).group_by(u.c.key_id))
                return {key_id: int(total) for key_id, total in rows}

    async def records(self, key_id: str | None = None) -> list[UsageRecord]:
        """Every usage record (of one key), oldest first: for audits and tests."""
        u = usage_records
        query = select(u.c.key_id, u.c.request_id, u.c.model, u.c.queries, u.c.documents,
                       u.c.prompt_tokens, u.c.computed_tokens, u.c.idempotency_key,
                       u.c.created_at).order_by(u.c.id)
        if key_id is not None:
            query = query.where(u.c.key_id == key_id)
        with unavailable("reading usage"):
            async with self.engine.connect() as conn:
                return [UsageRecord(*row) for row in await conn.execute(query)]
