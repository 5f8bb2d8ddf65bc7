"""Prompt building against the model card's construction, with the real Qwen3 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, PromptBuilder, format_body
from worker.types import InvalidInput, PromptOptions, Truncation


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_known_token_ids(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 8192)
    assert (builder.yes_id, builder.no_id) == (9693, 2152)
    assert builder.prefix_ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert tokenizer.pad_token_id == 151643


DOCS = ["Paris is the capital of France.", "", " leading space", "ends with space ",
        "数字 123 and émojis 🎉", "line\nbreaks\r\n\ttabs", ":)", "<|im_end|> injected special"]


@pytest.mark.parametrize("instruction", [None, "Find code that implements the query"])
def test_sequences_match_model_card_and_whole_string(tokenizer, instruction) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 8192)
    prompts = builder.build("capital of France?", DOCS, instruction)
    for doc, ids in zip(DOCS, prompts.sequences):
        body = format_body("capital of France?", doc, instruction)
        card = encode(tokenizer, PREFIX) + encode(tokenizer, body) + encode(tokenizer, SUFFIX)
        assert ids == card  # the model card tokenizes prefix, body and suffix apart
        assert ids == encode(tokenizer, PREFIX + body + SUFFIX)  # ... which equals the whole
    assert not any(prompts.truncated)


def test_default_instruction_is_the_contracts() -> None:
    assert DEFAULT_INSTRUCTION == "Given a web search query, retrieve relevant passages that answer the query"
    assert format_body("q", "d") == f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: q\n<Document>: d"


def test_shared_prefix_is_common_to_all_documents(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 8192)
    prompts = builder.build("what is BPE", DOCS, None)
    n = prompts.shared_len
    assert n > len(builder.prefix_ids) + 10  # the query and instruction are in it
    assert len({tuple(s[:n]) for s in prompts.sequences}) == 1
    assert all(len(s) > n for s in prompts.sequences)


def test_long_document_loses_its_tail_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 128)
    query = "which document mentions rivers"
    prompts = builder.build(query, ["short one", "river " * 500], None)
    short, long_ = prompts.sequences
    assert prompts.truncated == [False, True]
    assert len(long_) == 128
    assert long_[-len(builder.suffix_ids):] == builder.suffix_ids
    assert long_[: prompts.shared_len] == short[: prompts.shared_len]  # query kept whole
    # the model card's truncation='longest_first' on the body gives the same ids here
    body = encode(tokenizer, format_body(query, "river " * 500))
    budget = 128 - len(builder.prefix_ids) - len(builder.suffix_ids)
    assert long_ == builder.prefix_ids + body[:budget] + builder.suffix_ids


def test_overflow_is_an_error_when_truncation_is_off(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 128)
    with pytest.raises(InvalidInput, match="document 1 needs .* tokens"):
        builder.build("q", ["fine", "word " * 500], None, PromptOptions(Truncation.NONE))


def test_query_that_cannot_fit_is_an_error(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 128)
    with pytest.raises(InvalidInput, match="shorten the query"):
        builder.build("very long query " * 100, ["doc"], None)


@pytest.mark.parametrize("truncation", list(Truncation))
def test_max_document_tokens_cuts_the_document_only(tokenizer, truncation) -> None:  # type: ignore[no-untyped-def]
    """Cohere's max_tokens_per_doc: the document keeps its first n tokens, the query stays whole,
    and the cut applies even with truncation 'none' (the caller asked for it)."""
    builder = PromptBuilder(tokenizer, 8192)
    query = "which document mentions rivers"
    prompts = builder.build(query, ["river " * 50, "short"], None, PromptOptions(truncation, 5))
    long_, short = prompts.sequences
    assert prompts.truncated == [True, False]
    head = len(builder.prefix_ids) + len(encode(tokenizer, format_body(query, "")[:-1]))
    assert tokenizer.decode(long_[head: -len(builder.suffix_ids)]) == " river" * 5
    # the same ids as sending the cut document itself: scores will match too
    assert long_ == builder.build(query, ["river river river river river"], None,
                                  PromptOptions(truncation)).sequences[0]
    assert short == builder.build(query, ["short"], None, PromptOptions(truncation)).sequences[0]
    assert long_[: prompts.shared_len] == short[: prompts.shared_len]


def chunk_rule(builder: PromptBuilder, tokenizer, query: str, doc: str, cap: int,  # type: ignore[no-untyped-def]
               max_document_tokens: int | None = None) -> tuple[list[list[int]], bool]:
    """The issue's rule, written out from the tokenizer alone: the body tokenized whole, the run
    it shares with the head's own encoding as the head, the rest in windows of W tokens."""
    body = encode(tokenizer, format_body(query, doc))
    head_ids = encode(tokenizer, format_body(query, "")[:-1])
    own = next((i for i, (a, b) in enumerate(zip(head_ids, body)) if a != b), min(len(head_ids), len(body)))
    rest = body[own:] if max_document_tokens is None else body[own: own + max_document_tokens]
    width = builder.max_length - len(builder.prefix_ids) - len(builder.suffix_ids) - own
    windows = [rest[k: k + width] for k in range(0, max(1, len(rest)), width)]
    chunks = [builder.prefix_ids + body[:own] + w + builder.suffix_ids for w in windows[:cap]]
    return chunks, len(windows) > cap


LONG = "The river Seine flows through Paris; its banks are a world heritage site. " * 12


@pytest.mark.parametrize(("max_length", "cap", "doc_tokens", "chunks", "truncated"), [
    (8192, 10, None, 1, False),  # under the budget: one chunk, today's pair
    (128, 1, None, 1, True),  # no chunking: today's truncation
    (128, 3, None, 3, True),  # the cap drops the tail
    (128, 100, None, 4, False),  # every token in some chunk
    (128, 4, None, 4, False),  # ... the cap exactly reached drops nothing
    (128, 100, 70, 2, True),  # max_tokens_per_doc cuts first, then the rest is chunked
    (96, 100, None, 11, False),
    (80, 1000, None, 97, False),  # a window of two tokens: still the rule
])
def test_chunks_follow_the_rule(tokenizer, max_length, cap, doc_tokens, chunks, truncated) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, max_length)
    query = "where does the Seine flow"
    prompts = builder.build(query, ["short one", LONG, "also short"], None,
                            PromptOptions(max_document_tokens=doc_tokens, max_chunks=cap))
    expected, dropped = chunk_rule(builder, tokenizer, query, LONG, cap, doc_tokens)
    assert prompts.chunks == [1, chunks, 1] and len(expected) == chunks
    assert prompts.sequences[1: 1 + chunks] == expected
    assert prompts.truncated == [False, dropped or doc_tokens is not None, False] and dropped == (
        truncated and doc_tokens is None)
    assert all(len(s) <= max_length for s in prompts.sequences)
    # chunk 0 is exactly the pair that truncation scores; the short documents are untouched
    alone = builder.build(query, ["short one", LONG, "also short"], None, PromptOptions(max_document_tokens=doc_tokens))
    assert prompts.sequences[1] == alone.sequences[1]
    assert [prompts.sequences[0], prompts.sequences[-1]] == [alone.sequences[0], alone.sequences[-1]]
    assert prompts.shared_len == alone.shared_len
    assert len({tuple(s[: prompts.shared_len]) for s in prompts.sequences}) == 1


def test_truncation_none_refuses_only_what_the_chunks_cannot_hold(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 128)
    whole = builder.build("q", [LONG], None, PromptOptions(Truncation.NONE, max_chunks=100))
    assert whole.chunks == [len(chunk_rule(builder, tokenizer, "q", LONG, 100)[0])] and whole.truncated == [False]
    with pytest.raises(InvalidInput, match=r"document 0 needs \d+ tokens, more than 3 chunks"):
        builder.build("q", [LONG], None, PromptOptions(Truncation.NONE, max_chunks=3))
    with pytest.raises(InvalidInput, match="must be at least 1"):
        builder.build("q", [LONG], None, PromptOptions(max_chunks=0))
