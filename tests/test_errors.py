"""Each error condition is its own ``Code`` member, though several share a status."""

from __future__ import annotations

import pytest

from service.errors import Code, from_worker
from worker.types import InvalidInput, Overloaded, ShuttingDown


def test_every_condition_is_a_distinct_member() -> None:
    names = ["INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "IDEMPOTENCY_CONFLICT",
             "TOO_LARGE", "RATE_LIMITED", "OVERLOADED", "QUOTA_EXCEEDED", "DEADLINE_EXCEEDED", "UNAVAILABLE",
             "INTERNAL"]
    assert [c.name for c in Code] == names  # an alias would be missing from iteration
    assert len({id(Code[n]) for n in names}) == len(names)


@pytest.mark.parametrize("a, b", [("RATE_LIMITED", "OVERLOADED"), ("OVERLOADED", "QUOTA_EXCEEDED"),
                                  ("RATE_LIMITED", "QUOTA_EXCEEDED")])
def test_conditions_sharing_a_status_are_told_apart(a: str, b: str) -> None:
    assert Code[a] is not Code[b]
    assert Code[a] != Code[b]
    assert (Code[a].grpc_status, Code[a].http_status) == (Code[b].grpc_status, Code[b].http_status) \
        == ("RESOURCE_EXHAUSTED", 429)


def test_worker_errors_map_to_their_own_condition() -> None:
    assert from_worker(Overloaded("full", retry_after_s=1.0)).code is Code.OVERLOADED
    assert from_worker(Overloaded("full", retry_after_s=1.0)).code is not Code.RATE_LIMITED
    assert from_worker(ShuttingDown("bye")).code is Code.UNAVAILABLE
    assert from_worker(InvalidInput("bad")).code is Code.INVALID_ARGUMENT
