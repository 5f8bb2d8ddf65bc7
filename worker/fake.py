"""A fake runner for testing everything above the model: no torch, deterministic, steerable.

``FakeTokenizer`` splits on whitespace and special tokens and hashes words to ids, so the
real ``PromptBuilder`` (template, truncation, prefix sharing, limits) runs unchanged on top
of it. ``FakeRunner.score`` gives each full prompt a fixed log-odds that depends only on its
ids, never on batching, and can be made to block (``gate``) or raise (``fail_next``) so the
batcher and the service can be tested deterministically.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Sequence

from worker.prompt import PromptBuilder
from worker.types import Attention, Batch, BatchScores, Device, DType, RunnerInfo

_SPECIAL = re.compile(r"(<\|[a-z_]+\|>|</?think>)")
_FIXED = {"yes": 9693, "no": 2152}


class FakeTokenizer:
    """Callable like a Hugging Face fast tokenizer, for ``PromptBuilder``'s one use of it."""

    def __call__(self, texts: list[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(t) for t in texts]}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPECIAL.split(text):
            words = [piece] if _SPECIAL.fullmatch(piece) else piece.split()
            ids.extend(_FIXED.get(w, 1000 + zlib.crc32(w.encode()) % 100_000) for w in words)
        return ids


def fake_logit(ids: Sequence[int]) -> float:
    """The fake model's log-odds for a full prompt: stable, spread over about [-5, 5]."""
    return (zlib.crc32(repr(list(ids)).encode()) % 10_000) / 1000 - 5


class FakeRunner:
    def __init__(self, max_length: int = 8192) -> None:
        self.builder = PromptBuilder(FakeTokenizer(), max_length)
        self.batches: list[list[tuple[int, int]]] = []  # (prompt length, prefix_len) per row
        self.gate = threading.Event()  # clear it to make score() block until set
        self.gate.set()
        self.entered = threading.Event()  # set whenever score() starts
        self.fail_next = False
        self.warmed = False

    def score(self, batch: Batch) -> BatchScores:
        self.entered.set()
        self.gate.wait()
        rows = batch.rows
        self.batches.append([(len(row.ids), batch.prefix_len(row)) for row in rows])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected model fault")
        tails = [len(row.ids) - batch.prefix_len(row) for row in rows]
        prefill = sum(len(p.ids) for p in batch.prefixes)  # like the real runner with a cold cache
        computed = list(tails)
        if computed:  # a batch's prefixes count once
            computed[0] += prefill
        return BatchScores([fake_logit(row.ids) for row in rows], computed,
                           len(rows) * max(tails, default=0), prefill_tokens=prefill)

    def warmup(self) -> None:
        self.warmed = True

    def info(self) -> RunnerInfo:
        return RunnerInfo(model="fake", max_length=self.builder.max_length, dtype=DType.FLOAT32,
                          device=Device.CPU, attention=Attention.PADDED, max_split_tokens=self.builder.max_length)
