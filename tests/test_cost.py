"""The batch cost model (worker/cost.py): a fit, checked against the times it was fed."""

from __future__ import annotations

import pytest

from worker.cost import CostModel, Shape

# (ms a batch, a row, 1k tokens, 1M attention pairs): a 2-core CPU's order, a GPU's order
TRUE = [(5.0, 2.0, 2000.0, 150.0), (3.0, 0.05, 4.0, 0.5)]

LADDER = [Shape.of([(t // r, t // r + 40)] * r) for t in (32, 64, 128, 256, 512, 1024, 2048) for r in (1, 8)]


def true_ms(shape: Shape, coef: tuple[float, ...], padded: bool = False) -> float:
    pairs = shape.rows * shape.longest * shape.widest if padded else shape.pairs
    return coef[0] + coef[1] * shape.rows + coef[2] * shape.tokens / 1e3 + coef[3] * pairs / 1e6


def fitted(coef: tuple[float, ...], padded: bool = False) -> CostModel:
    model = CostModel(padded=padded)
    for shape in LADDER:
        model.calibrate(shape, true_ms(shape, coef, padded))
    return model


def test_an_unfitted_model_bounds_nothing() -> None:
    model = CostModel()
    assert not model.fitted
    assert model.estimate_ms(Shape.of([(5000, 5100)])) == 0.0


@pytest.mark.parametrize("coef", TRUE)
@pytest.mark.parametrize("padded", [False, True])
def test_the_ladder_recovers_the_device_and_predicts_unseen_shapes(coef: tuple[float, ...], padded: bool) -> None:
    model = fitted(coef, padded)
    assert list(model.coefficients().values()) == pytest.approx(coef, rel=1e-3, abs=1e-3)
    unseen = Shape.of([(300, 380), (420, 500), (37, 117)])  # mixed lengths, none on the ladder
    assert model.estimate_ms(unseen) == pytest.approx(true_ms(unseen, coef, padded), rel=1e-3)


def test_padding_is_what_a_padded_kernel_pays() -> None:
    shape = Shape.of([(1000, 1040), (10, 50)])
    rows = fitted(TRUE[0], padded=False).estimate_ms(shape)
    padded = fitted(TRUE[0], padded=True).estimate_ms(shape)
    assert padded > rows  # the short row pays the long one's attention
    assert shape.pairs == 1000 * 1040 + 10 * 50


def test_coefficients_never_go_negative() -> None:
    model = CostModel()
    for tokens in (100, 200, 400, 800):  # fewer tokens slower: a nonsense device
        model.calibrate(Shape.of([(tokens, tokens)]), 1000.0 - tokens)
    assert all(c >= 0 for c in model.coefficients().values())
    assert model.estimate_ms(Shape.of([(10_000, 10_000)])) >= 0


def test_served_batches_follow_a_device_that_slowed_down() -> None:
    model = fitted(TRUE[0])
    shape = Shape.of([(400, 480)] * 3)
    before = model.estimate_ms(shape)
    for _ in range(64):  # the machine now takes twice as long for this shape
        model.observe(shape, 2 * true_ms(shape, TRUE[0]))
    assert model.estimate_ms(shape) == pytest.approx(2 * before, rel=0.05)


def test_one_stall_moves_the_estimate_a_bounded_step() -> None:
    model = fitted(TRUE[0])
    shape = Shape.of([(400, 480)])
    before = model.estimate_ms(shape)
    model.observe(shape, 1000 * before)  # a recompile, a page-in: counted as 4x at most
    assert before < model.estimate_ms(shape) < 4 * before
