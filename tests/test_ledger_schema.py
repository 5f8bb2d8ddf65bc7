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
