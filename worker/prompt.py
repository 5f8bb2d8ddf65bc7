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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.types import InvalidInput, Prefix, Runner, Truncation

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

    sequences: list[list[int]]  # full prefix + body + suffix ids, one per document
    shared_len: int  # leading ids every sequence shares (prefix + query head)
    truncated: list[bool]


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
              truncation: Truncation, max_document_tokens: int | None = None) -> Prompts:
        """``truncation`` decides what a pair over ``max_length`` does; ``max_document_tokens``
        is a cut the caller asked for, so it applies whatever ``truncation`` says."""
        head = self._encode([format_head(query, instruction)])[0]
        fixed = len(self.prefix_ids) + len(self.suffix_ids)
        if fixed + len(head) + 1 > self.max_length:
            raise InvalidInput(
                f"query and instruction take {len(head) + fixed} tokens with the template; "
                f"max_length is {self.max_length}: shorten the query or instruction")
        bodies = self._encode([format_body(query, d, instruction) for d in documents])
        budget = self.max_length - fixed
        sequences, truncated = [], []
        shared = len(head)
        for i, body in enumerate(bodies):
            own = _common_prefix_len(head, body)
            limit = len(body) if max_document_tokens is None else own + max_document_tokens
            asked = len(body) > limit
            body = body[:limit]
            cut = len(body) > budget
            if cut and truncation is Truncation.NONE:
                raise InvalidInput(
                    f"document {i} needs {len(body) + fixed} tokens, over max_length "
                    f"{self.max_length}; shorten it or allow truncation")
            body = body[:budget]
            shared = min(shared, own, len(body))
            cut = cut or asked
            sequences.append(self.prefix_ids + body + self.suffix_ids)
            truncated.append(cut)
        return Prompts(sequences, len(self.prefix_ids) + shared, truncated)

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
