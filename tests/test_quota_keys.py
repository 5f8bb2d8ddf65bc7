"""Key settings for quotas and limits: ``KeyStore.update``, ``rerank keys create|update|list``,
and a key's token limit answered over HTTP with ``Retry-After``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import LiveGateway
from postgres_support import db_url, postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from serving import schema_engine

from service import cli
from service.billing.keys import KeyStore


async def test_update_changes_limits_at_once_and_none_clears(db_url: str) -> None:  # noqa: F811
    async with schema_engine(db_url) as engine:
        store = KeyStore(engine)
        new = await store.create("k", rate_limit_rps=5, rate_limit_tpm=1000)
        updated = await store.update(new.record.key_id, rate_limit_tpm=50_000, quota_documents=10)
        assert updated is not None and (updated.rate_limit_tpm, updated.quota_documents) == (50_000, 10)
        principal = await store.authenticate(new.key)  # what the next call sees
        assert (principal.rate_limit_rps, principal.rate_limit_tpm, principal.quota_documents) == (5, 50_000, 10)
        await store.update(new.record.key_id, rate_limit_rps=None)
        assert (await store.authenticate(new.key)).rate_limit_rps is None
        for bad in ({"rate_limit_tpm": 0}, {"rate_limit_dps": -1.0}, {"quota_documents": 0},
                    {"rate_limit_rps": float("nan")}, {"name": "x"}):
            with pytest.raises(ValueError):
                await store.update(new.record.key_id, **bad)  # type: ignore[arg-type]
        assert await store.update("key_nope", rate_limit_tpm=1) is None
        assert (await store.authenticate(new.key)).rate_limit_tpm == 50_000  # nothing half-applied


def keys_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = cli.main(["keys", *argv])
    return code, capsys.readouterr().out.splitlines()


def test_keys_cli_sets_and_updates_the_token_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "ledger.sqlite3")
    code, out = keys_cli(capsys, "create", "--name", "t", "--tpm", "60000", "--db", db)
    assert code == 0 and "tpm=60000" in out[0]
    key_id = out[0].split()[1]
    code, listing = keys_cli(capsys, "list", "--db", db)
    assert listing[0].split()[5] == "TPM" and listing[1].split()[5] == "60000"
    code, out = keys_cli(capsys, "update", key_id, "--tpm", "none", "--quota", "500", "--db", db)
    assert code == 0 and "tpm=- quota=500" in out[0] and "rps=-" in out[0]
    assert keys_cli(capsys, "update", key_id, "--tpm", "0", "--db", db)[0] == 2
    assert keys_cli(capsys, "update", "key_nope", "--tpm", "5", "--db", db)[0] == 1
    with pytest.raises(SystemExit):
        cli.main(["keys", "update", key_id, "--tpm", "lots", "--db", db])
    assert keys_cli(capsys, "list", "--db", db)[1][1].split()[5:7] == ["-", "500"]


def test_keys_cli_sets_and_updates_priorities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "ledger.sqlite3")
    code, out = keys_cli(capsys, "create", "--name", "p", "--default-priority", "10", "--best-priority", "5",
                         "--db", db)
    assert code == 0 and "priority=10/5" in out[0]
    key_id = out[0].split()[1]
    assert keys_cli(capsys, "list", "--db", db)[1][1].split()[8] == "10/5"
    assert keys_cli(capsys, "update", key_id, "--best-priority", "50", "--db", db)[0] == 2  # default 10 is better
    code, out = keys_cli(capsys, "update", key_id, "--best-priority", "50", "--default-priority", "none",
                         "--db", db)
    assert code == 0 and "priority=-/50" in out[0]
    assert keys_cli(capsys, "create", "--name", "x", "--best-priority", "1000", "--db", db)[0] == 2
    assert keys_cli(capsys, "update", key_id, "--best-priority", "none", "--db", db)[1][0].count("priority=-/-") == 1


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(str(tmp_path_factory.mktemp("gw") / "ledger.sqlite3")) as live:
        yield live


def test_over_the_token_limit_is_prompt_429_with_retry_after(gw: LiveGateway) -> None:
    key_id, key = gw.create_key(rate_limit_tpm=6000)  # a full minute's bucket: 6000
    body = {"query": "q", "documents": ["word " * 1000] * 2}  # ~10,000 bytes: admitted from a full bucket
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{gw.url}/v1/rerank", json=body, headers=headers, timeout=30).status_code == 200
    r = httpx.post(f"{gw.url}/v1/rerank", json=body, headers=headers, timeout=30)
    assert r.status_code == 429 and "prompt tokens per minute" in r.json()["detail"]
    assert int(r.headers["retry-after"]) >= 1
    assert len(gw.records(key_id)) == 1
