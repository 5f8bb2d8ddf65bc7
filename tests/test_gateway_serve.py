"""``rerank serve`` wiring and ``rerank keys``: one App answers gRPC and HTTP with the same
keys, limits and ledger; the key CLI prints a key scripts can capture."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from clients import AsyncRerankClient, RerankError
from service import cli
from service.app import App
from service.billing.ledger import SqlLedger
from service.config import ServeConfig
from service.http.server import HttpServer
from worker.fake import FakeRunner


def keys_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = cli.main(["keys", *argv])
    return code, capsys.readouterr().out.splitlines()


def create_key(capsys: pytest.CaptureFixture[str], db: str, *extra: str) -> str:
    code, lines = keys_cli(capsys, "create", "--name", "ci", "--db", db, *extra)
    assert code == 0
    return lines[-1]  # the key alone on the last line: what a script captures


async def start(config: ServeConfig) -> App:
    app = App(config, load_runner=FakeRunner)
    await app.start()
    await app.wait_ready()
    return app


def http_url(app: App) -> str:
    (server,) = [c for c in app.components if isinstance(c, HttpServer)]
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def served(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> AsyncIterator[tuple[App, str]]:
    db = str(tmp_path / "ledger.sqlite3")
    key = await asyncio.to_thread(create_key, capsys, db)  # the CLI runs its own event loop
    app = await start(ServeConfig(model="fake", host="127.0.0.1", grpc_port=0, http_port=0, db_url=db,
                                  max_wait_ms=0.0))
    try:
        yield app, key
    finally:
        await app.stop(grace_s=0)


async def test_grpc_and_http_share_keys_and_ledger(served: tuple[App, str]) -> None:
    app, key = served
    async with AsyncRerankClient(f"127.0.0.1:{app.grpc.port}", api_key=key) as client:
        by_grpc = await client.rerank("query", ["a", "b", "c"])
    async with httpx.AsyncClient(base_url=http_url(app)) as http:
        by_http = await http.post("/v1/rerank", json={"query": "query", "documents": ["a", "b"]},
                                  headers={"Authorization": f"Bearer {key}"})
        assert by_http.status_code == 200
        assert (await http.post("/v1/rerank", json={"query": "q", "documents": ["a"]})).status_code == 401
        metrics = (await http.get("/metrics")).text
    async with AsyncRerankClient(f"127.0.0.1:{app.grpc.port}", api_key="rk_live_" + "A" * 43) as client:
        with pytest.raises(RerankError, match="UNAUTHENTICATED"):
            await client.rerank("query", ["a"])
    assert isinstance(app.core.ledger, SqlLedger)
    records = await app.core.ledger.records()
    assert sorted(r.documents for r in records) == [2, 3] and len({r.key_id for r in records}) == 1
    assert by_grpc.request_id in {r.request_id for r in records}
    # one registry: the gRPC calls and the HTTP calls on the gateway's /metrics
    assert 'method="Rerank"' in metrics and 'method="POST /v1/rerank"' in metrics


async def test_ready_follows_the_model_and_the_drain(served: tuple[App, str]) -> None:
    """docs/OPERATIONS.md: during --drain-delay-s both fronts say not ready but take calls;
    once the servers stop, new calls are refused (503 with Retry-After)."""
    app, key = served
    body, auth = {"query": "q", "documents": ["a"]}, {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=http_url(app)) as http, \
            AsyncRerankClient(f"127.0.0.1:{app.grpc.port}", api_key=key) as grpc_client:
        assert (await http.get("/ready")).status_code == 200
        await app.drain()
        assert (await http.get("/ready")).status_code == 503
        assert (await http.post("/v1/rerank", json=body, headers=auth)).status_code == 200
        assert len((await grpc_client.rerank("q", ["a"])).results) == 1  # the two fronts agree
        app.stopping = True  # what App.stop sets before the servers stop taking calls
        r = await http.post("/v1/rerank", json=body, headers=auth)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "draining" in r.json()["detail"]


async def test_start_names_the_ledger_and_says_loudly_that_auth_is_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = await start(ServeConfig(model="fake", host="127.0.0.1", grpc_port=0, http_port=0, auth=False,
                                  data_dir=tmp_path, max_wait_ms=0.0))
    try:
        async with httpx.AsyncClient(base_url=http_url(app)) as http:
            assert (await http.post("/v1/rerank", json={"query": "q", "documents": ["a"]})).status_code == 200
    finally:
        await app.stop(grace_s=0)
    assert f"SQLite file {tmp_path / 'ledger.sqlite3'}" in caplog.text
    (warning,) = [r for r in caplog.records if "AUTH IS OFF" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert (tmp_path / "ledger.sqlite3").exists()


def test_keys_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "ledger.sqlite3")
    key = create_key(capsys, db, "--rps", "5", "--quota", "1000", "--model", "a", "--model", "b")
    assert key.startswith("rk_live_") and " " not in key
    code, listing = keys_cli(capsys, "list", "--db", db)
    assert code == 0 and len(listing) == 2 and "active" in listing[1] and key not in "\n".join(listing)
    assert " a,b " in listing[1]
    key_id = listing[1].split()[0]
    assert keys_cli(capsys, "revoke", key_id, "--db", db)[0] == 0
    assert "revoked" in keys_cli(capsys, "list", "--db", db)[1][1]
    assert keys_cli(capsys, "revoke", "key_nope", "--db", db)[0] == 1
    assert keys_cli(capsys, "create", "--name", "x", "--quota", "0", "--db", db)[0] == 2
    assert cli.main(["keys", "list", "--db", "/nonexistent/dir/x.sqlite3"]) == 1
