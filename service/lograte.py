"""A logging filter that keeps what clients can make the server log from flooding it.

uvicorn logs one WARNING per malformed request ("Invalid HTTP request received."): a caller
with a socket can write the log as fast as it can send bad bytes, filling disks and burying
every other line. ``FloodFilter`` lets through at most ``burst`` records of each message per
``interval_s``; the last one let through says that the rest are being counted, and the first
one after the interval (or ``flush``, at shutdown) says how many were dropped. Messages are
keyed by their template (``record.msg``, not the formatted text), so the table holds one
entry per logging call site, never one per client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

_MAX_KEYS = 64  # call sites; past it (templates built from data) one shared entry counts the rest
_OTHER = "<other messages>"


@dataclass
class _Window:
    start: float
    passed: int = 0
    dropped: int = 0


class FloodFilter(logging.Filter):
    """At most ``burst`` records per message template per ``interval_s``, of records at
    ``level`` (records of other levels pass untouched: errors are never dropped)."""

    def __init__(self, burst: int = 10, interval_s: float = 60.0, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if burst < 1 or not interval_s > 0:
            raise ValueError(f"a flood filter needs burst >= 1 and interval_s > 0, got {burst}, {interval_s}")
        self.burst, self.interval_s, self.level, self.clock = burst, interval_s, level, clock
        self._windows: dict[str, _Window] = {}
        self.dropped_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != self.level:
            return True
        key = str(record.msg)
        if key not in self._windows and len(self._windows) >= _MAX_KEYS:
            key = _OTHER
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval_s:
            if window is not None and window.dropped:
                _append(record, f"{window.dropped} more like this were not logged in the "
                                f"{self.interval_s:g} s before")
            window = self._windows[key] = _Window(now)
        window.passed += 1
        if window.passed < self.burst:
            return True
        if window.passed == self.burst:
            _append(record, f"{self.burst} of these in {self.interval_s:g} s: more are counted, not logged, "
                            f"for the rest of the {self.interval_s:g} s")
            return True
        window.dropped += 1
        self.dropped_total += 1
        return False

    def flush(self, log: logging.Logger) -> None:
        """Log one summary line per message with records dropped and not yet reported."""
        windows, self._windows = self._windows, {}  # (``log`` may pass through this filter too)
        for key, window in windows.items():
            if window.dropped:
                log.log(self.level, "%d more %r were not logged (over %d in %g s)", window.dropped, key,
                        self.burst, self.interval_s)


def _append(record: logging.LogRecord, note: str) -> None:
    """Add ``note`` (no '%' in it, so any template stays valid) to the record's message."""
    record.msg = f"{record.msg} [{note}]"
