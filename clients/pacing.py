"""Client-side pacing: a client that waits instead of being refused.

The server refuses at once what is over a key's rate limit (RESOURCE_EXHAUSTED with a
``retry-after-ms`` hint): it never holds a call open to make a caller wait. The caller is the
one that can wait, so this is where waiting lives. ``Pacing`` gives one client

* a budget: at most ``requests_per_s`` calls and ``documents_per_s`` documents per second,
  each a sliding window (asyncio-throttle's ``Throttler``); a call waits until both admit it;
* retries of RESOURCE_EXHAUSTED that carry the server's hint: the client sleeps as long as
  the hint says (and holds its other calls back as long), then sends the **same request**, with
  the same ``request_id``: the server's idempotency key, so a retry that crosses an earlier
  success is replayed, never billed twice. A refusal without a hint (a message over the size
  limit, say) is not retried; nor is one whose wait would outlast the call's deadline.

One ``Pacer`` per client: the budget is per client, not per process. The sync client runs the
same throttlers on a short-lived event loop per call; threads sharing one sync client share
its budget, which they may overrun by a call each when they race (the windows are not locked).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from asyncio_throttle.throttler import Throttler  # untyped: acquire() is typed below

T = TypeVar("T")
Hint = Callable[[Exception], "float | None"]  # the server's retry-after of a refusal worth retrying
Expired = Callable[[str], Exception]  # the caller's error for a deadline passed while waiting


@dataclass(frozen=True, slots=True)
class Pacing:
    requests_per_s: float | None = None  # None: no request budget
    documents_per_s: float | None = None  # None: no document budget
    max_retries: int = 3  # RESOURCE_EXHAUSTED retries that honour the server's retry-after-ms

    def __post_init__(self) -> None:
        for name, rate in (("requests_per_s", self.requests_per_s), ("documents_per_s", self.documents_per_s)):
            if rate is not None and not rate > 0:
                raise ValueError(f"{name} must be positive, got {rate}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")


def _throttler(rate: float | None) -> Throttler | None:
    """``rate`` per second as asyncio-throttle counts it: whole calls in a window (0.5/s is
    one per 2 s; 2.5/s is two per 0.8 s)."""
    if rate is None:
        return None
    calls = max(1, math.floor(rate))
    return Throttler(rate_limit=calls, period=calls / rate)


async def _acquire(throttler: Throttler) -> None:
    await throttler.acquire()  # type: ignore[no-untyped-call]


class Pacer:
    def __init__(self, pacing: Pacing) -> None:
        self.pacing = pacing
        self._requests = _throttler(pacing.requests_per_s)
        self._documents = _throttler(pacing.documents_per_s)
        self._paused_until = 0.0  # monotonic; the server's last retry-after holds every call

    async def admit(self, documents: int) -> None:
        """Wait until the budget takes one call of ``documents`` documents."""
        if (pause := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        if self._requests is not None:
            await _acquire(self._requests)
        if self._documents is not None:
            for _ in range(documents):
                await _acquire(self._documents)

    def retry_after(self, exc: Exception, hint: Hint, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before sending the call again, or None to give up with ``exc``."""
        wait = hint(exc)
        if wait is None or attempt >= self.pacing.max_retries or time.monotonic() + wait >= deadline:
            return None
        self._paused_until = max(self._paused_until, time.monotonic() + wait)
        return wait


async def paced(pacer: Pacer | None, documents: int, send: Callable[[float], Awaitable[T]], hint: Hint,
                timeout_s: float, expired: Expired) -> T:
    """``send(seconds_left)`` within the budget, sent again (the same request) after each hinted
    refusal; waits and attempts share the one deadline of ``timeout_s``: a budget that cannot
    admit the call in time raises ``expired(message)`` instead of sending it late."""
    if pacer is None:
        return await send(timeout_s)
    deadline = time.monotonic() + timeout_s
    for attempt in range(pacer.pacing.max_retries + 1):
        try:
            await asyncio.wait_for(pacer.admit(documents), deadline - time.monotonic())
        except TimeoutError:
            raise expired(f"the client's pacing budget did not admit this call of {documents} documents "
                          f"within its {timeout_s:g}s deadline") from None
        try:
            return await send(max(0.001, deadline - time.monotonic()))
        except Exception as exc:
            wait = pacer.retry_after(exc, hint, attempt, deadline)
            if wait is None:
                raise
            await asyncio.sleep(wait)
    raise AssertionError("the pacing loop fell through: this is a bug")


def paced_sync(pacer: Pacer | None, documents: int, send: Callable[[float], T], hint: Hint,
               timeout_s: float, expired: Expired) -> T:
    """``paced`` for the blocking client: the same loop on a short-lived event loop of this
    thread (so not from inside a running loop: there, use the async client)."""
    if pacer is None:
        return send(timeout_s)

    async def send_async(seconds_left: float) -> T:
        return send(seconds_left)  # blocking, on purpose: this loop serves this one call only

    return asyncio.run(paced(pacer, documents, send_async, hint, timeout_s, expired))
