"""The scheduler, table-driven: budget, bucketing and cancellation under both policies; fair
shares across tenants and requests, priority and its starvation bound under ``FairQueue``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from worker.cost import CostModel, Shape
from worker.queue import POLICIES, Entry, FairQueue, FifoQueue, Policy, TimeBudget, make_queue, shape_of


@dataclass(eq=False)
class Owner:
    cancelled: bool = False
    label: str = ""


def entries(costs: list[int], owner: Owner | None = None) -> list[Entry]:
    owner = owner or Owner()
    return [Entry(list(range(c)), 0, owner, i) for i, c in enumerate(costs)]


def labels(batch: list[Entry]) -> str:
    return "".join(sorted(e.owner.label for e in batch))  # type: ignore[attr-defined]


def drain(queue: FairQueue | FifoQueue) -> list[list[Entry]]:
    batches = []
    while batch := queue.next_batch():
        batches.append(batch)
    return batches


# -- what both policies keep: the budget, bucketing, cancellation ---------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("costs", "budget", "max_size", "expected_first_batch"),
    [
        ([10, 10, 10, 10], 40, 64, [10, 10, 10, 10]),  # exactly the budget
        ([10, 10, 10, 10, 10], 40, 64, [10, 10, 10, 10]),  # one over: left for later
        ([10, 10, 10, 10], 1000, 2, [10, 10]),  # row cap
        ([100, 10, 10], 150, 64, [100]),  # padded cost: 100*2 > 150 although 120 < 150
        ([500, 10], 100, 64, [500]),  # larger than the budget: served alone, not starved
        ([50, 10, 48, 12, 51], 150, 64, [50, 48, 12]),  # close lengths first; 12 still fits
        ([10, 50, 11, 49, 12], 40, 64, [10, 11, 12]),  # ... in both directions
    ],
)
def test_batch_respects_padded_budget(policy: Policy, costs: list[int], budget: int, max_size: int,
                                      expected_first_batch: list[int]) -> None:
    queue = make_queue(policy, budget, max_size)
    queue.append(entries(costs))
    batch = queue.next_batch()
    assert sorted(e.cost for e in batch) == sorted(expected_first_batch)
    assert batch[0].index == 0  # the head always runs
    if len(batch) > 1:
        assert max(e.cost for e in batch) * len(batch) <= budget


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(5))
def test_every_entry_is_served_once_in_bounded_batches(policy: Policy, seed: int) -> None:
    rng = random.Random(seed)
    queue = make_queue(policy, 256, 4)
    sent: set[tuple[int, int]] = set()
    for n in range(12):
        owner = Owner(label=str(n))
        rows = entries([rng.randint(1, 300) for _ in range(rng.randint(1, 6))], owner)
        queue.append(rows, tenant=rng.choice("abc"), priority=rng.choice([0, 0, 5]))
        sent |= {(id(owner), e.index) for e in rows}
    served: list[tuple[int, int]] = []
    for batch in drain(queue):
        assert len(batch) <= 4
        assert len(batch) == 1 or max(e.cost for e in batch) * len(batch) <= 256
        served += [(id(e.owner), e.index) for e in batch]
    assert sorted(served) == sorted(sent)
    assert queue.queued_tokens == 0 and len(queue) == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_cancelled_entries_are_dropped_not_returned(policy: Policy) -> None:
    gone, live = Owner(), Owner()
    queue = make_queue(policy, 1000, 64)
    queue.append(entries([5, 5, 5], gone), tenant="a")
    queue.append(entries([6, 6], live), tenant="b")
    gone.cancelled = True
    assert [e.owner for e in queue.next_batch()] == [live, live]
    assert queue.next_batch() == []
    assert queue.queued_tokens == 0 and len(queue) == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_drop_cancelled_frees_capacity(policy: Policy) -> None:
    gone = Owner()
    queue = make_queue(policy, 1000, 64)
    queue.append(entries([5, 5], gone))
    queue.append(entries([3]))
    gone.cancelled = True
    assert queue.drop_cancelled() == 2
    assert len(queue) == 1 and queue.queued_tokens == 3


@pytest.mark.parametrize("policy", POLICIES)
def test_window_limits_lookahead(policy: Policy) -> None:
    queue = make_queue(policy, 1000, 64, window=2)
    queue.append(entries([10, 50, 10]))
    assert [e.index for e in queue.next_batch()] == [0, 1]  # index 2 is outside the window
    assert [e.index for e in queue.next_batch()] == [2]


@pytest.mark.parametrize("policy", POLICIES)
def test_long_shared_prefix_bounds_attention_width(policy: Policy) -> None:
    owner = Owner()
    rows = [Entry(list(range(1000)), 980, owner, i) for i in range(10)]  # cost 20, width 1000
    queue = make_queue(policy, max_batch_tokens=1000, max_batch_size=64, max_attention_tokens=4000)
    queue.append(rows)
    assert [len(queue.next_batch()) for _ in range(3)] == [4, 4, 2]  # 20 * 10 would fit the budget


def test_prefix_reuse_lowers_cost() -> None:
    entry = Entry(list(range(100)), 80, Owner(), 0)
    assert entry.cost == 20


@pytest.mark.parametrize("args", [(0, 1), (1, 0), (1, 1, 0)])
def test_rejects_nonsense_config(args: tuple[int, ...]) -> None:
    for cls in (FairQueue, FifoQueue):
        with pytest.raises(ValueError):
            cls(*args)
    with pytest.raises(ValueError, match="share_every"):
        FairQueue(10, 10, share_every=1)
    with pytest.raises(ValueError, match="scheduler"):
        make_queue("lifo", 10, 10)  # type: ignore[arg-type]


# -- the orders, side by side -----------------------------------------------------------------
# Each request: (label, tenant, priority, row costs), appended in this order before the first
# batch. Expected: the labels of each batch's rows, sorted, batch by batch.
FLOOD_THEN_QUIET = [("F", "flood", 0, [100] * 6), ("G", "flood", 0, [100] * 6), ("q", "quiet", 0, [100])]
ORDERS = [
    # a small call never waits for another tenant's large call, only for a fair share
    ("flood then quiet", FLOOD_THEN_QUIET, 200, {"fifo": ["FF", "FF", "FF", "GG", "GG", "GG", "q"],
                                                 "fair": ["Fq", "FG", "FG", "FG", "FG", "FG", "G"]}),
    # ... and the same between the requests of one tenant
    ("big then small, one tenant", [("B", "k", 0, [100] * 6), ("s", "k", 0, [100])], 200,
     {"fifo": ["BB", "BB", "BB", "s"], "fair": ["Bs", "BB", "BB", "B"]}),
    # shares are by tokens: one 400-token row is worth four of 100
    ("weighted by tokens", [("L", "a", 0, [400] * 3), ("s", "b", 0, [100] * 9)], 400,
     {"fifo": ["L", "L", "L", "ssss", "ssss", "s"], "fair": ["L", "ssss", "L", "ssss", "L", "s"]}),
    # priority: the better class first, whenever it has work
    ("priority first", [("z", "a", 9, [100] * 2), ("u", "b", 0, [100] * 2)], 100,
     {"fifo": ["z", "z", "u", "u"], "fair": ["u", "u", "z", "z"]}),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("name", "requests", "budget", "expected"), ORDERS, ids=[o[0] for o in ORDERS])
def test_batch_order(policy: Policy, name: str, requests: list[tuple[str, str, int, list[int]]], budget: int,
                     expected: dict[str, list[str]]) -> None:
    queue = make_queue(policy, budget, 64)
    for label, tenant, priority, costs in requests:
        queue.append(entries(costs, Owner(label=label)), tenant=tenant, priority=priority)
    assert [labels(b) for b in drain(queue)] == expected[policy]


def test_a_call_arriving_during_a_flood_runs_in_the_next_batch() -> None:
    """The quiet tenant arrives while the flood is being served: it is the next batch's head."""
    queue = FairQueue(max_batch_tokens=300, max_batch_size=64)
    queue.append(entries([300] * 50, Owner(label="F")), tenant="flood")
    for _ in range(10):
        queue.next_batch()
    queue.append(entries([5], Owner(label="q")), tenant="quiet")
    assert labels(queue.next_batch()) == "q"


def test_a_short_call_runs_without_rows_that_are_not_yet_due() -> None:
    """The flood's rows would fit the budget beside the quiet tenant's row, but they are not
    due yet: they would make the quiet call's own batch as slow as a full one."""
    queue = FairQueue(max_batch_tokens=256, max_batch_size=64)
    queue.append(entries([128] * 8, Owner(label="F")), tenant="flood")
    assert labels(queue.next_batch()) == "FF"
    queue.append(entries([40], Owner(label="q")), tenant="quiet")
    assert labels(queue.next_batch()) == "q"
    assert labels(queue.next_batch()) == "FF"


def test_rows_not_yet_due_still_fill_a_batch_at_the_heads_width() -> None:
    """Shorter rows of another tenant cost the head's batch nothing in width: they may fill it
    (keeping batches full) while within one budget of their fair turn."""
    queue = FairQueue(max_batch_tokens=400, max_batch_size=4)
    queue.append(entries([50] * 20, Owner(label="f")), tenant="flood")
    assert labels(queue.next_batch()) == "ffff"
    queue.append(entries([100], Owner(label="q")), tenant="quiet")
    assert labels(queue.next_batch()) == "fffq"  # 4 rows x 100 wide: the quiet row's own width


def test_an_idle_tenant_banks_no_credit() -> None:
    """A tenant that was away gets its share from its return on, not the tokens it missed."""
    queue = FairQueue(max_batch_tokens=100, max_batch_size=64)
    queue.append(entries([100] * 30, Owner(label="a")), tenant="a")
    for _ in range(20):
        queue.next_batch()
    queue.append(entries([100] * 10, Owner(label="b")), tenant="b")
    assert [labels(queue.next_batch()) for _ in range(6)] == ["b", "a", "b", "a", "b", "a"]


@pytest.mark.parametrize("seed", range(4))
def test_backlogged_tenants_stay_within_two_batches_of_each_other(seed: int) -> None:
    """Two tenants with work queued throughout: the tokens charged to them never differ by more
    than two batches' budget, whatever the row lengths."""
    rng = random.Random(seed)
    budget = 512
    queue = FairQueue(budget, 16)
    served = {"a": 0, "b": 0}
    tenant_of: dict[int, str] = {}
    for tenant in served:
        for _ in range(40):
            owner = Owner()
            tenant_of[id(owner)] = tenant
            queue.append(entries([rng.randint(10, 200) for _ in range(rng.randint(1, 8))], owner), tenant=tenant)
    while all(any(t == name for t in tenant_of.values()) for name in served):
        batch = queue.next_batch()
        padded = max(e.cost for e in batch)
        for entry in batch:
            served[tenant_of[id(entry.owner)]] += padded
        assert abs(served["a"] - served["b"]) <= 2 * budget
        live = {id(e.owner) for cls in queue._classes.values() for t in cls.tenants.values()  # noqa: SLF001
                for f in t.flows.values() for e in f.entries}
        tenant_of = {k: v for k, v in tenant_of.items() if k in live}


def test_a_worse_class_is_served_within_share_every_batches_once_oldest() -> None:
    """A steady stream of priority-0 work cannot starve a priority-9 request that waits."""
    queue = FairQueue(max_batch_tokens=100, max_batch_size=64, share_every=4)
    low = Owner(label="z")
    queue.append(entries([100], low), tenant="batch-job", priority=9)
    waited = 0
    while True:
        queue.append(entries([100], Owner(label="u")), tenant="online", priority=0)
        if labels(queue.next_batch()) == "z":
            break
        waited += 1
        assert waited < 4, "the worse class was starved"
    assert waited == 3  # and priority did hold for the batches before


def test_a_worse_class_only_fills_spare_room() -> None:
    queue = FairQueue(max_batch_tokens=300, max_batch_size=64)
    queue.append(entries([50, 50], Owner(label="z")), tenant="a", priority=5)
    queue.append(entries([100, 100], Owner(label="u")), tenant="b", priority=0)
    assert labels(queue.next_batch()) == "uuz"  # 3 * 100 fits; the closer length of z waits its tier


# -- the time budget -------------------------------------------------------------------------
def per_row_and_token(ms_per_row: float, ms_per_token: float) -> CostModel:
    """A cost model fitted to a device that takes exactly this long."""
    model = CostModel()
    for shape in (Shape.of([(t, t)] * r) for t in (10, 100, 1000) for r in (1, 2, 5)):
        model.calibrate(shape, ms_per_row * shape.rows + ms_per_token * shape.tokens)
    return model


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("costs", "max_batch_ms", "expected_batches"),
    [
        ([100] * 6, 250, [[100, 100]] * 3),  # 2 rows x 110 ms fit 250 ms, 3 do not
        ([100] * 6, 0, [[100] * 6]),  # 0: tokens only, as before the time budget
        ([1000, 100, 100], 250, [[1000], [100, 100]]),  # a head over the budget runs alone
        ([100, 10, 10, 10], 140, [[100, 10], [10, 10]]),  # what is left of the budget takes short rows
    ],
)
def test_a_batch_costs_at_most_the_time_budget(policy: Policy, costs: list[int], max_batch_ms: float,
                                              expected_batches: list[list[int]]) -> None:
    cost = per_row_and_token(10.0, 1.0)
    queue = make_queue(policy, 100_000, 64, time=TimeBudget(max_batch_ms, cost) if max_batch_ms else None)
    queue.append(entries(costs))
    batches = drain(queue)
    assert [sorted(e.cost for e in b) for b in batches] == [sorted(b) for b in expected_batches]
    for batch in batches:  # a row alone may be over; a batch that grew past it never
        assert len(batch) == 1 or max_batch_ms == 0 or cost.estimate_ms(shape_of(batch)) <= max_batch_ms + 1e-6


def test_an_unfitted_cost_model_leaves_the_token_budget_alone() -> None:
    queue = FairQueue(max_batch_tokens=1000, max_batch_size=64, time=TimeBudget(1.0, CostModel()))
    queue.append(entries([100] * 10))
    assert len(queue.next_batch()) == 10


@pytest.mark.parametrize("same_tenant", [False, True])
def test_a_newcomer_waits_for_one_short_batch_not_for_a_token_budget_of_the_flood(same_tenant: bool) -> None:
    """The flood's rows would fill 4,096 tokens (ten rows, ten times the time budget); under the
    time budget its batches are one row each, and the newcomer's row runs in the next one, alone,
    with another tenant or with its own (the same bound between one tenant's calls)."""
    cost = per_row_and_token(50.0, 1.0)  # a 400-token row: 450 ms
    queue = FairQueue(max_batch_tokens=4096, max_batch_size=64, time=TimeBudget(500, cost))
    queue.append(entries([400] * 48, Owner(label="F")), tenant="flood")
    assert labels(queue.next_batch()) == "F"  # the batch in flight
    queue.append(entries([20], Owner(label="q")), tenant="flood" if same_tenant else "quiet")
    batch = queue.next_batch()
    assert labels(batch) == "q" and cost.estimate_ms(shape_of(batch)) <= 500


def test_long_rows_of_one_call_let_others_run_between_them() -> None:
    """Each long row runs alone (over the budget); another call due meanwhile runs between two
    of them, not after the whole call."""
    cost = per_row_and_token(0.0, 1.0)
    queue = FairQueue(max_batch_tokens=100_000, max_batch_size=64, time=TimeBudget(500, cost))
    queue.append(entries([3000] * 4, Owner(label="L")), tenant="a")
    order = [labels(queue.next_batch())]
    queue.append(entries([50], Owner(label="q")), tenant="a")
    order += [labels(b) for b in drain(queue)]
    assert order == ["L", "q", "L", "L", "L"]


def run_pieces(queue: FairQueue | FifoQueue) -> list[str]:
    """Drain as the batcher does: a piece's row advances (its piece becomes prefix) and stays."""
    order = []
    while batch := queue.next_batch():
        order.append("+".join(f"{e.owner.label}{e.piece or e.cost}" for e in batch))  # type: ignore[attr-defined]
        if batch[0].piece:
            batch[0].advance(lead=object())
    return order


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("ms_per_batch", "max_split_tokens", "expected"),
    [
        (0.0, 10_000, ["L88", "L88", "L87", "L87"]),  # 1 ms a token, 100 ms: 4 equal pieces of 100 at most
        (0.0, 349, ["L350"]),  # longer than the runner's cache can hold in pieces: runs whole
        # 50.2 ms a batch: a piece of 50 tokens would be half fixed cost; 5x the fixed cost is 206
        # tokens or more: 4 equal pieces
        (50.2, 10_000, ["L250", "L250", "L250", "L250"]),
        # walked by layer (``pieces_by_layer``), a piece skips the 50.2 ms: 100 ms of tokens fit,
        # and no floor of 5x the fixed cost: 950 tokens in 10 equal pieces
        (50.2, -10_000, ["L95"] * 10),
    ],
)
def test_a_row_over_the_time_budget_runs_in_pieces(policy: Policy, ms_per_batch: float, max_split_tokens: int,
                                                   expected: list[str]) -> None:
    cost = CostModel()
    for shape in (Shape.of([(t, t)] * r) for t in (10, 100, 1000) for r in (1, 2)):
        cost.calibrate(shape, ms_per_batch + 1.0 * shape.tokens)
    by_layer = max_split_tokens < 0  # marked negative above
    queue = make_queue(policy, 100_000, 64, time=TimeBudget(100, cost, abs(max_split_tokens), by_layer))
    length = sum(int(n[1:]) for n in expected)
    queue.append([Entry(list(range(length)), 0, Owner(label="L"), 0)])
    assert run_pieces(queue) == expected
    assert queue.queued_tokens == 0 and len(queue) == 0


def test_others_run_between_the_pieces_of_a_long_row() -> None:
    cost = per_row_and_token(0.0, 1.0)
    queue = FairQueue(max_batch_tokens=100_000, max_batch_size=64, time=TimeBudget(100, cost, 10_000))
    queue.append([Entry(list(range(300)), 0, Owner(label="L"), 0)], tenant="a")
    first = run_pieces_once(queue)
    queue.append(entries([40], Owner(label="q")), tenant="b")
    assert [first, *run_pieces(queue)] == ["L100", "q40", "L100", "L100"]  # 3 pieces of 100 at most


def run_pieces_once(queue: FairQueue) -> str:
    batch = queue.next_batch()
    label = "+".join(f"{e.owner.label}{e.piece or e.cost}" for e in batch)  # type: ignore[attr-defined]
    if batch[0].piece:
        batch[0].advance(lead=object())
    return label


def test_a_cancelled_row_in_pieces_is_dropped_whole() -> None:
    cost = per_row_and_token(0.0, 1.0)
    queue = FairQueue(max_batch_tokens=100_000, max_batch_size=64, time=TimeBudget(100, cost, 10_000))
    owner = Owner(label="L")
    queue.append([Entry(list(range(300)), 0, owner, 0)])
    assert run_pieces_once(queue) == "L100"
    assert queue.queued_tokens == 200 and len(queue) == 1
    owner.cancelled = True
    assert queue.next_batch() == [] and queue.queued_tokens == 0 and len(queue) == 0


def test_without_the_warm_up_ladder_no_row_is_split() -> None:
    """Served batches alone cannot tell a batch's fixed cost: a row over the budget runs whole."""
    cost = CostModel()
    cost.observe(Shape.of([(100, 100)]), 1000.0)
    queue = FairQueue(max_batch_tokens=100_000, max_batch_size=64, time=TimeBudget(100, cost, 10_000))
    queue.append([Entry(list(range(300)), 0, Owner(label="L"), 0)])
    assert run_pieces(queue) == ["L300"]


def test_rows_start_pieces_only_while_the_cache_holds_every_row_in_pieces() -> None:
    """Three tenants' long rows, and a cache that holds 700 tokens of pieces: while A's 300 are
    held, B's 500 would not fit beside them, so B waits (run whole, it would hold every caller
    for 500 ms) and A's pieces go on; C's 300 would fit, but no long row starts pieces while
    B waits, so the cache frees for B, whose pieces go on while C waits in turn."""
    cost = per_row_and_token(0.0, 1.0)
    queue = FairQueue(max_batch_tokens=100_000, max_batch_size=64, time=TimeBudget(100, cost, 700))
    queue.append([Entry(list(range(300)), 0, Owner(label="A"), 0)], tenant="a")
    queue.append([Entry(list(range(500)), 0, Owner(label="B"), 0)], tenant="b")
    queue.append([Entry(list(range(300)), 0, Owner(label="C"), 0)], tenant="c")
    assert run_pieces(queue) == ["A100"] * 3 + ["B100"] * 5 + ["C100"] * 3


def test_a_short_call_runs_while_a_long_row_waits_for_the_cache() -> None:
    """B's long row waits for A's pieces; a short call due meanwhile leads a batch of its own
    instead of waiting behind B's whole row (the stall this rule removes)."""
    cost = per_row_and_token(0.0, 1.0)
    queue = FairQueue(max_batch_tokens=100_000, max_batch_size=64, time=TimeBudget(100, cost, 700))
    queue.append([Entry(list(range(300)), 0, Owner(label="A"), 0)], tenant="a")
    queue.append([Entry(list(range(500)), 0, Owner(label="B"), 0)], tenant="b")
    first = run_pieces_once(queue)
    queue.append(entries([20], Owner(label="q")), tenant="c")
    order = [first, *run_pieces(queue)]
    assert order[:2] == ["A100", "q20"] and "B500" not in order
