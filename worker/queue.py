"""The token-budget queue: which queued documents run together in the next batch.

Theory of operation
-------------------
Requests arrive as groups of per-document ``Entry`` objects, appended in arrival order.
``next_batch`` always takes the oldest live entry (the head) and fills the batch with the
entries from a look-ahead window whose lengths are closest to the head's, so rows of
similar length run together and padding stays small, across requests. Among rows of
about the same length the older go first, so requests finish in arrival order.

Invariants
----------
* Padded cost: ``max(cost) * len(batch) <= max_batch_tokens`` and
  ``len(batch) <= max_batch_size``, except a head whose cost alone exceeds the budget: it
  runs alone rather than never. ``cost`` is the tokens a row computes (its shared prefix
  is cached); attention also reads the prefix, so ``max(len(ids)) * len(batch)`` is held
  under ``max_attention_tokens`` too, which bounds memory when a long query's prefix is
  shared by many short documents.
* Fairness: the head is in every batch, and only entries inside the window can join it, so
  an entry waits at most for the entries ahead of it; newer short work cannot starve it.
* Cancelled entries (their caller gave up, or their request already failed) are dropped
  when met, never returned.
* Plain and synchronous: no asyncio, no threads, no model. The batcher owns the only
  instance and calls it from the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class Owner(Protocol):
    """The request an entry belongs to; only its liveness matters here."""

    @property
    def cancelled(self) -> bool: ...


@dataclass(eq=False, slots=True)
class Entry:
    ids: list[int]  # full prompt ids
    prefix_len: int  # leading ids served from the shared-prefix cache (0: none)
    owner: Owner
    index: int  # the document's position in its request
    cost: int = field(init=False)  # tokens this row adds to a batch

    def __post_init__(self) -> None:
        self.cost = len(self.ids) - self.prefix_len


class TokenBudgetQueue:
    def __init__(self, max_batch_tokens: int, max_batch_size: int, window: int = 512,
                 max_attention_tokens: int | None = None) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1 or window < 1:
            raise ValueError("max_batch_tokens, max_batch_size and window must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_attention_tokens = max_attention_tokens or 4 * max_batch_tokens
        self.max_batch_size = max_batch_size
        self.window = window
        self._entries: deque[Entry] = deque()
        self.queued_tokens = 0

    def __len__(self) -> int:
        """Queued entries, cancelled ones not yet dropped included."""
        return len(self._entries)

    def append(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self._entries.append(entry)
            self.queued_tokens += entry.cost

    def next_batch(self) -> list[Entry]:
        """The next batch to run, oldest entry first; empty when nothing live is queued."""
        window = self._take_window()
        if not window:
            return []
        head, rest = window[0], window[1:]
        # closest lengths first, in buckets of ~1/8 of the head's length, oldest first within
        # a bucket: padding stays small and older requests finish first (latency), instead of
        # every request's documents being spread thinly over all the batches
        bucket = max(8, head.cost // 8)
        order = {id(e): n for n, e in enumerate(rest)}
        rest.sort(key=lambda e: (abs(e.cost - head.cost) // bucket, order[id(e)]))
        batch, longest, widest, leftover = [head], head.cost, len(head.ids), []
        for entry in rest:
            grown, wider, rows = max(longest, entry.cost), max(widest, len(entry.ids)), len(batch) + 1
            if (rows <= self.max_batch_size and grown * rows <= self.max_batch_tokens
                    and wider * rows <= self.max_attention_tokens):
                batch.append(entry)
                longest, widest = grown, wider
            else:
                leftover.append(entry)
        self._put_back(window, leftover)
        self.queued_tokens -= sum(e.cost for e in batch)
        return batch

    def drop_cancelled(self) -> int:
        """Remove every cancelled entry now; returns how many went."""
        before = len(self._entries)
        live = [e for e in self._entries if not e.owner.cancelled]
        self._entries = deque(live)
        self.queued_tokens = sum(e.cost for e in live)
        return before - len(live)

    def _take_window(self) -> list[Entry]:
        window: list[Entry] = []
        while self._entries and len(window) < self.window:
            entry = self._entries.popleft()
            if entry.owner.cancelled:
                self.queued_tokens -= entry.cost
            else:
                window.append(entry)
        return window

    def _put_back(self, window: list[Entry], leftover: list[Entry]) -> None:
        keep = set(map(id, leftover))
        for entry in reversed(window):  # restore arrival order at the front
            if id(entry) in keep:
                self._entries.appendleft(entry)
