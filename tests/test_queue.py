"""The token-budget queue, table-driven: budget, fairness, bucketing, cancellation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from worker.queue import Entry, TokenBudgetQueue


@dataclass(eq=False)
class Owner:
    cancelled: bool = False


def entries(costs: list[int], owner: Owner | None = None) -> list[Entry]:
    owner = owner or Owner()
    return [Entry(list(range(c)), 0, owner, i) for i, c in enumerate(costs)]


@pytest.mark.parametrize(
    ("costs", "budget", "max_size", "expected_first_batch"),
    [
        ([10, 10, 10, 10], 40, 64, [10, 10, 10, 10]),  # exactly the budget
        ([10, 10, 10, 10, 10], 40, 64, [10, 10, 10, 10]),  # one over: left for later
        ([10, 10, 10, 10], 1000, 2, [10, 10]),  # row cap
        ([100, 10, 10], 150, 64, [100]),  # padded cost: 100*2 > 150 although 120 < 150
        ([500, 10], 100, 64, [500]),  # larger than the budget: served alone, not starved
        ([50, 10, 48, 12, 51], 150, 64, [50, 48, 12]),  # close lengths first, older first; 12 still fits
        ([10, 50, 11, 49, 12], 40, 64, [10, 11, 12]),  # ... in both directions
    ],
)
def test_batch_respects_padded_budget(costs: list[int], budget: int, max_size: int,
                                      expected_first_batch: list[int]) -> None:
    queue = TokenBudgetQueue(budget, max_size)
    queue.append(entries(costs))
    batch = queue.next_batch()
    assert sorted(e.cost for e in batch) == sorted(expected_first_batch)
    assert batch[0].index == 0  # the oldest entry always runs
    if len(batch) > 1:
        assert max(e.cost for e in batch) * len(batch) <= budget


def test_similar_lengths_are_served_in_arrival_order() -> None:
    """Many requests of similar documents: the first ones finish first, not all at the end."""
    owners = [Owner() for _ in range(6)]
    queue = TokenBudgetQueue(max_batch_tokens=8 * 64, max_batch_size=8)
    for n, owner in enumerate(owners):
        queue.append(entries([60 + (n + i) % 4 for i in range(4)], owner))
    first, second, third = (queue.next_batch() for _ in range(3))
    assert {e.owner for e in first} == {owners[0], owners[1]}
    assert {e.owner for e in second} == {owners[2], owners[3]}
    assert {e.owner for e in third} == {owners[4], owners[5]}


def test_every_entry_is_served_once_in_bounded_batches() -> None:
    costs = [7, 300, 12, 12, 90, 5, 64, 64, 1, 250, 33]
    queue = TokenBudgetQueue(256, 4)
    queue.append(entries(costs))
    served: list[int] = []
    while len(queue):
        batch = queue.next_batch()
        assert batch, "a live queue must yield a batch"
        assert len(batch) <= 4
        assert len(batch) == 1 or max(e.cost for e in batch) * len(batch) <= 256
        served += [e.index for e in batch]
    assert sorted(served) == list(range(len(costs)))
    assert queue.queued_tokens == 0


def test_old_long_entry_is_not_overtaken_forever_by_new_short_ones() -> None:
    queue = TokenBudgetQueue(100, 64)
    old = entries([90])
    queue.append(entries([10, 10]) + old)
    rounds = 0
    while old[0] in [*queue._entries]:  # noqa: SLF001 - white-box check of the order
        queue.next_batch()
        queue.append(entries([10] * 5))  # a steady stream of new short work
        rounds += 1
        assert rounds <= 3, "the long entry was starved"


def test_cancelled_entries_are_dropped_not_returned() -> None:
    gone, live = Owner(), Owner()
    queue = TokenBudgetQueue(1000, 64)
    queue.append(entries([5, 5, 5], gone) + entries([6, 6], live))
    gone.cancelled = True
    batch = queue.next_batch()
    assert [e.owner for e in batch] == [live, live]
    assert queue.next_batch() == []
    assert queue.queued_tokens == 0


def test_drop_cancelled_frees_capacity() -> None:
    gone = Owner()
    queue = TokenBudgetQueue(1000, 64)
    queue.append(entries([5, 5], gone) + entries([3]))
    gone.cancelled = True
    assert queue.drop_cancelled() == 2
    assert len(queue) == 1 and queue.queued_tokens == 3


def test_window_limits_lookahead_and_keeps_order() -> None:
    queue = TokenBudgetQueue(1000, 64, window=2)
    queue.append(entries([10, 50, 10]))
    assert [e.index for e in queue.next_batch()] == [0, 1]  # index 2 is outside the window
    assert [e.index for e in queue.next_batch()] == [2]


def test_prefix_reuse_lowers_cost() -> None:
    entry = Entry(list(range(100)), 80, Owner(), 0)
    assert entry.cost == 20


def test_long_shared_prefix_bounds_attention_width() -> None:
    owner = Owner()
    rows = [Entry(list(range(1000)), 980, owner, i) for i in range(10)]  # cost 20, width 1000
    queue = TokenBudgetQueue(max_batch_tokens=1000, max_batch_size=64, max_attention_tokens=4000)
    queue.append(rows)
    assert [len(queue.next_batch()) for _ in range(3)] == [4, 4, 2]  # 20 * 10 would fit the budget


@pytest.mark.parametrize("args", [(0, 1), (1, 0), (1, 1, 0)])
def test_rejects_nonsense_config(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        TokenBudgetQueue(*args)
