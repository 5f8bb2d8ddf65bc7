"""A ledger made by an older version is migrated at start (new nullable columns added), or
refused when it cannot be (a missing NOT NULL column), never answered with 503s forever."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from postgres_support import db_url, postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.billing import prepare_schema
from service.billing.db import database_url, open_engine
from service.billing.keys import KeyStore


def test_current_schema_is_created_and_accepted(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.sqlite3"
    assert prepare_schema(url) == 0
    assert prepare_schema(url) == 0  # idempotent


def run_sql(url: str, *statements: str) -> None:
    sync = make_url(url)
    sync = sync.set(drivername={"sqlite+aiosqlite": "sqlite"}.get(sync.drivername, sync.drivername))
    engine = create_engine(sync)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


async def test_an_older_ledger_gets_the_new_columns_and_keeps_its_keys(db_url: str) -> None:  # noqa: F811
    url = database_url(db_url)
    prepare_schema(url)
    engine = open_engine(url)
    try:
        new = await KeyStore(engine).create("old", rate_limit_rps=3)
    finally:
        await engine.dispose()
    # as the version before key scopes, token limits and priorities
    run_sql(url, *(f"ALTER TABLE api_keys DROP COLUMN {c}"
                   for c in ("models", "rate_limit_tpm", "default_priority", "best_priority")))
    assert prepare_schema(url) == 1
    engine = open_engine(url)
    try:
        principal = await KeyStore(engine).authenticate(new.key)
    finally:
        await engine.dispose()
    assert (principal.rate_limit_rps, principal.rate_limit_tpm, principal.models) == (3, None, None)
    assert (principal.default_priority, principal.best_priority) == (None, None)


def test_a_missing_not_null_column_is_refused_with_what_is_missing(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.sqlite3"
    prepare_schema(url)
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        db.execute("ALTER TABLE usage_records DROP COLUMN queries")
    with pytest.raises(ValueError, match="table usage_records lacks queries"):
        prepare_schema(url)


def test_an_index_added_since_is_created_on_an_existing_ledger(tmp_path: Path) -> None:
    """``create_all`` leaves existing tables alone, new indexes included: start adds them."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.sqlite3"
    prepare_schema(url)
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:  # as the version before record expiry
        db.execute("DROP INDEX ix_idempotency_created_at")
    prepare_schema(url)
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ix_idempotency_created_at", "ix_usage_key_day", "ix_usage_request_id"} <= names
