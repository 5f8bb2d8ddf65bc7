"""The billing parts of a server, built from its flags: key store, rate limiter, usage ledger.

``rerank serve`` and ``rerank gateway`` both call ``open_billing``, so the two front doors
authenticate, limit and bill identically. The schema is created synchronously before anything
serves, so an unreachable database stops the server at start instead of failing calls later;
and the server says loudly which auth mode it runs in and where its ledger lives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Connection, create_engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.billing.db import api_keys, database_url, describe_url, metadata, open_engine
from service.billing.keys import KeyStore
from service.billing.ledger import DEFAULT_IDEMPOTENCY_TTL, SqlLedger
from service.billing.ratelimit import KeyRateLimiter
from service.seams import Authenticator, OpenAccess

log = logging.getLogger("rerank.billing")

MAX_IDEMPOTENCY_TTL_H = 24 * 3650


@dataclass(frozen=True)
class Billing:
    url: str
    engine: AsyncEngine
    keys: KeyStore
    ledger: SqlLedger
    limiter: KeyRateLimiter
    auth: Authenticator  # the key store, or OpenAccess with --no-auth


def open_billing(db: str | None, data_dir: str | Path | None, *, require_keys: bool, replicas: int = 1,
                 default_rps: float | None = None, default_dps: float | None = None,
                 idempotency_ttl_h: float = DEFAULT_IDEMPOTENCY_TTL / timedelta(hours=1)) -> Billing:
    """Raises ConnectionError (an OSError) when the ledger database cannot be opened or prepared."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    if not 0 < idempotency_ttl_h <= MAX_IDEMPOTENCY_TTL_H:
        raise ValueError(f"--idempotency-ttl-h must be above 0 and at most {MAX_IDEMPOTENCY_TTL_H} "
                         f"(10 years), got {idempotency_ttl_h}")
    url = database_url(db, data_dir)
    active_keys = prepare_schema(url)
    engine = open_engine(url)
    keys, ledger = KeyStore(engine), SqlLedger(engine, idempotency_ttl=timedelta(hours=idempotency_ttl_h))
    limiter = KeyRateLimiter(default_rps=default_rps, default_dps=default_dps, share=1 / replicas)
    _announce(db, url, require_keys, active_keys, replicas)
    return Billing(url, engine, keys, ledger, limiter, keys if require_keys else OpenAccess())


def prepare_schema(url: str) -> int:
    """Create missing tables and columns with a short-lived sync connection; the number of
    active keys."""
    sync_url = make_url(url)
    sync_url = sync_url.set(drivername={"sqlite+aiosqlite": "sqlite"}.get(sync_url.drivername,
                                                                         sync_url.drivername))
    connect_args = {"connect_timeout": 5} if sync_url.drivername.startswith("postgresql") else {}
    engine = create_engine(sync_url, connect_args=connect_args)
    try:
        for attempt in (1, 2):  # replicas starting together may race on CREATE TABLE once
            try:
                with engine.begin() as conn:
                    metadata.create_all(conn)
                    _add_missing_columns(conn, url)
                    for table in metadata.sorted_tables:  # create_all skips existing tables' new indexes
                        for index in table.indexes:
                            index.create(conn, checkfirst=True)
                    count = conn.scalar(select(func.count()).select_from(api_keys)
                                        .where(api_keys.c.revoked_at.is_(None)))
                return int(count or 0)
            except SQLAlchemyError as exc:
                if attempt == 2:
                    raise ConnectionError(f"cannot open the usage ledger at {describe_url(url)}: {exc}") from exc
        raise AssertionError("unreachable: this is a bug")
    finally:
        engine.dispose()


def _add_missing_columns(conn: Connection, url: str) -> None:
    """Bring a ledger made by an older version up to date: ``create_all`` adds missing tables,
    never missing columns. A new column is nullable (NULL: the older behaviour, e.g. no limit),
    so ``ALTER TABLE ... ADD COLUMN`` is all a migration needs, on SQLite and PostgreSQL alike.
    A missing NOT NULL column has no such value: refused, one clear error instead of a 503 on
    every call. Replicas migrating at once: the loser's ALTER fails and its retry finds the
    column there."""
    existing = inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    for table in metadata.sorted_tables:
        have = {c["name"] for c in existing.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        required = sorted(c.name for c in missing if not c.nullable)
        if required:
            raise ValueError(f"the usage ledger at {describe_url(url)} has an older schema: table "
                             f"{table.name} lacks {', '.join(required)}, which cannot be added to "
                             "existing rows: add the columns by hand or point --db at a new database")
        for column in missing:
            conn.execute(text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} "
                              f"{column.type.compile(dialect=conn.dialect)}"))
            log.info("usage ledger: added column %s.%s", table.name, column.name)


def _announce(db: str | None, url: str, require_keys: bool, active_keys: int, replicas: int) -> None:
    where = describe_url(url)
    if db:
        log.info("usage ledger: %s", where)
    else:
        path = Path(make_url(url).database or "")
        log.info("usage ledger: SQLite file %s (data directory %s; --db URL for PostgreSQL)", path, path.parent)
    if not require_keys:
        log.warning("AUTH IS OFF (--no-auth): every caller is served and billed as 'anonymous'. "
                    "Only for trusted networks; never expose this server.")
        return
    log.info("auth: API keys required on gRPC and HTTP (%d active; manage them with "
             "`rerank keys create|list|revoke --db ...`)%s", active_keys,
             f"; rate limits split over {replicas} replicas" if replicas > 1 else "")
    if active_keys == 0:
        log.warning("no active API keys in %s: every call will be refused (401) until one is "
                    "created with `rerank keys create --name NAME`", where)
