"""Closed-loop clients: each sends logical requests one after another, retrying with the same key.

A ``Transport`` turns one attempt into an ``Attempt`` and never raises for what the server
or the network did; the driver decides what to do next from the attempt's ``Verdict`` alone,
so gRPC and HTTP are retried by the same rules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.load.workload import LogicalRequest, Workload


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # outcome unknown or "try again": connection lost, UNAVAILABLE/503, deadline
    REJECTED = "rejected"  # RESOURCE_EXHAUSTED/429: overloaded or rate limited
    FAILED = "failed"  # a definite answer that a resend cannot change (bad input, auth, INTERNAL)


@dataclass(frozen=True, slots=True)
class Attempt:
    verdict: Verdict
    code: str  # gRPC status name, or "HTTP 503", or the connection error's class name
    seconds: float
    billed_documents: int = 0  # what the reply's usage says (0 unless OK)
    replayed: bool = False  # served from the idempotency record, not billed again
    retry_after_s: float | None = None
    started: float = 0.0  # time.perf_counter() at send: places the attempt on a fault's timeline


class Transport(Protocol):
    name: str

    async def send(self, request: LogicalRequest) -> Attempt: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 50
    give_up_s: float = 60.0  # from the first attempt
    backoff_s: float = 0.05  # doubled per retry, up to max_backoff_s; a server hint wins
    max_backoff_s: float = 1.0
    retry_rejected: bool = False  # resend after RESOURCE_EXHAUSTED/429 too

    def wants_retry(self, attempt: Attempt) -> bool:
        return attempt.verdict is Verdict.RETRY or (self.retry_rejected and attempt.verdict is Verdict.REJECTED)

    def wait_s(self, attempt: Attempt, tries: int) -> float:
        if attempt.retry_after_s is not None:
            return min(attempt.retry_after_s, self.max_backoff_s)
        return min(self.backoff_s * 2.0 ** (tries - 1), self.max_backoff_s)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one logical request, all attempts together."""

    key: str
    documents: int
    attempts: tuple[Attempt, ...]
    seconds: float  # first send to final answer, retries and waits included
    request: LogicalRequest | None = None  # what was sent, for a later resend

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def ok(self) -> bool:
        return self.final.verdict is Verdict.OK

    @property
    def unresolved(self) -> bool:
        """Given up on an answer that left the outcome unknown (timeout, lost connection): the
        server may have finished and billed it. Only a resend with the same key can tell."""
        return self.final.verdict is Verdict.RETRY


async def send_logical(transport: Transport, request: LogicalRequest, policy: RetryPolicy) -> Outcome:
    started = time.perf_counter()
    attempts: list[Attempt] = []
    while True:
        attempt = await transport.send(request)
        attempts.append(attempt)
        if not policy.wants_retry(attempt) or len(attempts) >= policy.max_attempts:
            break
        wait = policy.wait_s(attempt, len(attempts))
        if time.perf_counter() - started + wait > policy.give_up_s:
            break
        await asyncio.sleep(wait)
    return Outcome(request.key, len(request.documents), tuple(attempts), time.perf_counter() - started, request)


async def resolve(transport: Transport, outcomes: Sequence[Outcome], policy: RetryPolicy) -> list[Outcome]:
    """What a careful client does after giving up on an unknown outcome: send the same request
    with the same key again later. If the server had billed it, the answer is the stored reply,
    free (``replayed``); if not, it is computed and billed now. Either way the client learns the
    truth and the ledger holds exactly one record."""

    async def again(o: Outcome) -> Outcome:
        if not o.unresolved or o.request is None:
            return o
        later = await send_logical(transport, o.request, policy)
        return dataclasses.replace(later, attempts=o.attempts + later.attempts, seconds=o.seconds + later.seconds)

    return list(await asyncio.gather(*(again(o) for o in outcomes)))


@dataclass(frozen=True, slots=True)
class Level:
    """One step of a sweep: ``clients`` concurrent clients, each sending up to
    ``requests_per_client`` logical requests, all stopping after ``time_limit_s``."""

    clients: int
    requests_per_client: int
    time_limit_s: float = 60.0
    think_s: float = 0.0  # pause between a client's requests (0: closed loop, flat out)


@dataclass
class LevelRun:
    level: Level
    transport: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0


async def run_level(transport: Transport, level: Level, workload: Workload, policy: RetryPolicy,
                    first_n: int = 0, on_outcome: Callable[[Outcome], None] | None = None,
                    stop: asyncio.Event | None = None) -> LevelRun:
    """Run one level to completion (or until ``stop`` is set); request numbers start at
    ``first_n``, so several levels of one workload never share a key."""
    run = LevelRun(level, transport.name)
    deadline = time.perf_counter() + level.time_limit_s
    started = time.perf_counter()

    async def client(c: int) -> None:
        for i in range(level.requests_per_client):
            if time.perf_counter() >= deadline or (stop is not None and stop.is_set()):
                return
            outcome = await send_logical(transport, workload.make(first_n + c * level.requests_per_client + i),
                                         policy)
            run.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if level.think_s:
                await asyncio.sleep(level.think_s)

    await asyncio.gather(*(client(c) for c in range(level.clients)))
    run.wall_s = time.perf_counter() - started
    return run
