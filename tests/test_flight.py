"""``SingleFlight`` alone: deterministic, on events, no model and no database."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import Code, ServiceError
from service.flight import SingleFlight


class Work:
    """A piece of work that blocks until ``release`` and counts how often it ran."""

    def __init__(self, result: str = "r", error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.runs = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.runs += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_identical_calls_run_once_and_share_the_result() -> None:
    flights, work = SingleFlight[str](), Work("answer")
    tasks = [asyncio.create_task(flights.run("k", "body", work)) for _ in range(5)]
    await asyncio.sleep(0)
    work.release.set()
    assert await asyncio.gather(*tasks) == [("answer", False)] + [("answer", True)] * 4
    assert work.runs == 1 and len(flights) == 0


async def test_a_service_error_is_shared_as_a_copy_and_anything_else_hands_over() -> None:
    flights = SingleFlight[str]()
    failing = Work(error=ServiceError(Code.OVERLOADED, "busy", retry_after_s=2.0))
    tasks = [asyncio.create_task(flights.run("k", "body", failing)) for _ in range(3)]
    await asyncio.sleep(0)
    failing.release.set()
    errors = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, ServiceError) and (e.code, e.retry_after_s) == (Code.OVERLOADED, 2.0) for e in errors)
    assert len({id(e) for e in errors}) == 3 and failing.runs == 1
    crashing, fine = Work(error=RuntimeError("bug")), Work("second try")
    first = asyncio.create_task(flights.run("k", "body", crashing))
    second = asyncio.create_task(flights.run("k", "body", fine))
    await asyncio.sleep(0)
    crashing.release.set()
    fine.release.set()
    with pytest.raises(RuntimeError):
        await first
    assert await second == ("second try", False)  # not another call's bug: it ran itself


async def test_another_body_or_key_is_not_shared() -> None:
    flights, first, other_body, other_key = SingleFlight[str](), Work("1"), Work("2"), Work("3")
    a = asyncio.create_task(flights.run("k", "body", first))
    b = asyncio.create_task(flights.run("k", "another body", other_body))
    c = asyncio.create_task(flights.run("k2", "body", other_key))
    await asyncio.sleep(0)
    assert (first.runs, other_body.runs, other_key.runs) == (1, 0, 1)  # b waits for a; c runs at once
    other_key.release.set()
    assert await c == ("3", False)
    first.release.set()
    other_body.release.set()
    assert await a == ("1", False) and await b == ("2", False)
    assert other_body.runs == 1


async def test_a_waiter_going_away_leaves_the_call_running() -> None:
    flights, work = SingleFlight[str](), Work("kept")
    leader = asyncio.create_task(flights.run("k", "body", work))
    waiter = asyncio.create_task(flights.run("k", "body", work))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    work.release.set()
    assert await leader == ("kept", False)
