"""Two replicas on loopback against one real PostgreSQL: one ledger, one key store, shared limits.

Both replicas are real ``rerank serve`` processes with the tiny checkpoint and ``--replicas 2``,
started at the same moment (so they race to create the schema, as pods of a rollout do). The
gRPC clients use gRPC's own client-side balancing (``round_robin`` over both addresses); the
HTTP clients alternate between the two gateways. Skipped where no PostgreSQL can be had.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from postgres_support import postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from prometheus_client.parser import text_string_to_metric_families

from bench.load.driver import Level, RetryPolicy, Verdict, run_level
from bench.load.reconcile import read_records, reconcile
from bench.load.servers import ServeProcess, create_api_key, replicas_sharing
from bench.load.transports import GrpcTransport, HttpTransport
from bench.load.workload import Workload

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LIMITED_RPS = 10.0


@dataclass
class Replicas:
    servers: list[ServeProcess]
    db_url: str
    key: str  # no rate limit
    limited_key: str  # LIMITED_RPS requests per second, for the whole fleet

    @property
    def grpc_targets(self) -> list[str]:
        return [s.grpc_target for s in self.servers]

    @property
    def http_urls(self) -> list[str]:
        return [s.http_url for s in self.servers]


@pytest.fixture
def replicas(tiny_model_dir: Path, tmp_path: Path, postgres_url: str) -> Iterator[Replicas]:  # noqa: F811
    key = create_api_key(postgres_url, "scale-out")
    limited = create_api_key(postgres_url, "limited", "--rps", str(LIMITED_RPS))
    with replicas_sharing(postgres_url, str(tiny_model_dir), tmp_path) as servers:
        yield Replicas(servers, postgres_url, key, limited)


def served_ok(server: ServeProcess) -> dict[str, float]:
    """Successful calls per front method, from the replica's own /metrics."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rerank_requests_total" and s.labels.get("code") in {"OK", "200"}:
                counts[s.labels["method"]] = counts.get(s.labels["method"], 0.0) + s.value
    return counts


def test_two_replicas_round_robin_and_http_reconcile_one_ledger(replicas: Replicas) -> None:
    workload = Workload(documents=8)
    policy = RetryPolicy(max_attempts=5)
    level = Level(clients=4, requests_per_client=20, time_limit_s=120)

    async def scenario() -> list[object]:
        transports = [GrpcTransport(replicas.grpc_targets, api_key=replicas.key),
                      HttpTransport(replicas.http_urls, api_key=replicas.key)]
        try:
            return list(await asyncio.gather(*(run_level(t, level, workload, policy, first_n=i * 1000)
                                               for i, t in enumerate(transports))))
        finally:
            for t in transports:
                await t.close()

    runs = asyncio.run(scenario())
    outcomes = [o for r in runs for o in r.outcomes]  # type: ignore[attr-defined]
    assert len(outcomes) == 2 * 4 * 20 and all(o.ok for o in outcomes)
    rec = reconcile(outcomes, asyncio.run(read_records(replicas.db_url)))
    assert rec.ok, rec.describe()
    per_replica = [served_ok(s) for s in replicas.servers]
    grpc_calls = [c.get("Rerank", 0.0) for c in per_replica]
    assert sum(grpc_calls) == 4 * 20
    assert min(grpc_calls) >= 0.3 * sum(grpc_calls), f"round_robin left a replica idle: {grpc_calls}"
    print(f"scale-out: gRPC calls per replica {grpc_calls}; {rec.describe()}")


def test_rate_limit_holds_across_replicas(replicas: Replicas) -> None:
    """Each replica admits 1/2 of the key's rate (``--replicas 2``); spread by round_robin,
    the fleet admits the key's rate, not twice it."""
    window_s = 3.0
    workload = Workload(documents=1, words_per_document=4)
    once = RetryPolicy(max_attempts=1)

    async def scenario() -> list[object]:
        transport = GrpcTransport(replicas.grpc_targets, api_key=replicas.limited_key, timeout_s=10)
        try:
            return [await run_level(transport, Level(8, 100_000, window_s), workload, once)]
        finally:
            await transport.close()

    (run,) = asyncio.run(scenario())
    attempts = [a for o in run.outcomes for a in o.attempts]  # type: ignore[attr-defined]
    admitted = sum(a.verdict is Verdict.OK for a in attempts)
    rejected = sum(a.verdict is Verdict.REJECTED for a in attempts)
    span_s = max(a.started + a.seconds for a in attempts) - min(a.started for a in attempts)
    ceiling = LIMITED_RPS * span_s + LIMITED_RPS  # the rate, plus one full bucket (1 s of rate)
    assert rejected > admitted, "the offered load did not exceed the limit: the test did not test it"
    assert {a.code for a in attempts} == {"OK", "RESOURCE_EXHAUSTED"}
    assert admitted <= ceiling + 2, f"{admitted} admitted in {span_s:.1f}s; the fleet limit allows {ceiling:.0f}"
    assert admitted >= 0.6 * LIMITED_RPS * span_s, f"only {admitted} admitted in {span_s:.1f}s"
    print(f"rate limit {LIMITED_RPS:.0f} rps across 2 replicas: {admitted} admitted, {rejected} rejected "
          f"in {span_s:.2f}s (ceiling {ceiling:.0f})")
