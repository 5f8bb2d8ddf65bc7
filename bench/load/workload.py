"""What the load clients send: deterministic queries and documents, one key per request."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

_WORDS = (
    "cache latency token batch model query document score rank search index vector shard "
    "replica ledger billing retry timeout deadline queue padding prefix attention layer "
    "kernel memory bandwidth throughput request response server client stream channel "
    "health ready drain signal graceful shutdown restart crash database record commit"
).split()


@dataclass(frozen=True, slots=True)
class LogicalRequest:
    """One request a user wants scored; every attempt at it sends exactly this."""

    key: str  # idempotency key: gRPC request_id, HTTP Idempotency-Key
    query: str
    documents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Workload:
    documents: int = 8  # per request
    words_per_document: int = 24
    words_per_query: int = 6
    seed: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # keys unique per run

    def make(self, n: int) -> LogicalRequest:
        """The ``n``-th request of this workload: same text for the same seed, own key."""
        rng = random.Random(f"{self.seed}:{n}")
        query = " ".join(rng.choices(_WORDS, k=self.words_per_query)) + f" #{n}"
        docs = tuple(" ".join(rng.choices(_WORDS, k=self.words_per_document))
                     for _ in range(self.documents))
        return LogicalRequest(f"load-{self.run_id}-{n}", query, docs)
