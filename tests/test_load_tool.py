"""The load tool's own pieces, without a server: retries, verdicts, percentiles, reconciliation.

The end-to-end runs against real servers are in test_load.py and test_faults.py; these pin
down the arithmetic those runs rely on, so a wrong verdict there cannot come from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from bench.load.driver import Attempt, Level, Outcome, RetryPolicy, Verdict, resolve, run_level, send_logical
from bench.load.reconcile import reconcile
from bench.load.report import LevelSummary, markdown_table, percentile
from bench.load.servers import require_loopback
from bench.load.transports import grpc_verdict, http_verdict
from bench.load.workload import LogicalRequest, Workload


@pytest.mark.parametrize(("values", "p", "expected"), [
    ([5.0], 50, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 75, 3.0),
    ([1.0, 2.0, 3.0, 4.0], 99, 4.0),
    (list(map(float, range(1, 101))), 95, 95.0),
    (list(map(float, range(100, 0, -1))), 99, 99.0),  # order of arrival does not matter
    ([3.0, 1.0], 0, 1.0),
])
def test_percentile_nearest_rank(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert percentile([], 50) != percentile([], 50)


@pytest.mark.parametrize(("code", "verdict"), [
    ("OK", Verdict.OK), ("UNAVAILABLE", Verdict.RETRY), ("DEADLINE_EXCEEDED", Verdict.RETRY),
    ("CANCELLED", Verdict.RETRY), ("RESOURCE_EXHAUSTED", Verdict.REJECTED),
    ("INVALID_ARGUMENT", Verdict.FAILED), ("UNAUTHENTICATED", Verdict.FAILED), ("INTERNAL", Verdict.FAILED),
    ("ALREADY_EXISTS", Verdict.FAILED),
])
def test_grpc_verdicts(code: str, verdict: Verdict) -> None:
    assert grpc_verdict(code) is verdict


@pytest.mark.parametrize(("status", "verdict"), [
    (200, Verdict.OK), (503, Verdict.RETRY), (502, Verdict.RETRY), (504, Verdict.RETRY),
    (429, Verdict.REJECTED), (400, Verdict.FAILED), (401, Verdict.FAILED), (422, Verdict.FAILED),
    (500, Verdict.FAILED),
])
def test_http_verdicts(status: int, verdict: Verdict) -> None:
    assert http_verdict(status) is verdict


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "127.9.9.9:1", "localhost:8080", "[::1]:50051",
                                     "http://127.0.0.1:8080", "http://localhost", "http://[::1]:80/x"])
def test_loopback_targets_pass(address: str) -> None:
    require_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.1:50051", "192.168.1.2:80", "http://example.com",
                                     "8.8.8.8:53", "http://[2001:db8::1]:80", "rerank:50051"])
def test_other_targets_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not a loopback"):
        require_loopback(address)


def test_workload_is_deterministic_with_unique_keys() -> None:
    a, b = Workload(seed=3), Workload(seed=3)
    assert a.make(7).query == b.make(7).query and a.make(7).documents == b.make(7).documents
    assert a.make(7).key != b.make(7).key  # another run: other keys
    assert len({a.make(n).key for n in range(50)}) == 50
    assert len(a.make(1).documents) == a.documents


# -- the driver, against a scripted transport -----------------------------------------------
@dataclass
class Scripted:
    """Answers each key's attempts from a script; records what was sent."""

    script: dict[str, list[Verdict]]
    name: str = "scripted"

    def __post_init__(self) -> None:
        self.sent: list[LogicalRequest] = []

    async def send(self, request: LogicalRequest) -> Attempt:
        self.sent.append(request)
        verdicts = self.script.get(request.key, [Verdict.OK])
        verdict = verdicts.pop(0) if len(verdicts) > 1 else verdicts[0]
        await asyncio.sleep(0)
        return Attempt(verdict, verdict.name, 0.001, len(request.documents) if verdict is Verdict.OK else 0)

    async def close(self) -> None:
        pass


FAST = RetryPolicy(backoff_s=0.0, max_backoff_s=0.0, max_attempts=5, give_up_s=5.0)
REQ = LogicalRequest("k1", "q", ("a", "b"))


@pytest.mark.parametrize(("script", "attempts", "ok"), [
    ([Verdict.OK], 1, True),
    ([Verdict.RETRY, Verdict.RETRY, Verdict.OK], 3, True),
    ([Verdict.RETRY], 5, False),  # gives up after max_attempts
    ([Verdict.FAILED], 1, False),  # never resent
    ([Verdict.REJECTED, Verdict.OK], 1, False),  # rejections are final by default
])
async def test_send_logical_retries_only_what_may_succeed(script: list[Verdict], attempts: int,
                                                          ok: bool) -> None:
    transport = Scripted({"k1": list(script)})
    outcome = await send_logical(transport, REQ, FAST)
    assert (len(outcome.attempts), outcome.ok) == (attempts, ok)
    assert all(sent == REQ for sent in transport.sent)  # same key, same body, every time


async def test_rejections_are_resent_when_asked() -> None:
    transport = Scripted({"k1": [Verdict.REJECTED, Verdict.OK]})
    outcome = await send_logical(transport, REQ, RetryPolicy(backoff_s=0, retry_rejected=True))
    assert outcome.ok and len(outcome.attempts) == 2


async def test_give_up_time_bounds_a_logical_request() -> None:
    transport = Scripted({"k1": [Verdict.RETRY]})
    policy = RetryPolicy(backoff_s=0.02, max_backoff_s=0.02, max_attempts=10_000, give_up_s=0.1)
    outcome = await send_logical(transport, REQ, policy)
    assert not outcome.ok and outcome.seconds < 1.0 and 2 <= len(outcome.attempts) <= 10


async def test_resolve_resends_only_unknown_outcomes_with_their_keys() -> None:
    gave_up = LogicalRequest("lost", "q", ("a",))
    refused = LogicalRequest("refused", "q", ("a",))
    transport = Scripted({"lost": [Verdict.RETRY, Verdict.RETRY, Verdict.OK], "refused": [Verdict.FAILED]})
    policy = RetryPolicy(backoff_s=0, max_attempts=2)
    first = [await send_logical(transport, r, policy) for r in (gave_up, refused)]
    assert [o.unresolved for o in first] == [True, False]
    resolved = await resolve(transport, first, policy)
    assert resolved[0].ok and len(resolved[0].attempts) == 3 and resolved[0].key == "lost"
    assert resolved[1] == first[1]  # a definite answer is not asked again
    assert [r.key for r in transport.sent] == ["lost", "lost", "refused", "lost"]


async def test_run_level_is_bounded_and_summarised() -> None:
    workload = Workload(documents=3)
    failing = workload.make(1).key
    transport = Scripted({failing: [Verdict.FAILED]})
    run = await run_level(transport, Level(clients=4, requests_per_client=5), workload, FAST)
    summary = LevelSummary.of(run)
    assert (summary.requests, summary.succeeded, summary.failed) == (20, 19, 1)
    assert summary.final_codes == summary.error_codes == {"FAILED": 1}
    assert summary.documents_per_s > 0 and summary.p50_ms <= summary.p99_ms
    assert "| scripted | 4 | 20 | 19 | 1 |" in markdown_table([summary])


# -- reconciliation --------------------------------------------------------------------------
@dataclass(frozen=True)
class Rec:
    idempotency_key: str | None
    documents: int = 2


def outcome(key: str, ok: bool, docs: int = 2) -> Outcome:
    final = Attempt(Verdict.OK, "OK", 0.0, docs) if ok else Attempt(Verdict.FAILED, "INTERNAL", 0.0)
    return Outcome(key, docs, (final,), 0.0)


RUN = [outcome("a", True), outcome("b", True), outcome("c", False)]


@pytest.mark.parametrize(("records", "problems"), [
    ([Rec("a"), Rec("b")], set()),
    ([Rec("a")], {"missing", "documents"}),
    ([Rec("a"), Rec("b"), Rec("b")], {"duplicated", "documents"}),
    ([Rec("a"), Rec("b"), Rec("c")], {"billed_failures", "documents"}),
    ([Rec("a"), Rec("b"), Rec("zzz")], {"unknown", "documents"}),
    ([Rec("a"), Rec("b"), Rec(None)], {"unknown", "documents"}),
    ([Rec("a"), Rec("b", documents=3)], {"wrong_documents", "documents"}),
    ([Rec("a", documents=1), Rec("b", documents=3)], {"wrong_documents"}),  # the sums agree
])
def test_reconcile_finds_each_kind_of_mismatch(records: Sequence[Rec], problems: set[str]) -> None:
    rec = reconcile(RUN, records)
    found = {name for name in ("missing", "duplicated", "billed_failures", "wrong_documents")
             if getattr(rec, name)}
    found |= {"unknown"} if rec.unknown else set()
    found |= {"documents"} if rec.billed_documents != rec.succeeded_documents else set()
    assert found == problems
    assert rec.ok is (not problems)
    assert ("OK" if rec.ok else "MISMATCH") in rec.describe()
