"""Giving the memory of a burst of large requests back to the operating system.

glibc's malloc keeps freed memory in its heaps for reuse: after a burst of megabyte
messages the server's resident size stays near the burst's peak, although nothing holds the
messages any more (measured: 85 MiB idle, about 200 MiB after a burst of 128 1-MiB calls, for
good). ``malloc_trim(0)`` returns the free pages; it walks the heaps, so it runs off the event
loop, once the request budget has held at least ``TRIM_AFTER_BYTES`` (reservations
included) and then stayed quiet for ``QUIET_S``. Elsewhere than glibc (musl, macOS) there
is nothing to call and nothing is done. docs/OPERATIONS.md has the figures.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 32 * 2**20  # a burst smaller than this leaves too little to be worth a heap walk
QUIET_S = 0.5  # a trim waits for the budget to stay quiet this long: a heap walk holds malloc's locks


def _malloc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class Trimmer:
    """``after_burst(peak)``: called each time a request budget empties. Once the budget has
    held ``threshold_bytes`` since the last trim, a trim runs when no budget has emptied for
    ``quiet_s``: after the burst, not during it (a busy server's budget empties between
    calls), and at once when traffic stops."""

    def __init__(self, threshold_bytes: int = TRIM_AFTER_BYTES, quiet_s: float = QUIET_S,
                 trim: Callable[[], object] | None = None) -> None:
        self.threshold_bytes = threshold_bytes
        self.quiet_s = quiet_s
        self.trim = trim if trim is not None else _malloc_trim()
        self.trims = 0  # how many have run: for tests
        self._peak = 0  # the most a budget held since the last trim
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    def after_burst(self, peak_bytes: int) -> None:
        self._peak = max(self._peak, peak_bytes)
        if self.trim is None or self._peak < self.threshold_bytes:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.quiet_s, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._running:  # the one running started before this burst ended: trim again after it
            self.after_burst(0)
            return
        self._running, self._peak = True, 0
        asyncio.get_running_loop().run_in_executor(None, self._run).add_done_callback(self._done)

    def _run(self) -> object:
        if self.trim is None:
            raise AssertionError("a trim was scheduled without a trim function: this is a bug")
        return self.trim()

    def _done(self, future: asyncio.Future[object]) -> None:
        self._running = False
        self.trims += 1
        if future.exception() is not None:
            log.warning("malloc_trim failed: %s", future.exception())
