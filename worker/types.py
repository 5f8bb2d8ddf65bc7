"""Values and errors shared by the queue, the batcher and the runner (and ``PromptOptions``).

Nothing here imports torch, grpc or HTTP: the service layer maps these errors to status
codes in one table, and tests can build every value by hand.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Attention(enum.StrEnum):
    """How the runner lays out attention (worker/attention.py)."""

    PADDED = "padded"  # masked SDPA over padded rows; every device
    VARLEN = "varlen"  # FlashAttention's variable-length kernel: CUDA, 16-bit only
    ROWS = "rows"  # the CPU flash kernel row by row, prefixes merged by log-sum-exp: CPU only

    @classmethod
    def for_device(cls, device: str) -> Attention:
        """The default: no padding on the CPU (rows), masked padded rows on a GPU."""
        return cls.ROWS if device == "cpu" else cls.PADDED


class DType(enum.StrEnum):
    """The weights' and activations' floating-point type; ``bf16``-style short names parse too."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @classmethod
    def _missing_(cls, value: object) -> DType | None:
        return {"fp32": cls.FLOAT32, "bf16": cls.BFLOAT16, "fp16": cls.FLOAT16}.get(str(value).lower())


class Device(enum.StrEnum):
    """The kind of device the model runs on (its index, if any, is the runner's business)."""

    CPU = "cpu"
    CUDA = "cuda"


class Precision(enum.StrEnum):
    """``--dtype``: a ``DType``, ``auto`` (bfloat16 on cuda, on a CPU worker/precision.py's choice), or a CPU
    split mode: fp32 activations in bf16 parts on the bf16 matrix units (worker/precision.py)."""

    AUTO = "auto"
    FLOAT32, BFLOAT16, FLOAT16 = DType.FLOAT32.value, DType.BFLOAT16.value, DType.FLOAT16.value
    EXACT_BF16X2 = "exact-bf16x2"
    EXACT_BF16X3 = "exact-bf16x3"

    @classmethod
    def _missing_(cls, value: object) -> Precision | None:
        dtype = DType._missing_(value)
        return None if dtype is None else cls(dtype.value)


class Truncation(enum.Enum):
    """What to do with a document too long for its chunks (``max_chunks`` pairs of ``max_length``)."""

    END = "end"  # drop the document's tail past its last chunk; the query and instruction stay whole
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


MAX_DOCUMENT_TOKENS = 2**31 - 1  # max_tokens_per_doc is an int32 on the wire


@dataclass(frozen=True, slots=True)
class PromptOptions:
    """What a query asks done with a long document, declared, checked (``problem``) and applied
    (``windows``, to each document's own ids: worker/prompt.py) here alone; every layer between a
    wire format and the builder carries it whole. A new option is None where not asked for."""

    truncation: Truncation = Truncation.END
    max_document_tokens: int | None = None  # Cohere's max_tokens_per_doc: a cut, before chunking
    max_chunks: int | None = None  # Cohere's max_chunks_per_doc; None: the server's (the core sets it), else 1

    def problem(self) -> str | None:
        """What is wrong with the options as asked, in the wire's words; None: nothing."""
        if self.max_document_tokens is not None and not 1 <= self.max_document_tokens <= MAX_DOCUMENT_TOKENS:
            return (f"max_tokens_per_doc must be 1-{MAX_DOCUMENT_TOKENS} (or absent for no cut), "
                    f"got {self.max_document_tokens}")
        if self.max_chunks is not None and self.max_chunks < 1:
            return ("max_chunks_per_doc must be at least 1 (1: no chunking; absent: the server's default; more "
                    f"than the server's limit is clamped to it), got {self.max_chunks}")
        return None

    def windows(self, i: int, tokens: list[int], beside: int, max_length: int) -> tuple[list[list[int]], bool]:
        """Document ``i``'s own ``tokens`` in the windows its rows hold beside ``beside`` ids of
        template and head, and whether any were dropped: cut, or past ``max_chunks`` (NONE: refused)."""
        kept, most, room = tokens[:self.max_document_tokens], self.max_chunks or 1, max_length - beside
        windows = [kept[k: k + room] for k in range(0, max(1, len(kept)), room)]
        if len(windows) > most and self.truncation is Truncation.NONE:
            over = (f"over max_length {max_length}; shorten it" if most == 1 else
                    f"more than {most} chunks of max_length {max_length} hold; shorten it, allow more chunks")
            raise InvalidInput(f"document {i} needs {beside + len(kept)} tokens, {over} or allow truncation")
        return windows[:most], len(windows) > most or len(kept) < len(tokens)

    def most_tokens(self, own: int, beside: int, max_length: int) -> int:
        """At most the ids of ``windows``' rows for at most ``own`` tokens beside at most ``beside``:
        each row repeats those, holds at least ``max_length - beside`` of its own (the last may hold
        fewer) and no more than ``max_length`` in all."""
        own = min(own, self.max_document_tokens or own)
        rows = min(self.max_chunks or 1, max(1, -(-own // max(1, max_length - beside))))
        return min(rows * max_length, rows * beside + own)


class Watcher(Protocol):
    """Hears one request's steps in the batcher, for tracing (``service/tracing.py`` makes
    spans of them; the worker knows nothing else of it). Times are ``time.perf_counter()``
    seconds; called on the event loop, and must not raise."""

    def tokenized(self, started: float, ended: float) -> None: ...
    def batched(self, started: float) -> None:
        """A model batch holding rows of the request started (told once for each such row: the
        first time ends the request's queue wait)."""


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    query: str
    documents: Sequence[str]
    instruction: str | None = None  # None: the model's default instruction
    options: PromptOptions = PromptOptions()  # how its documents become prompts (max_chunks None: 1)
    tenant: str = ""  # who the work is for (the API key id): the scheduler shares by tenant
    priority: int = 0  # lower runs first; see worker/queue.py for the starvation bound
    watcher: Watcher | None = None  # told of its steps (tracing); None: nobody asks


@dataclass(frozen=True, slots=True)
class DocScore:
    index: int  # position in the request's documents
    score: float  # P(yes) = sigmoid(logit)
    logit: float  # raw log-odds: logit_yes - logit_no
    truncated: bool  # tokens were dropped: past max_length (after ``chunks`` windows), or asked for
    chunks: int = 1  # the pairs the document was scored as; its score is the best one's
    best_chunk: int = 0  # which of them (0-based, the first of equals); 0: the document's start


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Scores in input order (``scores[i].index == i``)."""

    scores: list[DocScore]
    prompt_tokens: int  # sum of the pairs' prompt lengths: what a naive loop would compute
    computed_tokens: int = 0  # tokens this request made the model run (shared prefix once)
    queue_and_model_ms: float = 0.0  # from the request's arrival in the queue to its last row scored


@dataclass(frozen=True, eq=False, slots=True)
class Prefix:
    """Leading ids that several rows share, computed once and cached by the runner.

    Identity is the key: the batcher makes one per request (and the prompt builder one for
    the template's system prompt, shared by every request), so a prefix is found again by
    the object its rows carry, never by comparing or hashing ids."""

    ids: list[int]
    base: Prefix | None = None  # a prefix these ids start with: computed first, and only the rest on top
    # a row's own leading piece (worker/queue.py splits a row over the time budget across
    # batches): the runner's handle on the row's walk (never cached), used once, by the row's
    # next piece or the row itself
    transient: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    ids: list[int]  # the document's full prompt
    prefix: int = -1  # index into ``Batch.prefixes``; -1: no prefix, every id is computed


@dataclass(frozen=True, slots=True)
class Batch:
    """What the runner scores in one forward pass: rows, and each distinct prefix once."""

    rows: Sequence[Row]
    prefixes: Sequence[Prefix] = ()
    # a row's ids, where the batch runs only its leading piece (``prefixes[0]``, transient: the
    # row's ids so far) and scores nothing; the row's last batch holds it as a row on its piece
    piece: Sequence[int] = ()

    def prefix_len(self, row: Row) -> int:
        return 0 if row.prefix < 0 else len(self.prefixes[row.prefix].ids)


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    model: str
    max_length: int  # tokens in one prompt
    dtype: DType
    device: Device
    attention: Attention
    # the tokens of rows split across batches the runner holds at once: a row over the time
    # budget may run in pieces while the rows in pieces, it included, fit (0: never split)
    max_split_tokens: int = 0
    # pieces run layer by layer (worker/qwen3.py ``walk``): a piece pays no batch's fixed cost
    pieces_by_layer: bool = False


@dataclass(frozen=True, slots=True)
class BatchScores:
    logits: list[float]  # logit_yes - logit_no per row, in the batch's order
    computed: list[int]  # tokens each row made the model run (a new prefix counts once)
    # the attention's padded size: rows * longest row of new (non-prefix) tokens, or the rows'
    # own tokens where the attention pads nothing (rows, varlen)
    padded_tokens: int
    prefill_tokens: int = 0  # of ``computed``, the tokens of shared prefixes computed in this batch


class Runner(Protocol):
    """The seam between the batcher and a model (``worker.runner.ModelRunner``);
    ``worker.fake.FakeRunner`` fakes it for tests of everything above. Data in, data out:
    the runner is handed whole batches and never calls back into the batcher."""

    def score(self, batch: Batch) -> BatchScores: ...
    def warmup(self) -> None: ...
    def info(self) -> RunnerInfo: ...
