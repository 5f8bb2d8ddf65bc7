"""The Qwen3-Reranker prompt, turned into token ids exactly as the model card does.

Each (query, document) pair is ``prefix + body + suffix``; ``prefix`` and ``suffix`` end and
start at special tokens, so tokenizing them apart and concatenating the ids gives the same
ids as tokenizing the whole string (special tokens are split off before BPE runs). The body
is tokenized as one string, as the reference does: the document's first word fuses with the
space after ``<Document>:``, so no token boundary can be assumed between head and document.

Prefix reuse needs a token boundary all of a request's documents share. ``PromptBuilder``
tokenizes the head alone (``...<Document>:``) and takes, per request, the longest run of
leading ids every document's sequence shares with it: exact by construction, whatever the
text, because a causal model's states for the first k tokens depend on those k ids alone.

Over-long pairs lose tokens from the end of the body, which the head guard turns into "from
the document only": the query and instruction are never cut. ``max_document_tokens`` (Cohere's
``max_tokens_per_doc``) cuts the same way, counting the document's own tokens: those of the
body past the run it shares with the head (the document's first word fuses with the space
before it, so that token counts as the document's).

Chunking (``max_chunks`` > 1; Cohere's ``max_chunks_per_doc``): a document over the budget is
not cut but split. Its body is tokenized as above; ``head`` is the run it shares with the head
encoding, and the document's own tokens (after any ``max_document_tokens`` cut) are split into
consecutive, non-overlapping windows of ``W = max_length - len(prefix) - len(suffix) -
len(head)`` tokens. Chunk k is ``prefix + head + window_k + suffix``, so chunk 0 is exactly the
pair that truncation would have scored, and every chunk is a pair of its own, scored exactly.
At most ``max_chunks`` windows are kept; tokens past them are dropped (``truncated``), or with
``Truncation.NONE`` the request is refused. The document's score is its best chunk's
(``worker.batcher``). A window boundary may split a word: each window holds the ids the whole
document tokenized to, never a re-tokenization of a piece of text. ``PromptOptions.windows``
(worker/types.py, where each such option is declared and checked) applies the cut and the chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.types import InvalidInput, Prefix, PromptOptions, Runner

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
YES_TOKEN, NO_TOKEN = "yes", "no"


def format_body(query: str, document: str, instruction: str | None = None) -> str:
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def format_head(query: str, instruction: str | None = None) -> str:
    """The body up to the document, without the space that fuses with its first word."""
    return format_body(query, "", instruction)[:-1]


@dataclass(frozen=True, slots=True)
class Prompts:
    """One request's documents as token ids, ready for the queue."""

    sequences: list[list[int]]  # full prefix + body + suffix ids, one per row (a document's chunks in order)
    shared_len: int  # leading ids every sequence shares (prefix + query head)
    truncated: list[bool]  # per document: tokens were dropped (after the chunk cap, or asked for)
    chunks: list[int]  # rows (chunks) per document, in order: a document's rows are consecutive


class PromptBuilder:
    """Owns the template and the tokenizer; pure and thread-safe (fast tokenizers are)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix_ids: list[int] = self._encode([PREFIX])[0]
        self.system = Prefix(self.prefix_ids)  # the template's system prompt: every request's prefix
        self.suffix_ids: list[int] = self._encode([SUFFIX])[0]
        self.yes_id = self._single_id(YES_TOKEN)
        self.no_id = self._single_id(NO_TOKEN)

    def build(self, query: str, documents: Sequence[str], instruction: str | None,
              options: PromptOptions = PromptOptions()) -> Prompts:
        """``options``: what the query asks done with a document longer than one pair
        (``PromptOptions.windows``: cut, chunked, or refused)."""
        if (problem := options.problem()) is not None:
            raise InvalidInput(problem)
        head = self._encode([format_head(query, instruction)])[0]
        fixed = len(self.prefix_ids) + len(self.suffix_ids)
        if fixed + len(head) + 1 > self.max_length:
            raise InvalidInput(
                f"query and instruction take {len(head) + fixed} tokens with the template; "
                f"max_length is {self.max_length}: shorten the query or instruction")
        bodies = self._encode([format_body(query, d, instruction) for d in documents])
        sequences: list[list[int]] = []
        truncated: list[bool] = []
        chunks: list[int] = []
        shared = len(head)
        for i, body in enumerate(bodies):
            own = _common_prefix_len(head, body)
            windows, dropped = options.windows(i, body[own:], fixed + own, self.max_length)
            shared = min(shared, own, own + len(windows[0]))
            sequences.extend(self.prefix_ids + body[:own] + w + self.suffix_ids for w in windows)
            truncated.append(dropped)
            chunks.append(len(windows))
        return Prompts(sequences, len(self.prefix_ids) + shared, truncated, chunks)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        out = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]]

    def _single_id(self, token: str) -> int:
        ids = self._encode([token])[0]
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits {token!r} into {ids}: not a Qwen3 tokenizer")
        return ids[0]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LoadedModel(Runner, Protocol):
    """What a model loader returns: the runner, and the prompt builder for its tokenizer,
    which the composition root hands to the batcher (the runner never builds prompts)."""

    builder: PromptBuilder
