"""What a batch will cost in milliseconds, before it runs: the time budget's yardstick.

A caller that arrives while a batch runs waits for it, so what bounds latency under
contention is a batch's run time, not its token count: thousands of padded tokens take tens
of seconds on two CPU cores and milliseconds on a GPU. ``CostModel`` predicts a batch's run
time from its ``Shape`` as a non-negative linear function

    ms = c0 + c1 * rows + c2 * tokens + c3 * pairs

``tokens`` are what the rows compute (packed: every matrix product is linear in them),
``pairs`` the (query, key) pairs their attention computes (a row's own tokens against its
whole prompt, prefix included; with padded attention, every row as long as the longest), and
``rows`` and the constant the per-row and per-batch overheads (kernel launches, Python).

The coefficients are fitted, never baked in: ``observe`` records a measured batch and refits
over the calibration points (the batcher measures a ladder of shapes at warm-up, on the
device at hand) plus the most recent ``memory`` batches served (each weighing four warm-up
points), so the fit follows the
machine as it runs (other load, a clock change) while the warm-up points keep the directions
that serving alone cannot tell apart (one flood's batches all of one shape) where they were.
Plain arithmetic: no torch, no clock, no I/O; the batcher owns the only instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

# features scaled to be of order one for an ordinary batch, so the small ridge that keeps the
# normal equations solvable weighs each alike
_SCALE = (1.0, 8.0, 1024.0, 1024.0 * 1024.0)
_RIDGE = 1e-6
_OUTLIER = 4.0  # a batch measured this many times its estimate counts as this many (a stall, a recompile)
_SERVED_WEIGHT = 4.0  # a served batch against a warm-up one: the device now outweighs the device then


_Point = tuple[tuple[float, ...], float, float]  # features, measured ms, weight


@dataclass(frozen=True, slots=True)
class Shape:
    """A batch as the cost model sees it; ``plus`` grows it by one row."""

    rows: int = 0
    tokens: int = 0  # rows' own tokens: what the matrix products run
    pairs: int = 0  # sum over rows of own tokens * whole prompt (causal attention's work)
    longest: int = 0  # longest row's own tokens
    widest: int = 0  # longest row's whole prompt

    def plus(self, own: int, whole: int) -> Shape:
        return Shape(self.rows + 1, self.tokens + own, self.pairs + own * whole,
                     max(self.longest, own), max(self.widest, whole))

    @classmethod
    def of(cls, rows: Iterable[tuple[int, int]]) -> Shape:
        """The shape of rows given as (own tokens, whole prompt)."""
        shape = cls()
        for own, whole in rows:
            shape = shape.plus(own, whole)
        return shape


class CostModel:
    """A running non-negative least-squares fit of batch time on a batch's shape."""

    def __init__(self, padded: bool = False, memory: int = 64) -> None:
        self.padded = padded  # attention pads every row to the longest (the GPU's default kernel)
        self._calibration: list[_Point] = []
        self._recent: deque[_Point] = deque(maxlen=memory)
        self._coef: tuple[float, ...] | None = None
        self._warm: tuple[float, ...] | None = None  # the warm-up ladder's fit alone

    @property
    def fitted(self) -> bool:
        return self._coef is not None

    @property
    def calibrated(self) -> bool:
        """Whether the warm-up ladder ran: without it a batch's fixed cost is not known."""
        return self._warm is not None

    def features(self, shape: Shape) -> tuple[float, ...]:
        pairs = shape.rows * shape.longest * shape.widest if self.padded else shape.pairs
        raw = (1.0, shape.rows, shape.tokens, pairs)
        return tuple(x / s for x, s in zip(raw, _SCALE))

    def estimate_ms(self, shape: Shape, *, at_warmup: bool = False) -> float:
        """The predicted run time; 0 before any batch was measured (no time bound yet).
        ``at_warmup``: by the warm-up ladder alone, whose shapes span the device's range (served
        batches, all of a few shapes, cannot tell a batch's fixed cost from its tokens' as well)."""
        coef = self._warm if at_warmup else self._coef
        if coef is None or not shape.rows:
            return 0.0
        return sum(c * x for c, x in zip(coef, self.features(shape)))

    def calibrate(self, shape: Shape, ms: float) -> None:
        """A warm-up measurement: kept for good, so serving's one shape cannot drag the rest."""
        self._calibration.append((self.features(shape), ms, 1.0))
        self._warm = _nnls(self._calibration)
        self._refit()

    def observe(self, shape: Shape, ms: float) -> None:
        """A served batch's measured time; a stall far past the estimate counts as a bounded one."""
        if self._coef is not None:
            ms = min(ms, _OUTLIER * self.estimate_ms(shape) + 1.0)
        self._recent.append((self.features(shape), ms, _SERVED_WEIGHT))
        self._refit()

    def coefficients(self) -> dict[str, float]:
        """The fit in readable units: ms per batch, per row, per 1k tokens, per 1M pairs."""
        c = self._coef or (0.0,) * 4
        return {"batch": c[0], "row": c[1] / _SCALE[1], "kilotoken": 1e3 * c[2] / _SCALE[2],
                "megapair": 1e6 * c[3] / _SCALE[3]}

    def _refit(self) -> None:
        points = [*self._calibration, *self._recent]
        if points:
            self._coef = _nnls(points)


def _nnls(points: list[_Point]) -> tuple[float, ...]:
    """Least squares with every coefficient >= 0, by active set: solve on the free features,
    pin the most negative one to zero, repeat (four features: at most four solves)."""
    n = len(points[0][0])
    free = list(range(n))
    while True:
        coef = _solve([([x[i] for i in free], y, w) for x, y, w in points])
        worst = min(range(len(free)), key=lambda k: coef[k])
        if coef[worst] >= 0 or len(free) == 1:
            full = [0.0] * n
            for k, i in enumerate(free):
                full[i] = max(0.0, coef[k])
            return tuple(full)
        del free[worst]


def _solve(points: list[tuple[list[float], float, float]]) -> list[float]:
    """The weighted, ridge-regularised normal equations, by Gaussian elimination with partial
    pivoting."""
    n = len(points[0][0])
    a = [[sum(w * x[i] * x[j] for x, _, w in points) + (_RIDGE if i == j else 0.0) for j in range(n)]
         + [sum(w * x[i] * y for x, y, w in points)] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [v - f * p for v, p in zip(a[r], a[col])]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out
