"""Figures from outcomes: throughput, latency percentiles, rejections, retries; a Markdown table."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.load.driver import LevelRun, Verdict


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class LevelSummary:
    transport: str
    clients: int
    requests: int  # logical requests sent
    succeeded: int
    failed: int  # logical requests that ended without success
    attempts: int
    rejections: int  # attempts answered RESOURCE_EXHAUSTED / 429
    retried: int  # attempts answered "try again" (connection, UNAVAILABLE/503, deadline)
    replayed: int  # successes served from an idempotency record
    wall_s: float
    requests_per_s: float  # successful logical requests per second
    documents_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    final_codes: dict[str, int]  # the last answer of each failed request
    error_codes: dict[str, int]  # every answer that was not OK, retried ones included

    @classmethod
    def of(cls, run: LevelRun) -> LevelSummary:
        ok = [o for o in run.outcomes if o.ok]
        attempts = [a for o in run.outcomes for a in o.attempts]
        verdicts = Counter(a.verdict for a in attempts)
        latencies_ms = [1000 * o.seconds for o in ok]
        wall = max(run.wall_s, 1e-9)
        return cls(
            transport=run.transport, clients=run.level.clients, requests=len(run.outcomes),
            succeeded=len(ok), failed=len(run.outcomes) - len(ok), attempts=len(attempts),
            rejections=verdicts[Verdict.REJECTED], retried=verdicts[Verdict.RETRY],
            replayed=sum(o.final.replayed for o in ok), wall_s=run.wall_s,
            requests_per_s=len(ok) / wall, documents_per_s=sum(o.documents for o in ok) / wall,
            p50_ms=percentile(latencies_ms, 50), p95_ms=percentile(latencies_ms, 95),
            p99_ms=percentile(latencies_ms, 99),
            final_codes=dict(Counter(o.final.code for o in run.outcomes if not o.ok)),
            error_codes=dict(Counter(a.code for a in attempts if a.verdict is not Verdict.OK)))


_COLUMNS = ("front", "clients", "requests", "ok", "failed", "rejected", "retried", "req/s", "docs/s",
            "p50 ms", "p95 ms", "p99 ms")


def markdown_table(summaries: Sequence[LevelSummary]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---:|" * len(_COLUMNS)]
    for s in summaries:
        cells = (s.transport, s.clients, s.requests, s.succeeded, s.failed, s.rejections, s.retried,
                 f"{s.requests_per_s:.1f}", f"{s.documents_per_s:.0f}", f"{s.p50_ms:.0f}",
                 f"{s.p95_ms:.0f}", f"{s.p99_ms:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
