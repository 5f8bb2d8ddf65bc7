"""Prompt building against the model card's construction, with the real Qwen3 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, PromptBuilder, format_body
from worker.types import InvalidInput, Truncation


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
    prompts = builder.build("capital of France?", DOCS, instruction, Truncation.END)
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
    prompts = builder.build("what is BPE", DOCS, None, Truncation.END)
    n = prompts.shared_len
    assert n > len(builder.prefix_ids) + 10  # the query and instruction are in it
    assert len({tuple(s[:n]) for s in prompts.sequences}) == 1
    assert all(len(s) > n for s in prompts.sequences)


def test_long_document_loses_its_tail_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 128)
    query = "which document mentions rivers"
    prompts = builder.build(query, ["short one", "river " * 500], None, Truncation.END)
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
        builder.build("q", ["fine", "word " * 500], None, Truncation.NONE)


def test_query_that_cannot_fit_is_an_error(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, 128)
    with pytest.raises(InvalidInput, match="shorten the query"):
        builder.build("very long query " * 100, ["doc"], None, Truncation.END)


@pytest.mark.parametrize("truncation", list(Truncation))
def test_max_document_tokens_cuts_the_document_only(tokenizer, truncation) -> None:  # type: ignore[no-untyped-def]
    """Cohere's max_tokens_per_doc: the document keeps its first n tokens, the query stays whole,
    and the cut applies even with truncation 'none' (the caller asked for it)."""
    builder = PromptBuilder(tokenizer, 8192)
    query = "which document mentions rivers"
    prompts = builder.build(query, ["river " * 50, "short"], None, truncation, 5)
    long_, short = prompts.sequences
    assert prompts.truncated == [True, False]
    head = len(builder.prefix_ids) + len(encode(tokenizer, format_body(query, "")[:-1]))
    assert tokenizer.decode(long_[head: -len(builder.suffix_ids)]) == " river" * 5
    # the same ids as sending the cut document itself: scores will match too
    assert long_ == builder.build(query, ["river river river river river"], None, truncation).sequences[0]
    assert short == builder.build(query, ["short"], None, truncation).sequences[0]
    assert long_[: prompts.shared_len] == short[: prompts.shared_len]
