"""The usage ledger: exactly one usage record per successful call, never two for a retry.

``record`` writes the usage record and, for a call with an idempotency key, the stored
reply (without document text: a replay's body, same fingerprint, carries it), in one
transaction. The idempotency table's primary key (caller, idempotency key) settles
concurrent duplicates: the first commit wins, the loser's insert fails, its
transaction (usage record included) rolls back, and it returns the winner's reply, unbilled.

Once scoring has finished the write is shielded from cancellation: a caller that goes away
mid-write cannot leave it half done, and a retry with the same idempotency key gets the
result for free. A call whose write fails (database down) fails with UNAVAILABLE, unbilled.

Quotas hold under any concurrency, on one replica or many sharing PostgreSQL: ``reserve``
counts a call's documents against its key's quota before it is scored, with one conditional
``INSERT ... SELECT`` (reserve if billed + held + these <= quota) under the key's lock
(PostgreSQL: ``SELECT ... FOR UPDATE`` on the key's row first; SQLite: the INSERT itself
takes the database's one write lock before it reads), so two reservations of one key never
read the same total. Billed documents and live reservations are summed in that one
statement, so a concurrent settle is counted exactly once. ``record`` settles (deletes) the reservation in
the billing transaction; a call that fails releases it. A reservation left by a replica
that died expires after ``reservation_ttl`` (10 minutes): a call running longer than that
no longer holds its documents back from others, the one way a quota can still be overshot.

Idempotency records expire after ``idempotency_ttl`` (24 hours by default, the window retries
happen in): an expired key is free again, and its next call is a new, billed one. Expired rows
are deleted in the background, at most once per ``purge_interval`` per process, after a keyed
call; usage records are never deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import ColumnElement, DateTime, delete, func, insert, literal, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.billing.db import api_keys, idempotency_records, quota_reservations, unavailable, usage_records
from service.billing.tally import throttled
from service.calls import RerankReply
from service.errors import Code, ServiceError
from service.seams import Principal, Reservation, UsageReport, UsageTotals

log = logging.getLogger(__name__)

DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)
DEFAULT_RESERVATION_TTL = timedelta(minutes=10)


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
                 purge_interval_s: float = 600.0, reservation_ttl: timedelta = DEFAULT_RESERVATION_TTL) -> None:
        for label, ttl in (("idempotency", idempotency_ttl), ("reservation", reservation_ttl)):
            if ttl <= timedelta(0):
                raise ValueError(f"the {label} TTL must be positive, got {ttl}")
        self.engine = engine
        self.idempotency_ttl = idempotency_ttl
        self.reservation_ttl = reservation_ttl
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

    # -- quotas ----------------------------------------------------------------------------
    async def reserve(self, principal: Principal, documents: int) -> Reservation | None:
        """Hold ``documents`` against the key's quota, or raise QUOTA_EXCEEDED; None: no quota.
        The key's lock is held from its first statement to the commit, so the transaction is
        kept to one conditional INSERT (two round trips on PostgreSQL, one on SQLite)."""
        quota = principal.quota_documents
        if quota is None:
            return None
        reservation = Reservation(secrets.token_hex(16), principal.key_id, documents)
        r = quota_reservations
        now = datetime.now(UTC)
        row = select(literal(reservation.id), literal(reservation.key_id), literal(documents),
                     literal(now + self.reservation_ttl, DateTime(timezone=True)))
        with unavailable("reserving quota"):
            async with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":  # the key's row lock (every key with a quota has a row)
                    await conn.execute(select(api_keys.c.key_id).where(api_keys.c.key_id == principal.key_id)
                                       .with_for_update())
                # SQLite: this write, the transaction's first statement, takes the database's write
                # lock before it reads: the sum it checks cannot change until the commit
                admitted = await conn.execute(insert(r).from_select(
                    [r.c.id, r.c.key_id, r.c.documents, r.c.expires_at],
                    row.where(_used(principal.key_id, now) + documents <= quota)).returning(r.c.id))
                if admitted.first() is not None:  # (rowcount is -1 for INSERT ... SELECT on psycopg)
                    return reservation
                # refused (no hurry now): forget reservations left by crashed replicas, and say why
                await conn.execute(delete(r).where(r.c.key_id == principal.key_id, r.c.expires_at <= now))
                used = int(await conn.scalar(select(_used(principal.key_id, now))) or 0)
        throttled["quota"] += 1
        raise ServiceError(Code.QUOTA_EXCEEDED, (
            f"API key {principal.key_id} has used or holds for calls in flight {used} of its "
            f"{quota}-document quota; this call needs {documents} more"))

    async def release(self, reservation: Reservation) -> None:
        """Give back a failed call's reservation (shielded: a cancelled caller still releases).
        If the database is down the reservation stays until it expires."""
        await asyncio.shield(self._release(reservation))

    async def _release(self, reservation: Reservation) -> None:
        with unavailable("releasing a quota reservation"):
            async with self.engine.begin() as conn:
                await conn.execute(delete(quota_reservations).where(quota_reservations.c.id == reservation.id))

    # -- billing ---------------------------------------------------------------------------
    async def record(self, principal: Principal, reply: RerankReply, idempotency_key: str | None,
                     fingerprint: str, reservation: Reservation | None = None) -> RerankReply:
        """Bill ``reply`` and settle ``reservation`` in one transaction. On a lost race for the
        idempotency key nothing is billed and the reservation is released."""
        recorded = await asyncio.shield(self._record(principal, reply, idempotency_key, fingerprint, reservation))
        if idempotency_key:
            self._maybe_purge()
        return recorded

    async def _record(self, principal: Principal, reply: RerankReply, idempotency_key: str | None,
                      fingerprint: str, reservation: Reservation | None) -> RerankReply:
        now = datetime.now(UTC)
        # no document text at rest: the caller's replay sends it again (same fingerprint)
        stored_reply = reply.with_documents(None).to_json()
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
                                fingerprint=fingerprint, reply=stored_reply, created_at=now))
                        await conn.execute(insert(usage_records).values(
                            key_id=principal.key_id, request_id=reply.request_id, model=reply.model,
                            queries=len(reply.outcomes), documents=reply.billed_documents,
                            prompt_tokens=reply.prompt_tokens, computed_tokens=reply.computed_tokens,
                            idempotency_key=idempotency_key or None, created_at=now,
                            day=now.date().isoformat()))
                        if reservation is not None:
                            await conn.execute(delete(quota_reservations)
                                               .where(quota_reservations.c.id == reservation.id))
                    return reply
                except IntegrityError:
                    if not idempotency_key:
                        raise
        # A concurrent duplicate committed first: its reply stands, and this call is free.
        assert idempotency_key is not None
        if reservation is not None:
            await self._release(reservation)
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


def _used(key_id: str, now: datetime) -> ColumnElement[int]:
    """Documents billed to ``key_id`` plus those held by its live reservations, as one
    expression: read in one statement, so a concurrent settle (a reservation deleted and
    its usage record written in one transaction) is counted exactly once."""
    u, r = usage_records, quota_reservations
    billed = select(func.coalesce(func.sum(u.c.documents), 0)).where(u.c.key_id == key_id)
    held = select(func.coalesce(func.sum(r.c.documents), 0)).where(r.c.key_id == key_id, r.c.expires_at > now)
    return billed.scalar_subquery() + held.scalar_subquery()
