"""Values and errors shared by the queue, the batcher and the runner.

Nothing here imports torch, grpc or HTTP: the service layer maps these errors to status
codes in one table, and tests can build every value by hand.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from worker.prompt import PromptBuilder


ATTENTION_KINDS = ("padded", "varlen")  # ``--attention``: see worker/qwen3.py
PRECISIONS = ("auto", "float32", "bfloat16", "exact-bf16x2", "exact-bf16x3")  # ``--precision``: worker/precision.py


class Truncation(enum.Enum):
    """What to do with a document too long for ``max_length``."""

    END = "end"  # cut the document's tail; the query and instruction stay whole
    NONE = "none"  # refuse the request with InvalidInput


class WorkerError(Exception):
    """Base of the errors the worker raises for a caller to map."""


class InvalidInput(WorkerError, ValueError):
    """The request cannot be scored as sent; the message says what to change."""


class Overloaded(WorkerError):
    """The queue is full; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(WorkerError):
    """The worker is draining or stopped and takes no new work."""


class ModelFailure(WorkerError):
    """The model raised while scoring a batch holding this request's documents."""


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    query: str
    documents: Sequence[str]
    instruction: str | None = None  # None: the model's default instruction
    truncation: Truncation = Truncation.END


@dataclass(frozen=True, slots=True)
class DocScore:
    index: int  # position in the request's documents
    score: float  # P(yes) = sigmoid(logit)
    logit: float  # raw log-odds: logit_yes - logit_no
    tokens: int  # length of the pair's full prompt
    truncated: bool


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Scores in input order (``scores[i].index == i``)."""

    scores: list[DocScore]
    prompt_tokens: int  # sum of the pairs' prompt lengths: what a naive loop would compute
    computed_tokens: int = 0  # tokens this request made the model run (shared prefix once)
    timings_ms: dict[str, float] = field(default_factory=dict)


class WorkItem(Protocol):
    """One document of one request, as the runner sees it."""

    @property
    def ids(self) -> list[int]: ...  # full prompt ids
    @property
    def prefix_len(self) -> int: ...  # leading ids to take from the prefix cache; 0: none


@dataclass(frozen=True, slots=True)
class BatchScores:
    logits: list[float]  # logit_yes - logit_no per item, in the batch's order
    computed: list[int]  # tokens each item made the model run (a new prefix counts once)
    padded_tokens: int  # rows * longest row of new (non-prefix) tokens: the attention's padded size
    prefill_tokens: int = 0  # of ``computed``, the tokens of shared prefixes computed in this batch


class Runner(Protocol):
    """The seam between the batcher and a model (``worker.runner.ModelRunner``);
    ``worker.fake.FakeRunner`` fakes it for tests of everything above."""

    builder: PromptBuilder

    def score(self, items: Sequence[WorkItem]) -> BatchScores: ...
    def warmup(self) -> None: ...
    def describe(self) -> dict[str, str]: ...
