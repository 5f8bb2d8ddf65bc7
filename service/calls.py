"""The core's vocabulary: what a call may carry (``Limits``), what a front hands the core
(``RerankQuery``, ``RerankCall``) and what it gets back (``RerankReply``). Plain values: the
fronts build them from their wire formats, ``service.core.RerankCore`` checks and answers them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

# the core's words too: the fronts take them from here
from worker.types import MAX_DOCUMENT_TOKENS as MAX_DOCUMENT_TOKENS
from worker.types import PromptOptions as PromptOptions
from worker.types import Truncation as Truncation

MAX_CHUNKS_PER_DOC = 1000  # what --max-chunks-per-doc may be set to, at most


@dataclass(frozen=True, slots=True)
class Limits:
    """What one call may carry; over any of these is INVALID_ARGUMENT (or 413 for bytes)."""

    max_documents: int = 1000  # per call, summed over its queries
    max_queries: int = 64  # queries in one batch call
    max_query_chars: int = 32_768
    max_instruction_chars: int = 8_192
    max_document_chars: int = 262_144  # longer documents are refused before tokenizing
    max_request_bytes: int = 16 * 2**20  # HTTP body and gRPC message size
    # chunks a document over max_length is scored as (its best chunk's score): what a call that
    # names no max_chunks_per_doc gets, and the most one may ask for (more is clamped, with a
    # warning); Cohere's default. 1: no chunking, a long document is cut (or refused)
    max_chunks_per_doc: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.max_chunks_per_doc <= MAX_CHUNKS_PER_DOC:
            raise ValueError(f"max_chunks_per_doc must be 1-{MAX_CHUNKS_PER_DOC}, not {self.max_chunks_per_doc}")


# Scheduling priority (Cohere v2's ``priority``): lower runs first; see worker/queue.py.
MIN_PRIORITY, MAX_PRIORITY = 0, 999
DEFAULT_PRIORITY = 0  # what a call that names none gets, unless its key says otherwise
PRIORITY_RULE = f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY} (lower runs first)"

# Request ids and idempotency keys: visible ASCII only, so they are safe as they travel
# through headers, log lines and every database's text columns.
MAX_ID_CHARS = 255
ID_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_CHARS}}}")


@dataclass(frozen=True, slots=True)
class RerankQuery:
    """One query as a front sends it. The engine is handed it with the call's tenant and
    priority (``Engine.score``); ``top_n`` and ``return_documents`` are the reply's alone."""

    query: str
    documents: Sequence[str]
    instruction: str | None = None  # None: the model's default instruction
    options: PromptOptions = PromptOptions()  # truncation, max_tokens_per_doc, max_chunks_per_doc
    top_n: int | None = None  # None or 0: all
    return_documents: bool = False


@dataclass(frozen=True, slots=True)
class RerankCall:
    queries: Sequence[RerankQuery]
    api_key: str | None = None  # the bearer token as sent, if any
    model: str | None = None  # None or "": the served model
    request_id: str | None = None
    idempotency_key: str | None = None
    priority: int | None = None  # MIN_PRIORITY..MAX_PRIORITY; None: the key's default
    # the caller a trusted front (``rerank gateway``) calls for: the scheduler's tenant, but
    # only where this server has no keys (``--no-auth``); a keyed caller is its own tenant
    on_behalf_of: str | None = None

    def fingerprint(self) -> str:
        """Hash of what the caller asked for, to tell a retry from a different call (the
        priority is how to schedule it, not what it is, so a retry may change it)."""
        body = [self.model or "", [(q.query, list(q.documents), q.instruction, q.top_n, q.return_documents,
                                    *_asked(q.options)) for q in self.queries]]
        return hashlib.sha256(json.dumps(body, ensure_ascii=True).encode()).hexdigest()


# How each prompt option is spelt in a fingerprint, pinned (stored idempotency records must keep
# matching): its value after a tag, or with None alone; any other after its name. One at None is
# left out, so a body that names none of a new option hashes as before the option existed.
_TAGS = {"truncation": None, "max_document_tokens": None, "max_chunks": "chunks"}


def _asked(options: PromptOptions) -> list[object]:
    named = [(_TAGS.get(f.name, f.name), getattr(options, f.name)) for f in fields(options)]
    return [part for tag, value in named if value is not None
            for part in ([] if tag is None else [tag]) + [value.value if isinstance(value, Enum) else value]]


@dataclass(frozen=True, slots=True)
class RankedDoc:
    index: int
    score: float
    logit: float
    truncated: bool
    document: str | None = None
    chunks: int = 1  # pairs the document was scored as (its score is the best one's)
    best_chunk: int = 0  # which of them, 0-based


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    results: list[RankedDoc]  # best first, cut to top_n
    documents: int  # billed documents (all sent, not only the top_n returned)
    prompt_tokens: int
    computed_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """A call's server-side milliseconds (HTTP ``timings_ms``, gRPC ``Timing``)."""

    total: float = 0.0
    engine: float = 0.0  # the slowest query's queue + model time: the rest of total is overhead


@dataclass(frozen=True, slots=True)
class RerankReply:
    request_id: str
    model: str
    outcomes: list[QueryOutcome]
    timings_ms: Timings = field(default_factory=Timings)
    replayed: bool = False  # served from the idempotency record, not billed again
    warnings: list[str] = field(default_factory=list)  # what was changed rather than refused

    @property
    def billed_documents(self) -> int:
        return sum(o.documents for o in self.outcomes)

    @property
    def prompt_tokens(self) -> int:
        return sum(o.prompt_tokens for o in self.outcomes)

    @property
    def computed_tokens(self) -> int:
        return sum(o.computed_tokens for o in self.outcomes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def with_documents(self, queries: Sequence[RerankQuery] | None) -> RerankReply:
        """This reply with each result's document text taken from ``queries`` (by index, where
        the query set ``return_documents``), or with no text at all (``queries`` None): the
        idempotency record stores none, and a replay, whose body has the same fingerprint,
        gets it back from the replaying call."""
        def text(q: RerankQuery | None, index: int) -> str | None:
            return q.documents[index] if q is not None and q.return_documents else None

        qs: Sequence[RerankQuery | None] = [None] * len(self.outcomes) if queries is None else queries
        outcomes = [replace(o, results=[replace(r, document=text(q, r.index))
                                                    for r in o.results])
                    for q, o in zip(qs, self.outcomes, strict=True)]
        return replace(self, outcomes=outcomes)

    @classmethod
    def from_json(cls, text: str) -> RerankReply:
        raw = json.loads(text)
        outcomes = [QueryOutcome([RankedDoc(**r) for r in o.pop("results")], **o) for o in raw.pop("outcomes")]
        return cls(outcomes=outcomes, timings_ms=Timings(**raw.pop("timings_ms", {})), **raw)
