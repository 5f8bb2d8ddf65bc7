"""A quota against two real ``rerank serve`` replicas sharing one real PostgreSQL.

50 simultaneous 10-document calls, alternating between the two replicas' HTTP gateways,
against a 100-document quota: exactly 10 are served and 100 documents billed, the other 40
get 429. Before reservations, each replica read the billed total alone, and every call in
flight at once was admitted. Skipped where no PostgreSQL can be had.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from postgres_support import postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from sqlalchemy import func, select

from bench.load.reconcile import read_records
from bench.load.servers import create_api_key, replicas_sharing
from service.billing.db import open_engine, quota_reservations

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


async def live_reservations(db_url: str) -> int:
    engine = open_engine(db_url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(quota_reservations)) or 0)
    finally:
        await engine.dispose()


async def flood(urls: list[str], key: str, calls: int, docs: int) -> list[httpx.Response]:
    body = {"query": "what is a reranker", "documents": [f"document {i}" for i in range(docs)]}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=calls)) as http:
        return list(await asyncio.gather(*(http.post(f"{urls[n % len(urls)]}/v1/rerank", json=body)
                                           for n in range(calls))))


def test_quota_holds_across_two_replicas(tiny_model_dir: Path, tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    key = create_api_key(postgres_url, "quota", "--quota", "100")
    with replicas_sharing(postgres_url, str(tiny_model_dir), tmp_path) as servers:
        replies = asyncio.run(flood([s.http_url for s in servers], key, calls=50, docs=10))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 10 + [429] * 40, codes
    assert all("quota" in r.json()["detail"] for r in replies if r.status_code == 429)
    records = asyncio.run(read_records(postgres_url))
    assert sum(r.documents for r in records) == 100 and len(records) == 10
    assert asyncio.run(live_reservations(postgres_url)) == 0
