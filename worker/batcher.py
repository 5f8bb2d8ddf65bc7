"""The dynamic batcher: the one piece between the event loop and the model thread.

Theory of operation
-------------------
``score(request)`` tokenizes on a thread pool (off the loop and off the model thread, so the
next batch's tokens are ready while the model runs), turns the request into a ``Group`` of
per-row entries (one per document, or one per chunk of a document longer than ``max_length``:
chunks are rows of their request like any other), appends them to the scheduler
(``worker.queue``) and awaits the group's future. One background task, ``_run``, sleeps on an
``asyncio.Event`` until work arrives, optionally lingers for more until ``max_wait_ms`` after
the oldest queued request arrived, takes ``next_batch()``, hands it to ``runner.score`` as a
``Batch`` (rows and the prefixes they share, which the batcher decides: see ``_prefix``) on a
single model thread, and settles what finished. Every batch's measured time refits the cost
model (``worker.cost``) that the scheduler sizes batches by, fitted first at warm-up. A batch
that is one row's piece (the scheduler splits a row over the time budget) settles nothing: the
row advances (the runner walks it on, layer by layer: worker/qwen3.py) and waits for its next turn.
A request may carry a ``Watcher`` (tracing, built above the worker): it hears when its prompts
were built and when each batch holding its rows started, and each batch's ``BatchStats``
names the watchers of the requests it served; nothing here knows what they do with it.

Invariants
----------
* Every group's future is settled exactly once, result or exception, always guarded by
  ``done()``: a caller never hangs, and a late settle never raises.
* A caller that gives up (cancellation from a deadline or a disconnect) marks its group
  cancelled; its queued entries are dropped before they reach the model.
* A model error fails the groups in that batch only; the loop keeps serving.
* No polling: the loop waits on the event, with a timeout only while lingering.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from worker.cost import CostModel, Shape
from worker.prompt import PromptBuilder, Prompts
from worker.queue import Entry, Policy, TimeBudget, make_queue, shape_of
from worker.types import (
    Attention,
    Batch,
    BatchScores,
    Device,
    DocScore,
    InvalidInput,
    ModelFailure,
    Overloaded,
    Prefix,
    Row,
    Runner,
    ScoreRequest,
    ScoreResult,
    ShuttingDown,
    Watcher,
)

log = logging.getLogger(__name__)

SMALL_CALL_CHARS = 16_384  # query + documents: a few milliseconds of tokenizing at most


# query prefixes remembered for reuse across requests: more than the runner's K/V cache holds
# (512 MiB is ~2,300 prefix tokens of the 0.6B model in fp32), few enough to cost little here
RECENT_PREFIXES = 256

CALIBRATION_MIN_TOKENS = 512  # the time budget's calibration ladder climbs at least this far


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_tokens: int = 8192  # padded cost: longest row * rows
    max_batch_size: int = 64
    max_wait_ms: float = 2.0  # linger for more work when the model is idle; 0: never
    max_batch_ms: float = 500.0  # what one batch may take (worker/cost.py estimates it); 0: no bound
    max_queued_docs: int = 4096  # backpressure: more is Overloaded
    max_queued_tokens: int = 1_048_576  # ... and so is more queued work (row tokens, prefixes cached)
    scheduler: Policy = Policy.FAIR  # worker/queue.py: fair (tenants, priority) or fifo (arrival order)
    window: int = 512  # look-ahead for length bucketing
    prefix_reuse: bool = True  # share the query prefix across a request's documents
    tokenizer_threads: int = 2

    def __post_init__(self) -> None:
        if self.max_batch_ms < 0:
            raise ValueError(f"max_batch_ms must be 0 (tokens only) or positive, not {self.max_batch_ms}")

    @classmethod
    def for_device(cls, device: Device) -> BatcherConfig:
        """Defaults that suit the device. A CPU gains nothing from rows beyond a few hundred
        tokens (the matrix work is already large) but a waiting caller's latency grows with the
        batch: half a second of it at most; a GPU needs big batches to fill its cores, and a
        quarter second of one is tens of thousands of tokens (measured: docs/PERFORMANCE.md)."""
        if device is Device.CUDA:
            return cls(max_batch_tokens=65_536, max_batch_size=512, max_wait_ms=2.0, max_batch_ms=250.0)
        return cls(max_batch_tokens=4096, max_batch_size=64, max_wait_ms=2.0, max_batch_ms=500.0)


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch did, for metrics; handed to ``on_batch``."""

    rows: int
    requests: int
    computed_tokens: int  # everything the model ran: rows' own tokens plus new prefixes
    padded_tokens: int  # rows * longest row's own tokens (their sum where attention pads nothing)
    prefill_tokens: int  # shared prefixes computed for this batch (not part of padded_tokens)
    seconds: float
    failed: bool
    estimated_seconds: float = 0.0  # what the cost model expected before it ran
    started: float = 0.0  # time.perf_counter() when it was handed to the model
    watchers: tuple[Watcher, ...] = ()  # of the requests it served, where they have one (tracing)


@dataclass(eq=False)
class Group:
    """One request in flight: its prompts, its partial results and its future."""

    prompts: Prompts
    prefix: Prefix | None  # what its documents share with the model's cache; None: nothing
    future: asyncio.Future[ScoreResult]
    logits: list[float | None]
    remaining: int
    enqueued_at: float = field(default_factory=time.perf_counter)
    computed_tokens: int = 0
    cancelled: bool = False
    tenant: str = ""
    watcher: Watcher | None = None

    def result(self) -> ScoreResult:
        """Each document's score is its best chunk's (a document of one chunk: its own)."""
        if any(logit is None for logit in self.logits):
            raise AssertionError("a group settled with unscored documents: this is a bug")
        scores, row = [], 0
        for i, (chunks, cut) in enumerate(zip(self.prompts.chunks, self.prompts.truncated, strict=True)):
            logits = [x for x in self.logits[row: row + chunks] if x is not None]
            best = logits.index(max(logits))
            scores.append(DocScore(i, _sigmoid(logits[best]), logits[best], cut, chunks, best))
            row += chunks
        return ScoreResult(scores, prompt_tokens=sum(len(s) for s in self.prompts.sequences),
                           computed_tokens=self.computed_tokens,
                           queue_and_model_ms=1000 * (time.perf_counter() - self.enqueued_at))


class Batcher:
    def __init__(self, runner: Runner, builder: PromptBuilder, config: BatcherConfig | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None, cost: CostModel | None = None) -> None:
        self.runner = runner
        self.builder = builder
        # the query prefixes of recent requests by their ids, so a query asked again (the next
        # page of results, a retry, many callers asking the same) finds its cached K/V
        self._recent_prefixes: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self.config = config or BatcherConfig()
        # the time budget's yardstick: fitted by warmup(), or handed over already fitted
        info = runner.info()
        self.cost = cost or CostModel(padded=info.attention is Attention.PADDED)
        budget = (TimeBudget(self.config.max_batch_ms, self.cost, info.max_split_tokens, info.pieces_by_layer)
                  if self.config.max_batch_ms > 0 else None)
        self.queue = make_queue(self.config.scheduler, self.config.max_batch_tokens, self.config.max_batch_size,
                                self.config.window, time=budget)
        self.on_batch = on_batch
        self._pieces_by_layer = info.pieces_by_layer
        self._wake = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._tokenizers = ThreadPoolExecutor(self.config.tokenizer_threads, thread_name_prefix="tokenize")
        # small calls tokenize in their own lane: never queued behind large calls' seconds of it
        self._small_tokenizer = ThreadPoolExecutor(1, thread_name_prefix="tokenize-small")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight: set[Group] = set()
        self._seconds_per_token = 0.0  # moving estimate, for retry hints

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def warmup(self) -> None:
        """The runner's warm-up, then the time budget's calibration on this device."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._model_thread, self.runner.warmup)
        if self.config.max_batch_ms > 0 and not self.cost.calibrated:
            await loop.run_in_executor(self._model_thread, self._calibrate)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop taking work, finish what is queued within ``grace_s``, fail the rest."""
        self._closed = True
        if self._in_flight and grace_s > 0:
            await asyncio.wait([g.future for g in self._in_flight], timeout=grace_s)
        for group in list(self._in_flight):
            self._fail(group, ShuttingDown("the server is shutting down; retry on another replica"))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # joining the model thread waits for the batch in flight: off the loop, which keeps serving
        await asyncio.to_thread(self._model_thread.shutdown, True)
        self._tokenizers.shutdown(wait=False)
        self._small_tokenizer.shutdown(wait=False)

    @property
    def queued_docs(self) -> int:
        return len(self.queue)

    # -- the caller's side ---------------------------------------------------------------
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Scores in input order; raises InvalidInput, Overloaded, ShuttingDown or ModelFailure."""
        if not request.documents:
            raise InvalidInput("no documents: send at least one document")  # a group of none never settles
        self._admit(len(request.documents), 0, request.tenant)
        loop = asyncio.get_running_loop()
        tokenizing = time.perf_counter()
        prompts = await loop.run_in_executor(self._tokenizer_for(request), self.builder.build, request.query,
                                             request.documents, request.instruction, request.options)
        prefix = self._prefix(prompts)
        group = Group(prompts, prefix, loop.create_future(), [None] * len(prompts.sequences),
                      len(prompts.sequences), tenant=request.tenant, watcher=request.watcher)
        if group.watcher is not None:
            group.watcher.tokenized(tokenizing, group.enqueued_at)
        prefix_len = 0 if prefix is None else len(prefix.ids)
        entries = [Entry(ids, prefix_len, group, i) for i, ids in enumerate(prompts.sequences)]
        # the queue may have filled while we tokenized; now the request's own work is known
        self._admit(len(entries), sum(e.cost for e in entries), request.tenant)
        self.queue.append(entries, tenant=request.tenant, priority=request.priority)
        self._in_flight.add(group)
        self._wake.set()
        try:
            return await group.future
        finally:
            if not group.future.done() or group.future.cancelled():
                group.cancelled = True  # queued entries are dropped, not computed
            self._in_flight.discard(group)

    def _tokenizer_for(self, request: ScoreRequest) -> ThreadPoolExecutor:
        chars = len(request.query) + sum(map(len, request.documents))
        return self._small_tokenizer if chars <= SMALL_CALL_CHARS else self._tokenizers

    def _prefix(self, prompts: Prompts) -> Prefix | None:
        """Prefix reuse: a request's rows (documents, and a long document's chunks) share its whole
        prefix (system prompt, instruction, query), computed on top of the system prompt; a lone
        row shares only the system prompt, with every other request (the rest of its prefix is
        its own)."""
        system = self.builder.system
        if not self.config.prefix_reuse:
            return None
        if len(prompts.sequences) == 1 or prompts.shared_len <= len(system.ids):
            return system
        ids = prompts.sequences[0][: prompts.shared_len]
        key = tuple(ids)
        prefix = self._recent_prefixes.pop(key, None) or Prefix(ids, base=system)
        self._recent_prefixes[key] = prefix  # most recent last
        if len(self._recent_prefixes) > RECENT_PREFIXES:
            self._recent_prefixes.popitem(last=False)
        return prefix

    def _admit(self, docs: int, tokens: int, tenant: str) -> None:
        """Refuse work past either limit: documents, or tokens (what the model must run). A call
        alone in an empty queue is admitted whatever its size, or it could never run; and so is
        the one call of a tenant with nothing in flight, or one tenant's flood would lock every
        other out (the scheduler then gives it its share), up to twice the limits: many
        tenants (keys, or names a trusted front passes on) cannot grow the queue without bound."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self._over(docs, tokens):
            self.queue.drop_cancelled()
        if self._over(docs, tokens) and (self._over(docs, tokens, factor=2) or any(
                g.tenant == tenant and not g.cancelled for g in self._in_flight)):
            wait = max(0.05, self.queue.queued_tokens * self._seconds_per_token)
            raise Overloaded(f"{len(self.queue)} documents, {self.queue.queued_tokens} tokens queued (limits "
                             f"{self.config.max_queued_docs}, {self.config.max_queued_tokens}); retry in "
                             f"{wait:.2f}s", wait)

    def _over(self, docs: int, tokens: int, factor: int = 1) -> bool:
        queued = self.queue.queued_tokens
        return (len(self.queue) + docs > factor * self.config.max_queued_docs
                or (queued > 0 and queued + tokens > factor * self.config.max_queued_tokens))

    # -- the loop's side -----------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not len(self.queue):
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._linger()
            batch = self.queue.next_batch()
            if not batch:
                continue
            shape, work = shape_of(batch), _to_batch(batch)
            expected = self.cost.estimate_ms(shape) / 1000
            started = time.perf_counter()
            _tell_batched(batch, started)
            try:
                out = await loop.run_in_executor(self._model_thread, self.runner.score, work)
            except Exception as exc:  # noqa: BLE001 - any model error fails this batch only
                log.exception("model failed on a batch of %d documents", len(batch))
                self._settle_failed(batch, exc, started)
                continue
            seconds = time.perf_counter() - started
            if work.rows or not self._pieces_by_layer:  # a walked piece's time is not a batch's
                self.cost.observe(shape, 1000 * seconds)
            if work.rows:
                self._settle(batch, out, started, seconds, expected)
            else:
                self._advance(batch[0], work.prefixes[0], out, started, seconds, expected)

    async def _linger(self) -> None:
        """While the queue could take more, wait until max_wait_ms after the oldest queued
        request arrived: the linger gathers company for it, and under load (when it has
        already waited for the model that long) costs nothing."""
        deadline = self._oldest_arrival() + self.config.max_wait_ms / 1000
        while not self._full():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _oldest_arrival(self) -> float:
        # no batch runs while the loop lingers, so a live group with documents left has them queued
        live = (g.enqueued_at for g in self._in_flight if g.remaining and not g.cancelled)
        return min(live, default=time.perf_counter())

    def _full(self) -> bool:
        return (self.queue.queued_tokens >= self.config.max_batch_tokens
                or len(self.queue) >= self.config.max_batch_size)

    def _settle(self, batch: list[Entry], out: BatchScores, started: float, seconds: float,
                expected: float) -> None:
        groups: set[Group] = set()
        for entry, logit, computed in zip(batch, out.logits, out.computed, strict=True):
            group = entry.owner
            assert isinstance(group, Group)
            group.logits[entry.index] = logit
            group.computed_tokens += computed
            group.remaining -= 1
            groups.add(group)
            if group.remaining == 0 and not group.future.done():
                group.future.set_result(group.result())
        tokens = sum(out.computed)
        if tokens:
            self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * seconds / tokens
        self._report(BatchStats(len(batch), len(groups), tokens, out.padded_tokens, out.prefill_tokens,
                                seconds, False, expected, started, _watchers(groups)))

    def _calibrate(self) -> None:
        """On the model thread: time a ladder of shapes on this device, doubling the tokens from 32
        until one row alone takes twice the budget, 512 tokens at least (a slow device's first
        steps are all fixed cost: the fit needs the slope too), or the token budget ends it; each
        step as one row and as eight, on the cached system prompt, so the fit can tell rows,
        tokens and attention apart."""
        cap = max(16, self.builder.max_length - len(self.builder.prefix_ids) - 64)  # a row's own tokens
        tokens, lone_ms = 32, 0.0
        while ((lone_ms < 2 * self.config.max_batch_ms or tokens <= CALIBRATION_MIN_TOKENS)
               and tokens <= self.config.max_batch_tokens):
            few = min(-(-tokens // cap), self.config.max_batch_size)
            lone_ms = self._time_calibration(few, tokens)
            self._time_calibration(min(8 * few, self.config.max_batch_size), tokens)
            tokens *= 2
        fit = self.cost.coefficients()
        log.info("batch time budget %.0f ms; fitted on this device: %.1f ms a batch + %.2f ms a row + %.1f ms "
                 "per 1k tokens + %.1f ms per 1M attention pairs", self.config.max_batch_ms, fit["batch"],
                 fit["row"], fit["kilotoken"], fit["megapair"])

    def _time_calibration(self, rows: int, tokens: int) -> float:
        """Score ``rows`` rows of ``tokens`` own tokens in all on the system prompt; the fit learns it."""
        system = self.builder.system
        prompts = self.builder.build("calibration", ["the " * (tokens // rows)] * rows, None)
        started = time.perf_counter()
        self.runner.score(Batch([Row(ids, 0) for ids in prompts.sequences], [system]))
        ms = 1000 * (time.perf_counter() - started)
        self.cost.calibrate(Shape.of((len(ids) - len(system.ids), len(ids)) for ids in prompts.sequences), ms)
        return ms

    def _advance(self, entry: Entry, piece: Prefix, out: BatchScores, started: float, seconds: float,
                 expected: float) -> None:
        """A row's leading piece ran: the row stays queued, to continue from it."""
        entry.advance(piece)
        group = entry.owner
        assert isinstance(group, Group)
        group.computed_tokens += out.prefill_tokens
        self._report(BatchStats(1, 1, out.prefill_tokens, 0, out.prefill_tokens, seconds, False, expected,
                                started, _watchers({group})))

    def _settle_failed(self, batch: list[Entry], exc: BaseException, started: float) -> None:
        seconds = time.perf_counter() - started
        groups = {entry.owner for entry in batch}
        for group in groups:
            assert isinstance(group, Group)
            self._fail(group, ModelFailure(f"the model failed on this request's batch: {exc}"))
        self._report(BatchStats(len(batch), len(groups), 0, 0, 0, seconds, True, 0.0, started,
                                _watchers(groups)))

    def _fail(self, group: Group, exc: Exception) -> None:
        group.cancelled = True
        if not group.future.done():
            group.future.set_exception(exc)

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(stats)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("on_batch hook failed")


def _tell_batched(batch: list[Entry], started: float) -> None:
    """Tell the watchers of the batch's requests (tracing) that a batch of theirs started."""
    for entry in batch:
        group = entry.owner
        assert isinstance(group, Group)
        if group.watcher is not None:
            group.watcher.batched(started)


def _watchers(groups: set[Any]) -> tuple[Watcher, ...]:
    return tuple(g.watcher for g in groups if g.watcher is not None)


def _to_batch(entries: list[Entry]) -> Batch:
    """The runner's view of queued entries: rows, and each distinct prefix once. A row's piece
    (it runs alone) is no row: its leading tokens become a transient prefix on what it has,
    which the runner knows its walk by."""
    if entries[0].piece:
        entry = entries[0]
        return Batch([], [Prefix(entry.ids[: entry.prefix_len + entry.piece], _prefix_of(entry), transient=True)],
                     piece=entry.ids)
    slots: dict[Prefix, int] = {}  # by identity: one Prefix object per request (or per split row)
    rows = []
    for entry in entries:
        prefix = _prefix_of(entry)
        rows.append(Row(entry.ids, -1 if prefix is None else slots.setdefault(prefix, len(slots))))
    return Batch(rows, list(slots))


def _prefix_of(entry: Entry) -> Prefix | None:
    """What the row continues from: its own pieces run so far, or its request's prefix."""
    if isinstance(entry.lead, Prefix):
        return entry.lead
    group = entry.owner
    assert isinstance(group, Group)
    return group.prefix


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
