"""The scheduler: which queued documents run together in the next model batch.

Theory of operation
-------------------
Requests arrive as groups of per-document ``Entry`` objects, appended with the request's
``tenant`` (the API key id) and ``priority`` (lower runs first). ``next_batch`` decides two
things: *whose* rows may run next (the policy) and *which* of those fit one batch (the budget).

``FairQueue`` (the default policy) keeps one virtual clock per tenant and one per request:
the tokens they have had the model run for them. The candidates for the next batch are
listed in fair order by replaying deficit round robin with a one-token quantum (start-time
fair queueing): repeatedly the tenant with the smallest clock, then its request with the
smallest clock, gives its next row, and both clocks advance by that row's tokens. A tenant
(or a request) that arrives starts at the clock of the work now being served, so it goes
next: it neither banks credit while idle nor queues behind a backlog it did not send. Each
row taken is charged its padded cost (the batch's longest row: what it occupied).

Priority classes are served best first, every batch, except that every ``share_every``-th
batch contested by several classes goes to the class holding the oldest queued request.

``FifoQueue`` is the policy before fairness (oldest request first), kept to measure against
(``bench/noisy_neighbour.py``).

Both build a batch the same way (``_Budget.fill``): the first candidate (the head) always
runs; the other candidates join closest length first, in buckets of ~1/8 of the head's
length, in candidate order within a bucket, while the batch fits. Rows of one request keep
their shared prefix, so they stay groupable. What fits is counted in tokens and in time: a
caller that arrives while a batch runs waits for it, so a batch may cost at most
``max_batch_ms`` of the device at hand, as ``worker.cost.CostModel`` (fitted on this device,
at warm-up and from every batch since) estimates it from the batch's shape. A large call
therefore runs as many short batches, and a newcomer joins at the next boundary.

Invariants
----------
* Budget: ``max(cost) * len(batch) <= max_batch_tokens``, ``len(batch) <= max_batch_size``
  and ``max(len(ids)) * len(batch) <= max_attention_tokens``, except a head too large for
  any batch: it runs alone rather than never. ``cost`` is the tokens a row computes (its
  shared prefix is cached); attention also reads the prefix, hence the second bound.
* Time (with a ``TimeBudget`` whose cost model is fitted): ``estimate_ms(batch) <=
  max_batch_ms``, except a head that alone is over it. Such a row runs alone in *pieces*:
  the runner walks it layer by layer, each piece a slice of the row's work (worker/qwen3.py
  ``walk``: the same computation, blocks of each layer in order, exact as the parity suite
  holds it), and the batcher advances it, still queued, until what is left fits. A walked
  piece pays no batch's fixed cost (it reads one or two layers' weights), so it is the most
  that fits the budget; a runner whose pieces are batches of their own (``pieces_by_layer``
  false) gets pieces of at least ``PIECE_OVER_FIXED`` times a batch's fixed cost (a CPU streams
  every weight once a batch; smaller pieces would waste most of it). A row starts pieces only
  while the rows in pieces, it included, fit what the runner holds of them
  (``max_split_tokens``: two ``max_length`` rows); else it waits for them, and rows in pieces
  or within the budget alone lead the batches meanwhile (run whole, it would hold every caller
  for its whole time). So the batch in flight, which is all a newly due caller waits for,
  takes about ``max_batch_ms`` at most, as the cost model estimates it. Each piece is
  charged to its request's and tenant's clocks like a row, so the fair order puts every other
  due request between the pieces of a long row, and between one call's long rows.
* Fair share (``FairQueue``): the head of every batch is the first row of the fair order
  of the class chosen, so the tenant of a class that has had the fewest tokens served since
  it had work queued is in the next batch. A call never waits for another tenant's call to
  finish: only for the batch in flight and the turns of tenants no further ahead than it
  (one batch each at most); the same holds between the requests of one tenant.
  Another tenant's row joins only if its fair start is within ``max_batch_tokens`` of the
  head's, so two tenants with work queued throughout never differ in tokens charged by more
  than ``2 * max_batch_tokens``, however length bucketing picks within that horizon. A row
  not yet due (its fair start is past the head's start plus the head's own tokens) joins
  only if it is no longer than the head: a short call's batch is never widened by rows that
  could wait (on a CPU a batch takes time in proportion to its padded tokens; the short call
  would wait for two maximal batches, not one).
* Starvation bound (``FairQueue``): while several priority classes have work, at least one
  batch in every ``share_every`` is headed by the class of the oldest queued request; so
  once a request is the oldest queued, its class is served within ``share_every`` batches,
  and no request waits forever, whatever arrives after it.
* Cancelled entries (their caller gave up, or their request already failed) are dropped
  when met, never returned; ``queued_tokens`` and ``len`` count live and not-yet-met ones.
* Plain and synchronous: no asyncio, no threads, no model, no clock. The batcher owns the
  only instance and calls it from the event loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from worker.cost import CostModel, Shape

PIECE_OVER_FIXED = 5  # a row's piece takes at least this many times a batch's fixed cost


class Policy(StrEnum):
    FAIR = "fair"  # tenants by tokens served, then their requests; priority classes best first
    FIFO = "fifo"  # arrival order: to compare with, never to serve


POLICIES = tuple(Policy)


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
    piece: int = field(init=False, default=0)  # >0: the batch runs only this many of its tokens (a piece)
    lead: object = field(init=False, default=None)  # the batcher's handle on its pieces run so far

    def __post_init__(self) -> None:
        self.cost = len(self.ids) - self.prefix_len

    def advance(self, lead: object) -> None:
        """Its piece ran: those tokens are now part of its prefix (``lead``), and it stays queued."""
        self.prefix_len += self.piece
        self.cost -= self.piece
        self.piece = 0
        self.lead = lead


@dataclass(frozen=True, slots=True)
class TimeBudget:
    """What one batch may take (``max_batch_ms``, as ``cost`` estimates it), and the tokens of
    rows in pieces the runner holds at once to keep to it (0: none). ``pieces_by_layer``: the
    runner walks a piece layer by layer (worker/qwen3.py), so it pays no batch's fixed cost."""

    max_batch_ms: float
    cost: CostModel
    max_split_tokens: int = 0
    pieces_by_layer: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_ms <= 0:
            raise ValueError("max_batch_ms must be positive (no time budget: pass none)")


@dataclass(frozen=True, slots=True)
class _Budget:
    max_batch_tokens: int
    max_batch_size: int
    max_attention_tokens: int
    time: TimeBudget | None = None

    def in_time(self, shape: Shape) -> bool:
        return self.time is None or self.time.cost.estimate_ms(shape) <= self.time.max_batch_ms

    def piece(self, head: Entry, held: int = 0) -> int:
        """Tokens of ``head`` to run now: 0 (all of it) unless it alone is over the time budget
        and may be split: the runner holds it beside the ``held`` tokens of the other rows in
        pieces. Then the row is cut into equal pieces of the most that fit the budget: walked by
        layer, a piece pays no batch's fixed cost; otherwise never of so few tokens that a
        batch's fixed cost is over a fifth of the piece's time (a CPU streams every weight once
        a batch: pieces of a few tokens would run at a fraction of its rate; judged by the
        warm-up fit, which saw the whole range)."""
        time = self.time
        if (time is None or not time.cost.calibrated or len(head.ids) + held > time.max_split_tokens
                or self.in_time(Shape.of([(head.cost, len(head.ids))]))):  # the whole row, whatever piece it last ran
            return 0

        def ms(k: int, at_warmup: bool = False) -> float:
            return time.cost.estimate_ms(Shape.of([(k, head.prefix_len + k)]), at_warmup=at_warmup)

        skipped = time.cost.coefficients()["batch"] if time.pieces_by_layer else 0.0
        fits = max(1, _first(head.cost, lambda k: ms(k) > time.max_batch_ms + skipped) - 1)
        efficient = 1 if time.pieces_by_layer else _first(
            head.cost, lambda k: ms(k, True) >= PIECE_OVER_FIXED * ms(1, True))
        # as few pieces as keep each within the budget, or as many as keep each efficient
        pieces = -(-head.cost // fits) if fits >= efficient else head.cost // efficient
        return -(-head.cost // pieces) if pieces > 1 else 0

    def waits(self, head: Entry, held: int) -> bool:
        """Whether ``head`` must wait for the rows in pieces: alone over the time budget, and
        the runner holds its pieces, but not beside the ``held`` tokens of theirs."""
        time = self.time
        return (time is not None and time.cost.calibrated and held > 0
                and len(head.ids) <= time.max_split_tokens < len(head.ids) + held
                and not self.in_time(Shape.of([(head.cost, len(head.ids))])))

    def fill(self, candidates: list[Entry], tiers: list[int] | None = None,
             early: list[bool] | None = None, held: int = 0) -> list[Entry]:
        """The batch: ``candidates[0]`` and what joins it. ``tiers`` (lower first) rank the
        candidates above length closeness: rows of a worse class only fill spare room. An
        ``early`` row (not yet due) joins only if it is no longer than the head."""
        head = candidates[0]
        head.piece = self.piece(head, held)
        if head.piece:
            return [head]  # alone: the rest of the budget is this row's next piece, later
        bucket = max(8, head.cost // 8)
        tier = tiers or [0] * len(candidates)
        order = sorted(range(1, len(candidates)),
                       key=lambda n: (tier[n], abs(candidates[n].cost - head.cost) // bucket, n))
        batch, shape = [head], shape_of([head])
        for n in order:
            entry = candidates[n]
            if early and early[n] and entry.cost > head.cost:
                continue
            grown = shape.plus(entry.cost, len(entry.ids))
            if (grown.rows <= self.max_batch_size and grown.longest * grown.rows <= self.max_batch_tokens
                    and grown.widest * grown.rows <= self.max_attention_tokens and self.in_time(grown)):
                batch.append(entry)
                shape = grown
        return batch


class _QueueBase:
    def __init__(self, max_batch_tokens: int, max_batch_size: int, window: int = 512,
                 max_attention_tokens: int | None = None, time: TimeBudget | None = None) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1 or window < 1:
            raise ValueError("max_batch_tokens, max_batch_size and window must be positive")
        self.budget = _Budget(max_batch_tokens, max_batch_size, max_attention_tokens or 4 * max_batch_tokens, time)
        self.window = window  # candidates considered for one batch (length bucketing look-ahead)
        self.queued_tokens = 0
        self._count = 0
        self._in_pieces: dict[int, Entry] = {}  # rows some of whose pieces ran, by id

    def _fill(self, candidates: list[Entry], tiers: list[int] | None = None,
              early: list[bool] | None = None) -> list[Entry]:
        """``budget.fill``, told what the rows already in pieces hold in the runner: a
        row in pieces goes on; another starts its pieces only if the runner holds them all."""
        self._in_pieces = {k: e for k, e in self._in_pieces.items() if not e.owner.cancelled}
        in_pieces = sum(len(e.ids) for e in self._in_pieces.values())
        first = self._runnable(candidates, in_pieces)
        if first:  # the head waits for the rows in pieces: the first that may run leads instead
            order = [first, *(n for n in range(len(candidates)) if n != first)]
            candidates = [candidates[n] for n in order]
            tiers = None if tiers is None else [tiers[n] for n in order]
            early = None if early is None else [early[n] for n in order]
        head = candidates[0]
        batch = self.budget.fill(candidates, tiers, early, 0 if id(head) in self._in_pieces else in_pieces)
        for entry in batch:
            if entry.piece:
                self._in_pieces[id(entry)] = entry
            else:
                self._in_pieces.pop(id(entry), None)
        return batch

    def _runnable(self, candidates: list[Entry], held: int) -> int:
        """The first candidate that may lead a batch now: 0, unless the head is a row that
        must run in pieces and the runner cannot hold them beside the rows already in pieces
        (run whole instead, it would hold every caller for its whole time); then a row in
        pieces, which goes on, or a row within the time budget alone. No other long row starts
        pieces meanwhile, so the runner's room only frees until the head's turn comes. None such: the
        head (it runs rather than never)."""
        if id(candidates[0]) in self._in_pieces or not self.budget.waits(candidates[0], held):
            return 0
        for n, entry in enumerate(candidates):
            if id(entry) in self._in_pieces or self.budget.in_time(Shape.of([(entry.cost, len(entry.ids))])):
                return n
        return 0

    def __len__(self) -> int:
        """Queued entries, cancelled ones not yet dropped included."""
        return self._count

    def _counted(self, entries: list[Entry], sign: int) -> None:
        self._count += sign * len(entries)
        self.queued_tokens += sign * sum(e.cost for e in entries)


class FifoQueue(_QueueBase):
    """Oldest entry first, whoever sent it: the policy before fair scheduling."""

    def __init__(self, max_batch_tokens: int, max_batch_size: int, window: int = 512,
                 max_attention_tokens: int | None = None, time: TimeBudget | None = None) -> None:
        super().__init__(max_batch_tokens, max_batch_size, window, max_attention_tokens, time)
        self._entries: deque[Entry] = deque()

    def append(self, entries: Iterable[Entry], *, tenant: str = "", priority: int = 0) -> None:
        added = list(entries)
        self._entries.extend(added)
        self._counted(added, +1)

    def next_batch(self) -> list[Entry]:
        """The next batch to run, oldest entry first; empty when nothing live is queued."""
        window: list[Entry] = []
        while self._entries and len(window) < self.window:
            entry = self._entries.popleft()
            self._counted([entry], -1)
            if not entry.owner.cancelled:
                window.append(entry)
        if not window:
            return []
        batch = self._fill(window)
        taken = {id(e) for e in batch if not e.piece}  # a piece's row stays, first in line
        leftover = [e for e in window if id(e) not in taken]
        self._entries.extendleft(reversed(leftover))  # back at the front, in arrival order
        self._counted(leftover, +1)
        self.queued_tokens -= sum(e.piece for e in batch)
        return batch

    def drop_cancelled(self) -> int:
        """Remove every cancelled entry now; returns how many went."""
        gone = [e for e in self._entries if e.owner.cancelled]
        self._entries = deque(e for e in self._entries if not e.owner.cancelled)
        self._counted(gone, -1)
        return len(gone)


# -- fair scheduling ------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class _Flow:
    """One request's queued entries, in document order."""

    owner: Owner
    entries: list[Entry]
    seq: int  # arrival number: ties and "oldest request"
    vtime: int  # tokens charged to this request


@dataclass(eq=False, slots=True)
class _Tenant:
    seq: int
    vtime: int  # tokens charged to this tenant while it had work queued
    clock: int = 0  # the clock of the request served last: where a new request starts
    flows: dict[int, _Flow] = field(default_factory=dict)  # by id(owner)


@dataclass(eq=False, slots=True)
class _Class:
    priority: int
    clock: int = 0  # the clock of the tenant served last: where a new tenant starts
    tenants: dict[str, _Tenant] = field(default_factory=dict)

    def oldest(self) -> int:
        return min(f.seq for t in self.tenants.values() for f in t.flows.values())


class FairQueue(_QueueBase):
    """Priority classes; in each, tenants and then their requests share by tokens (DRR)."""

    def __init__(self, max_batch_tokens: int, max_batch_size: int, window: int = 512,
                 max_attention_tokens: int | None = None, time: TimeBudget | None = None,
                 share_every: int = 4) -> None:
        super().__init__(max_batch_tokens, max_batch_size, window, max_attention_tokens, time)
        if share_every < 2:
            raise ValueError("share_every must be at least 2 (1 would ignore priority)")
        self.share_every = share_every
        self._classes: dict[int, _Class] = {}
        self._seq = itertools.count()
        self._contested = 0  # batches built while several classes had work

    def append(self, entries: Iterable[Entry], *, tenant: str = "", priority: int = 0) -> None:
        added = [e for e in entries if not e.owner.cancelled]
        if not added:
            return
        cls = self._classes.setdefault(priority, _Class(priority))
        if tenant not in cls.tenants:
            cls.tenants[tenant] = _Tenant(next(self._seq), vtime=cls.clock)
        state = cls.tenants[tenant]
        for owner_id, group in itertools.groupby(added, key=lambda e: id(e.owner)):
            rows = list(group)
            flow = state.flows.get(owner_id)
            if flow is None:
                state.flows[owner_id] = _Flow(rows[0].owner, rows, next(self._seq), vtime=state.clock)
            else:
                flow.entries.extend(rows)
        self._counted(added, +1)

    def next_batch(self) -> list[Entry]:
        """The next batch to run, fair order first; empty when nothing live is queued."""
        self.drop_cancelled()
        if not self._classes:
            return []
        chosen = self._choose_class()
        candidates: list[Entry] = []
        tiers: list[int] = []
        early: list[bool] = []
        rest = sorted((c for c in self._classes.values() if c is not chosen), key=lambda c: c.priority)
        for tier, cls in enumerate([chosen, *rest]):
            first: tuple[int, int, int] | None = None  # the tier head's tenant, start and cost
            for entry, start, tenant in itertools.islice(self._fair_order(cls), self.window - len(candidates)):
                first = first or (tenant, start, entry.cost)
                if tenant != first[0] and start > first[1] + self.budget.max_batch_tokens:
                    continue  # another tenant's row, far ahead of its fair turn
                candidates.append(entry)
                tiers.append(tier)
                early.append(tenant != first[0] and start > first[1] + first[2])
        batch = self._fill(candidates, tiers, early)
        self._take(batch)
        return batch

    def drop_cancelled(self) -> int:
        """Remove every cancelled request now; returns how many entries went."""
        gone = 0
        for cls in list(self._classes.values()):
            for name, tenant in list(cls.tenants.items()):
                for owner_id, flow in list(tenant.flows.items()):
                    if flow.owner.cancelled:
                        gone += len(flow.entries)
                        self._counted(flow.entries, -1)
                        del tenant.flows[owner_id]
                self._forget_if_idle(cls, name)
        return gone

    def _choose_class(self) -> _Class:
        best = self._classes[min(self._classes)]
        if len(self._classes) == 1:
            return best
        self._contested += 1
        if self._contested % self.share_every == 0:
            return min(self._classes.values(), key=_Class.oldest)
        return best

    def _fair_order(self, cls: _Class) -> Iterator[tuple[Entry, int, int]]:
        """DRR with a one-token quantum, replayed on copies of the clocks: tenant by smallest
        clock, then its request by smallest clock; ties go to the earlier arrival. Each row
        comes with its tenant's clock when it is reached (its fair start) and its tenant."""
        tenants = [(t.vtime, t.seq, n) for n, t in enumerate(cls.tenants.values())]
        flows = [[(f.vtime, f.seq, 0, f) for f in t.flows.values()] for t in cls.tenants.values()]
        heapq.heapify(tenants)
        for heap in flows:
            heapq.heapify(heap)
        while tenants:
            t_clock, t_seq, n = heapq.heappop(tenants)
            f_clock, f_seq, pos, flow = heapq.heappop(flows[n])
            entry = flow.entries[pos]
            yield entry, t_clock, n
            if pos + 1 < len(flow.entries):
                heapq.heappush(flows[n], (f_clock + entry.cost, f_seq, pos + 1, flow))
            if flows[n]:
                heapq.heappush(tenants, (t_clock + entry.cost, t_seq, n))

    def _take(self, batch: list[Entry]) -> None:
        """Remove ``batch`` from the queue (a piece's row stays, with its tokens left) and charge
        each row its padded cost."""
        padded = max(e.piece or e.cost for e in batch)
        served = {id(e) for e in batch}
        taken = {id(e) for e in batch if not e.piece}
        owners = {id(e.owner) for e in batch}
        for cls in list(self._classes.values()):
            tenant_clocks = []
            for name, tenant in list(cls.tenants.items()):
                flows = [f for k, f in tenant.flows.items() if k in owners]
                if not flows:
                    continue
                tenant_clocks.append(tenant.vtime)
                tenant.clock = max(tenant.clock, min(f.vtime for f in flows))
                for flow in flows:
                    rows = sum(1 for e in flow.entries if id(e) in served)
                    flow.vtime += padded * rows
                    tenant.vtime += padded * rows
                    flow.entries = [e for e in flow.entries if id(e) not in taken]
                    if not flow.entries:
                        del tenant.flows[id(flow.owner)]
                self._forget_if_idle(cls, name)
            if tenant_clocks:
                cls.clock = max(cls.clock, min(tenant_clocks))
        self._counted([e for e in batch if not e.piece], -1)
        self.queued_tokens -= sum(e.piece for e in batch)

    def _forget_if_idle(self, cls: _Class, tenant: str) -> None:
        """A tenant without queued work keeps no clock (no credit, no debt); an empty class goes."""
        if not cls.tenants[tenant].flows:
            del cls.tenants[tenant]
        if not cls.tenants:
            self._classes.pop(cls.priority, None)


def _first(n: int, over: Callable[[int], bool]) -> int:
    """The least k in 1..n with ``over(k)`` (false, then true, as k grows); n + 1 if none."""
    lo, hi = 1, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if over(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def shape_of(entries: Iterable[Entry]) -> Shape:
    """A batch's shape, as the budget counted it while filling."""
    return Shape.of((e.piece or e.cost, e.prefix_len + (e.piece or e.cost)) for e in entries)


def make_queue(policy: str, max_batch_tokens: int, max_batch_size: int, window: int = 512,
               max_attention_tokens: int | None = None, time: TimeBudget | None = None) -> FairQueue | FifoQueue:
    kind: type[FairQueue] | type[FifoQueue] | None = {"fair": FairQueue, "fifo": FifoQueue}.get(policy)
    if kind is None:
        raise ValueError(f"unknown scheduler {policy!r}: use one of {', '.join(POLICIES)}")
    return kind(max_batch_tokens, max_batch_size, window, max_attention_tokens, time)

