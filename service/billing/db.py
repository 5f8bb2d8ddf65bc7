"""The ledger database: one schema, two homes.

SQLite (a file, the default: zero setup, one server) or PostgreSQL (a URL: several replicas
share one ledger and one key table). Both are reached through SQLAlchemy 2's async engine
(aiosqlite, psycopg 3), so the key store and the ledger are written once.

Tables
------
* ``api_keys``: one row per key; the key itself is never stored, only its SHA-256.
* ``usage_records``: one row per billed call, what invoices are summed from.
* ``idempotency_records``: the stored reply of a call made with an idempotency key. Its
  primary key (caller, idempotency key) is what decides a race between duplicates: the row
  and its usage record are written in one transaction, so either both exist or neither does.
  Rows expire (``service.billing.ledger``): the table holds about a day of keyed calls, not all of them.
* ``quota_reservations``: documents promised to calls in flight on a key with a quota. A call
  reserves at admission, in a transaction that holds the key's lock; billing deletes the row
  in the transaction that writes the usage record; a failed call deletes it. Rows of a
  replica that crashed expire (``expires_at``) and stop counting.

Any database failure surfaces as ``ServiceError(UNAVAILABLE)``: the caller retries later or
elsewhere, and nothing is billed for a call whose record did not commit.

The ledger holds key hashes, usage and stored replies (document text, when a call asked for
it back), so it is private to the service's user: the default data directory is created 0700
and the SQLite file 0600 before SQLite opens it (SQLite gives its ``-wal`` and ``-shm`` files
the database file's mode). No engine logs its statements' parameters (``hide_parameters``):
an error line names the SQL, never the key ids, fingerprints or replies bound to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.billing.tally import ledger_errors
from service.errors import Code, ServiceError

log = logging.getLogger(__name__)

SQLITE_FILE = "ledger.sqlite3"
_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER keys only

metadata = MetaData()

api_keys = Table(
    "api_keys", metadata,
    Column("key_id", String(32), primary_key=True),  # public: billed to, listed, revoked by
    Column("name", String(200), nullable=False),
    Column("display_prefix", String(24), nullable=False),  # the key's first characters
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex of the key
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("rate_limit_rps", Float),
    Column("rate_limit_dps", Float),
    Column("rate_limit_tpm", Float),  # prompt tokens per minute
    Column("default_priority", Integer),  # scheduling priority of calls that name none
    Column("best_priority", Integer),  # the best (lowest) priority the key may ask for
    Column("quota_documents", BigInteger),
    Column("models", Text),  # JSON list of the served model names the key may call; NULL: any
)

usage_records = Table(
    "usage_records", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("key_id", String(64), nullable=False),
    Column("request_id", String(255), nullable=False),
    Column("model", String(200), nullable=False),
    Column("queries", Integer, nullable=False),
    Column("documents", Integer, nullable=False),  # the billed quantity
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("computed_tokens", BigInteger, nullable=False),
    Column("idempotency_key", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("day", String(10), nullable=False),  # UTC date, ISO: portable GROUP BY
    Index("ix_usage_key_day", "key_id", "day"),
    Index("ix_usage_request_id", "request_id"),
)

idempotency_records = Table(
    "idempotency_records", metadata,
    Column("key_id", String(64), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("reply", Text, nullable=False),  # RerankReply.to_json(), no document text
    Column("created_at", DateTime(timezone=True), nullable=False),  # expires --idempotency-ttl-h after
    Index("ix_idempotency_created_at", "created_at"),  # the purge of expired records
)

quota_reservations = Table(
    "quota_reservations", metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String(64), nullable=False),
    Column("documents", Integer, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),  # then it no longer counts
    Index("ix_quota_reservations_key", "key_id", "expires_at"),
)


def default_data_dir() -> Path:
    """``$RERANK_DATA_DIR``, else ``$XDG_DATA_HOME/rerank``, else ``~/.local/share/rerank``."""
    if env := os.environ.get("RERANK_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "rerank"


def database_url(db: str | None, data_dir: str | Path | None = None) -> str:
    """The async SQLAlchemy URL for ``--db``: a URL, a file path, or None for the default file."""
    if not db:
        folder = Path(data_dir) if data_dir else default_data_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing directory keeps its mode
        return f"sqlite+aiosqlite:///{(folder / SQLITE_FILE).resolve()}"
    if "://" not in db:
        return f"sqlite+aiosqlite:///{Path(db).resolve()}"
    scheme, rest = db.split("://", 1)
    driver = {"sqlite": "sqlite+aiosqlite", "postgres": "postgresql+psycopg",
              "postgresql": "postgresql+psycopg"}.get(scheme, scheme)
    return f"{driver}://{rest}"


def describe_url(url: str) -> str:
    """The URL fit for a log line: password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def open_engine(url: str) -> AsyncEngine:
    """The async engine for ``url`` (as ``database_url`` reads it); ConnectionError if a
    SQLite file's directory does not exist."""
    url = database_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database or ""
        folder = Path(database or ".").parent
        if not folder.is_dir():  # fail here, clearly, rather than in aiosqlite's connect thread
            raise ConnectionError(f"no directory {folder} for the SQLite ledger")
        if database and database != ":memory:" and not database.startswith("file:"):
            _make_private(Path(database))
        # busy timeout: writers queue on SQLite's one write lock instead of failing at once
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_timeout=10, hide_parameters=True,
                               connect_args={"connect_timeout": 5})


def _make_private(database: Path) -> None:
    """The SQLite file (created now if new) and its WAL files, readable by this user only.

    SQLite creates ``-wal`` and ``-shm`` with the database file's mode, so a 0600 file keeps
    them private too; existing ones (from an older, laxer version) are tightened here."""
    os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
    for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.close()


@contextlib.contextmanager
def unavailable(action: str) -> Iterator[None]:
    """Turn a database failure into UNAVAILABLE: retryable, and never billed."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        log.error("usage ledger failed while %s: %s", action, exc)
        ledger_errors[action] += 1
        raise ServiceError(Code.UNAVAILABLE, f"the usage ledger is unavailable ({action}): "
                           "nothing was billed; retry later", retry_after_s=1.0) from exc
