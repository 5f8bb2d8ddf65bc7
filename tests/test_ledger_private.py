"""The ledger is private to the service's user, and its errors never log bound parameters."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from serving import create_schema
from sqlalchemy import insert

from service.billing.db import SQLITE_FILE, idempotency_records, open_engine, unavailable
from service.cli import main
from service.errors import ServiceError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def lax_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the common default, under which SQLite makes 0644 files
    yield
    os.umask(old)


def test_rerank_keys_creates_a_private_data_dir_and_ledger(tmp_path: Path, lax_umask: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["keys", "create", "--name", "a", "--data-dir", str(data)]) == 0
    assert main(["keys", "create", "--name", "b", "--data-dir", str(data)]) == 0  # writes through the WAL
    assert mode(data) == 0o700
    files = sorted(p.name for p in data.iterdir())
    assert SQLITE_FILE in files
    for name in files:  # ledger.sqlite3 and its -wal / -shm, whichever SQLite left behind
        assert mode(data / name) == 0o600, name


async def test_wal_files_of_a_served_ledger_are_private(tmp_path: Path, lax_umask: None) -> None:
    db = tmp_path / "ledger.sqlite3"
    engine = open_engine(str(db))
    try:
        await create_schema(engine)
        async with engine.begin() as conn:  # an open connection keeps -wal and -shm in place
            await conn.execute(insert(idempotency_records).values(
                key_id="k", idempotency_key="i", fingerprint="f", reply="{}", created_at=_now()))
            for suffix in ("", "-wal", "-shm"):
                assert mode(tmp_path / f"ledger.sqlite3{suffix}") == 0o600, suffix
    finally:
        await engine.dispose()


async def test_an_existing_lax_ledger_is_tightened(tmp_path: Path, lax_umask: None) -> None:
    db = tmp_path / "ledger.sqlite3"
    for suffix in ("", "-wal"):
        Path(f"{db}{suffix}").touch(mode=0o644)
    await open_engine(str(db)).dispose()
    assert mode(db) == mode(Path(f"{db}-wal")) == 0o600


async def test_a_failing_query_logs_no_parameters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = open_engine(str(tmp_path / "ledger.sqlite3"))  # no schema: the insert fails
    secret = "document text that must stay out of logs"
    try:
        with caplog.at_level(logging.ERROR, logger="service.billing.db"), pytest.raises(ServiceError), \
                unavailable("writing a reply"):
            async with engine.begin() as conn:
                await conn.execute(insert(idempotency_records).values(
                    key_id="key_secretid", idempotency_key="idem-secret", fingerprint="f" * 64, reply=secret,
                    created_at=_now()))
    finally:
        await engine.dispose()
    logged = caplog.text
    assert "usage ledger failed while writing a reply" in logged
    for value in (secret, "key_secretid", "idem-secret", "f" * 64):
        assert value not in logged


def _now() -> datetime:
    return datetime.now(UTC)


async def test_every_engine_hides_parameters(tmp_path: Path) -> None:
    """PostgreSQL's engine too (built, not connected): any future query logs no parameters."""
    for url in (str(tmp_path / "ledger.sqlite3"), "postgresql://nobody@127.0.0.1:1/none"):
        engine = open_engine(url)
        try:
            assert engine.sync_engine.hide_parameters, url
        finally:
            await engine.dispose()
