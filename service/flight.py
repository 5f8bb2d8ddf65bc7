"""Single flight: identical keyed calls in flight at once run once, and share the outcome.

A client that retries before its first attempt has answered, or a proxy that resends, sends
the same idempotency key and body while the first is still being scored. The ledger would
bill it once anyway (its stored reply, or the lost race at commit); single flight also saves
the model the work: the duplicate waits for the first call and gets its result, or a copy
of its ``ServiceError``.

Invariants:

* At most one call per key runs at a time in this process (the lookup and the registration
  have no ``await`` between them).
* A waiting duplicate is never left hanging: the flight's future is always settled, with
  the result, the error, or cancelled when the first call ended without one (its caller went
  away, or a bug); then a waiting duplicate with the same body runs the call itself.
* A call with another body for the same key waits for the flight too, and then runs: the
  ledger decides (``IDEMPOTENCY_CONFLICT`` if the first call was billed), without a second
  computation racing the first.
* Waiting never cancels the flight: a waiter that goes away leaves the call running for the
  others.

Across replicas there is no single flight; the ledger's stored reply serves there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.errors import ServiceError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Flight(Generic[T]):
    fingerprint: str  # of the running call's body
    outcome: asyncio.Future[T | ServiceError]  # an error is an outcome too; cancelled: none


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: Hashable, fingerprint: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``work()``'s result, or that of the identical call in flight under ``key``: (result,
        whether it was another call's). Raises what ``work`` raises, or a copy of the other
        call's ``ServiceError``."""
        while (running := self._flights.get(key)) is not None:
            await asyncio.wait([running.outcome])  # our cancellation propagates; theirs is not ours
            if running.fingerprint == fingerprint and not running.outcome.cancelled():
                outcome = running.outcome.result()
                if isinstance(outcome, ServiceError):
                    raise ServiceError(outcome.code, outcome.message, outcome.retry_after_s)
                return outcome, True
        flight: _Flight[T] = _Flight(fingerprint, asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        try:
            result = await work()
        except ServiceError as exc:
            flight.outcome.set_result(exc)
            raise
        except BaseException:
            flight.outcome.cancel()
            raise
        finally:
            del self._flights[key]
        flight.outcome.set_result(result)
        return result, False
