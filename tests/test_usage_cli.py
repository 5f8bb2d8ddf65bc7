"""``rerank usage`` reads what the ledger billed, per key and per day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service import cli
from service.calls import RerankCall, RerankQuery
from service.core import RerankCore
from service.local import BatcherEngine
from worker.batcher import Batcher, BatcherConfig
from worker.fake import FakeRunner


async def test_usage_shows_what_was_billed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.billing import open_billing

    db = f"sqlite:///{tmp_path}/ledger.sqlite3"
    assert await _run_cli(["keys", "create", "--name", "team", "--db", db]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    billing = open_billing(db, None, require_keys=True)
    runner = FakeRunner()
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0))
    batcher.start()
    core = RerankCore(BatcherEngine(batcher), model_name="fake", auth=billing.auth, ledger=billing.ledger)
    try:
        for n in (2, 5):
            await core.rerank(RerankCall([RerankQuery("q", ["d"] * n)], api_key=key))
    finally:
        await batcher.close()
        await billing.ledger.close()
    assert await _run_cli(["usage", "--db", db, "--json"]) == 0
    totals = json.loads(capsys.readouterr().out)["documents_by_key"]
    (key_id,) = totals
    assert totals[key_id] == 7
    assert await _run_cli(["usage", key_id, "--db", db, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["requests"] == 2 and report["total"]["documents"] == 7
    assert len(report["days"]) == 1


async def _run_cli(argv: list[str]) -> int:
    import asyncio

    return await asyncio.to_thread(cli.main, argv)
