"""A ledger made by an older version is refused at start, not answered with 503s forever."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.billing import prepare_schema


def test_current_schema_is_created_and_accepted(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.sqlite3"
    assert prepare_schema(url) == 0
    assert prepare_schema(url) == 0  # idempotent


def test_older_schema_is_refused_with_what_is_missing(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.sqlite3"
    prepare_schema(url)
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:  # as the version before key scopes
        db.execute("ALTER TABLE api_keys DROP COLUMN models")
    with pytest.raises(ValueError, match="table api_keys lacks models"):
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
