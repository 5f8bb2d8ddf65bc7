"""Scores equal the contract's reference under every batching, padding and prefix path.

The reference is the scoring contract's: each (query, document) prompt alone through
``Qwen3ForCausalLM``, logits at the last position, softmax over (no, yes). The service's
scorer shares no code with it beyond the checkpoint's weights.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest
import torch

from worker.batcher import Batcher, BatcherConfig, BatchStats
from worker.cost import CostModel, Shape
from worker.runner import ModelRunner
from worker.types import Batch, BatchScores, Prefix, PromptOptions, Row, RunnerInfo, ScoreRequest, Truncation

MAX_LENGTH = 1024
TOL_SCORE = 1e-5
TOL_LOGIT = 1e-4

QUERIES = [
    ("capital of France", None),
    ("¿Cuál es la capital de Francia?", "Given a question in Spanish, retrieve passages that answer it"),
    ("sort a list in python", "Given a programming question, retrieve code that solves it"),
    ("東京の人口", None),
]
DOCUMENTS = [
    "Paris is the capital and most populous city of France.",
    "Bananas are yellow.",
    "",
    " ",
    "París es la capital de Francia.",
    "東京都の人口は約1400万人です。",
    "def sort_list(xs):\n    return sorted(xs)\n",
    "SELECT * FROM cities WHERE country = 'FR' ORDER BY population DESC;",
    "Paris is the capital and most populous city of France.",  # duplicate
    "🙂 emoji-only? 🎉🎉",
    "A long document about rivers. " * 60,  # ~400 tokens
    "Long code:\n" + "for i in range(10):\n    print(i * i)\n" * 40,
]


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> ModelRunner:
    return ModelRunner.load(str(tiny_model_dir), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def varlen_runner(tiny_model_dir: Path) -> ModelRunner:
    """The variable-length attention path, with the kernel's row-by-row stand-in on the CPU
    (FlashAttention itself needs CUDA): the packing, offsets and prefix gathering are what
    is tested here; the kernel is checked against the same stand-in at warm-up on a GPU."""
    from worker.attention import varlen_reference
    from worker.qwen3 import Qwen3Scorer

    varlen = ModelRunner.load(str(tiny_model_dir), max_length=MAX_LENGTH)
    varlen.scorer = Qwen3Scorer(varlen.model, varlen.builder.yes_id, varlen.builder.no_id,
                                attention="varlen", varlen_kernel=varlen_reference)
    return varlen


@pytest.fixture(scope="module")
def padded_runner(tiny_model_dir: Path) -> ModelRunner:
    """Masked SDPA over padded rows: the GPU's default, run here on the CPU's kernels."""
    return ModelRunner.load(str(tiny_model_dir), max_length=MAX_LENGTH, attention="padded")


@pytest.fixture(scope="module", params=["rows", "padded", "varlen"])
def any_runner(request: pytest.FixtureRequest, runner: ModelRunner) -> ModelRunner:
    """Each attention strategy: rows (the CPU's default, ``runner``), padded and varlen."""
    if request.param == "rows":
        assert runner.scorer.attention.kind == "rows"
        return runner
    return request.getfixturevalue(f"{request.param}_runner")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_logit(model: torch.nn.Module, ids: list[int]) -> float:
    logits = model(torch.tensor([ids])).logits[0, -1]
    return float(logits[9693] - logits[2152])


@torch.inference_mode()
def reference_score(model: torch.nn.Module, ids: list[int]) -> float:
    logits = model(torch.tensor([ids])).logits[0, -1, [2152, 9693]]
    return float(torch.softmax(logits, dim=-1)[1])


@pytest.fixture(scope="module")
def expected(runner: ModelRunner, reference_model: torch.nn.Module) -> dict[tuple[int, int], tuple[float, float]]:
    """(query number, document number) -> (reference score, reference log-odds)."""
    out = {}
    for qn, (query, instruction) in enumerate(QUERIES):
        prompts = runner.builder.build(query, DOCUMENTS, instruction, PromptOptions(Truncation.NONE))
        for dn, ids in enumerate(prompts.sequences):
            out[qn, dn] = (reference_score(reference_model, ids), reference_logit(reference_model, ids))
    return out


def test_scores_spread_so_parity_can_see_errors(expected: dict[tuple[int, int], tuple[float, float]]) -> None:
    logits = [lo for _, lo in expected.values()]
    assert max(logits) - min(logits) > 2.0, "scores hug one value: a wrong answer would pass"


CONFIGS = {
    "one-row-batches": BatcherConfig(max_batch_tokens=1, max_batch_size=1),
    "small-budget": BatcherConfig(max_batch_tokens=600, max_batch_size=8, max_wait_ms=5),
    "large-budget": BatcherConfig(max_batch_tokens=100_000, max_batch_size=256, max_wait_ms=20),
    "no-prefix-reuse": BatcherConfig(max_batch_tokens=4096, max_batch_size=64, prefix_reuse=False, max_wait_ms=5),
    "no-linger": BatcherConfig(max_batch_tokens=2048, max_batch_size=16, max_wait_ms=0),
    # with pieces_cost(): every row over ~20 tokens runs in pieces across batches
    "row-pieces": BatcherConfig(max_batch_tokens=4096, max_batch_size=64, max_wait_ms=5, max_batch_ms=20),
}


def pieces_cost() -> CostModel:
    """A cost model of a device taking 1 ms a token, fitted firmly enough (many warm-up points)
    that the tiny model's real milliseconds, observed as the test runs, leave rows in pieces."""
    cost = CostModel()
    for _ in range(100):
        for tokens in (10, 100, 1000):
            cost.calibrate(Shape.of([(tokens, tokens + 50)]), float(tokens))
    return cost


@pytest.mark.parametrize("config_name", list(CONFIGS))
async def test_concurrent_requests_match_reference(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]], config_name: str
) -> None:
    stats: list[BatchStats] = []
    batcher = Batcher(any_runner, any_runner.builder, CONFIGS[config_name], on_batch=stats.append,
                      cost=pieces_cost() if config_name == "row-pieces" else None)
    batcher.start()
    rng = random.Random(config_name)
    orders = [rng.sample(range(len(DOCUMENTS)), len(DOCUMENTS)) for _ in QUERIES]
    try:
        results = await asyncio.gather(*(
            batcher.score(ScoreRequest(q, [DOCUMENTS[d] for d in order], ins, PromptOptions(Truncation.NONE)))
            for (q, ins), order in zip(QUERIES, orders)))
    finally:
        await batcher.close()
    for qn, (result, order) in enumerate(zip(results, orders)):
        assert [s.index for s in result.scores] == list(range(len(order)))
        for s, dn in zip(result.scores, order):
            score, logit = expected[qn, dn]
            assert s.score == pytest.approx(score, abs=TOL_SCORE), (qn, dn)
            assert s.logit == pytest.approx(logit, abs=TOL_LOGIT), (qn, dn)
            assert not s.truncated
    pieces = [b for b in stats if b.padded_tokens == 0 and b.prefill_tokens]  # a row's leading piece
    assert (len(pieces) > 20) == (config_name == "row-pieces")


async def test_single_document_requests_mixed_with_large_ones(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]]
) -> None:
    """One batch holds rows with a shared prefix, rows of other requests and plain rows."""
    batcher = Batcher(any_runner, any_runner.builder,
                      BatcherConfig(max_batch_tokens=50_000, max_batch_size=128, max_wait_ms=50))
    batcher.start()
    q0, i0 = QUERIES[0]
    q1, i1 = QUERIES[1]
    try:
        singles = [batcher.score(ScoreRequest(q1, [DOCUMENTS[d]], i1, PromptOptions(Truncation.NONE)))
                   for d in range(6)]
        big = batcher.score(ScoreRequest(q0, DOCUMENTS, i0, PromptOptions(Truncation.NONE)))
        *single_results, big_result = await asyncio.gather(*singles, big)
    finally:
        await batcher.close()
    for d, result in enumerate(single_results):
        assert result.scores[0].score == pytest.approx(expected[1, d][0], abs=TOL_SCORE)
    for d, s in enumerate(big_result.scores):
        assert s.score == pytest.approx(expected[0, d][0], abs=TOL_SCORE)
    # the prefix was computed once for the big request, not once per document
    assert big_result.computed_tokens < big_result.prompt_tokens


def test_right_padding_bug_would_be_caught(
    runner: ModelRunner, reference_model: torch.nn.Module
) -> None:
    """Power check: the classic bug (right padding, logits read at the last column) moves
    the short rows' scores far beyond tolerance, so the parity tests above would see it."""
    prompts = runner.builder.build("capital of France", DOCUMENTS[:2] + DOCUMENTS[10:11], None,
                                   PromptOptions(Truncation.NONE))
    seqs = prompts.sequences
    width = max(map(len, seqs))
    ids = torch.tensor([s + [151643] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        logits = reference_model(ids, attention_mask=mask).logits[:, -1]
    buggy = (logits[:, 9693] - logits[:, 2152]).tolist()
    right = [reference_logit(reference_model, s) for s in seqs]
    assert abs(buggy[0] - right[0]) > 100 * TOL_LOGIT
    assert buggy[2] == pytest.approx(right[2], abs=TOL_LOGIT)  # the longest row has no pad


def test_prefix_position_bug_would_be_caught(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Power check: RoPE ignores a shift of all positions, but not document positions that
    restart at 0 after a cached prefix; the parity tolerance is far below that error."""
    import dataclasses

    from worker.runner import Item

    runner, attention = any_runner, any_runner.scorer.attention
    real = attention.layout

    def restart_positions(lengths, pasts, device):  # type: ignore[no-untyped-def]
        layout = real(lengths, pasts, device)
        shift = torch.repeat_interleave(torch.tensor(pasts.lengths()), torch.tensor(lengths))
        return dataclasses.replace(layout, positions=layout.positions - shift)

    query, instruction = QUERIES[0]
    prompts = runner.builder.build(query, DOCUMENTS[:3], instruction, PromptOptions(Truncation.NONE))
    items = [Item(s, prompts.shared_len) for s in prompts.sequences]
    runner.cache = type(runner.cache)(runner.cache.max_bytes)
    monkeypatch.setattr(attention, "layout", restart_positions)
    buggy = runner.score_rows(items).logits
    monkeypatch.undo()
    runner.cache = type(runner.cache)(runner.cache.max_bytes)  # the bug's prefixes are cached too
    assert max(abs(b - expected[0, d][1]) for d, b in enumerate(buggy)) > 100 * TOL_LOGIT
    assert runner.score_rows(items).logits == pytest.approx([expected[0, d][1] for d in range(3)], abs=TOL_LOGIT)


def test_runner_rows_equal_reference_with_and_without_prefix(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]]
) -> None:
    """The runner alone: plain rows, prefix rows and a mix in one batch, in any order."""
    from worker.runner import Item

    query, instruction = QUERIES[2]
    prompts = any_runner.builder.build(query, DOCUMENTS, instruction, PromptOptions(Truncation.NONE))
    for reuse in ([False] * 12, [True] * 12, [i % 3 == 0 for i in range(12)]):
        items = [Item(s, prompts.shared_len if r else 0) for s, r in zip(prompts.sequences, reuse)]
        order = list(reversed(range(len(items))))
        out = any_runner.score_rows([items[i] for i in order])
        for logit, dn in zip(out.logits, order):
            assert logit == pytest.approx(expected[2, dn][1], abs=TOL_LOGIT)
        assert out.computed[0] >= 1


def test_the_system_prompt_is_computed_once_for_all_requests(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]]
) -> None:
    """Lone documents share the template's system prompt with every other request, and a
    request's own prefix is computed on top of it: exact, and each token computed once."""
    from worker.runner import Item

    runner = any_runner
    runner.cache = type(runner.cache)(runner.cache.max_bytes)
    system = len(runner.builder.prefix_ids)
    prompts = [runner.builder.build(q, DOCUMENTS, ins, PromptOptions(Truncation.NONE)) for q, ins in QUERIES]
    lone = prompts[0].sequences[1]
    first = runner.score_rows([Item(lone, system)])
    assert (first.computed, first.prefill_tokens) == ([len(lone)], system)  # the system prompt, now
    other = prompts[3].sequences[5]
    second = runner.score_rows([Item(other, system)])
    assert (second.computed, second.prefill_tokens) == ([len(other) - system], 0)  # cached
    shared = prompts[2].shared_len
    batch = runner.score_rows([Item(s, shared) for s in prompts[2].sequences[:4]])
    assert batch.prefill_tokens == shared - system  # the instruction and query only
    assert sum(batch.computed) == sum(len(s) - shared for s in prompts[2].sequences[:4]) + shared - system
    assert [first.logits[0], second.logits[0], *batch.logits] == pytest.approx(
        [expected[0, 1][1], expected[3, 5][1], *(expected[2, d][1] for d in range(4))], abs=TOL_LOGIT)


def test_one_batch_with_several_prefixes_interleaved(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]]
) -> None:
    """Rows of four queries (four distinct prefixes, of different lengths) and plain rows,
    interleaved in one batch: each row must read its own prefix, whatever its place."""
    from worker.runner import Item

    items, want = [], []
    for dn in range(len(DOCUMENTS)):
        for qn, (query, instruction) in enumerate(QUERIES):
            prompts = any_runner.builder.build(query, DOCUMENTS, instruction, PromptOptions(Truncation.NONE))
            items.append(Item(prompts.sequences[dn], 0 if (dn + qn) % 5 == 0 else prompts.shared_len))
            want.append(expected[qn, dn][1])
    any_runner.cache = type(any_runner.cache)(any_runner.cache.max_bytes)
    assert any_runner.score_rows(items).logits == pytest.approx(want, abs=TOL_LOGIT)
    assert any_runner.score_rows(items[::-1]).logits == pytest.approx(want[::-1], abs=TOL_LOGIT)  # prefixes cached


async def test_truncated_documents_match_the_reference_on_their_cut_ids(
    runner: ModelRunner, reference_model: torch.nn.Module
) -> None:
    batcher = Batcher(runner, runner.builder, BatcherConfig())
    batcher.start()
    docs = ["short", "overflowing " * 2000, "also " * 1500]
    try:
        result = await batcher.score(ScoreRequest("overflow test", docs))
    finally:
        await batcher.close()
    prompts = runner.builder.build("overflow test", docs, None)
    assert [s.truncated for s in result.scores] == [False, True, True]
    for s, ids in zip(result.scores, prompts.sequences):
        assert len(ids) <= MAX_LENGTH
        assert s.score == pytest.approx(reference_score(reference_model, ids), abs=TOL_SCORE)


class RecordingRunner:
    """The runner, recording every row it scores and the row's log-odds: chunks are rows, so
    each chunk's score can be held against the reference on exactly its ids."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.builder = runner, runner.builder
        self.rows: dict[tuple[int, ...], float] = {}

    def score(self, batch: Batch) -> BatchScores:
        out = self.runner.score(batch)
        self.rows.update((tuple(row.ids), logit) for row, logit in zip(batch.rows, out.logits, strict=True))
        return out

    def warmup(self) -> None:
        self.runner.warmup()

    def info(self) -> RunnerInfo:
        return self.runner.info()


LONG_DOCUMENTS = [
    "Paris is the capital of France. " + " ".join(DOCUMENTS) * 2,  # 3 chunks of MAX_LENGTH
    "Bananas are yellow. " * 300 + "Paris is the capital and most populous city of France.",  # the answer at its end
]


@pytest.mark.parametrize(("config_name", "max_chunks"), [("large-budget", 10), ("one-row-batches", 10),
                                                         ("row-pieces", 10), ("no-prefix-reuse", 2)])
async def test_chunked_documents_match_the_reference_chunk_by_chunk(
    any_runner: ModelRunner, reference_model: torch.nn.Module, config_name: str, max_chunks: int
) -> None:
    """Each chunk of a long document is scored as the reference scores exactly its ids, and the
    document's score is the best chunk's; the short documents beside them are unchanged."""
    recording = RecordingRunner(any_runner)
    batcher = Batcher(recording, any_runner.builder, CONFIGS[config_name],
                      cost=pieces_cost() if config_name == "row-pieces" else None)
    batcher.start()
    query, instruction = QUERIES[0]
    docs = [DOCUMENTS[0], LONG_DOCUMENTS[0], DOCUMENTS[1], LONG_DOCUMENTS[1]]
    try:
        result = await batcher.score(ScoreRequest(query, docs, instruction, PromptOptions(max_chunks=max_chunks)))
    finally:
        await batcher.close()
    prompts = any_runner.builder.build(query, docs, instruction, PromptOptions(max_chunks=max_chunks))
    assert prompts.chunks[1] > 1 and prompts.chunks[3] > 1 and prompts.chunks[0] == prompts.chunks[2] == 1
    rows = iter(prompts.sequences)
    for s, chunks in zip(result.scores, prompts.chunks, strict=True):
        chunk_ids = [next(rows) for _ in range(chunks)]
        want = [reference_logit(reference_model, ids) for ids in chunk_ids]
        assert all(len(ids) <= MAX_LENGTH for ids in chunk_ids)
        assert [recording.rows[tuple(ids)] for ids in chunk_ids] == pytest.approx(want, abs=TOL_LOGIT)
        assert s.logit == max(recording.rows[tuple(ids)] for ids in chunk_ids)  # the best chunk's, exactly
        assert s.logit == pytest.approx(max(want), abs=TOL_LOGIT)
        assert s.score == pytest.approx(reference_score(reference_model, chunk_ids[s.best_chunk]), abs=TOL_SCORE)
        assert s.chunks == chunks and s.truncated == (max_chunks == 2 and s.index == 1)
    assert result.prompt_tokens == sum(map(len, prompts.sequences))


async def test_documents_under_the_budget_score_identically_with_and_without_chunking(
    any_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]]
) -> None:
    """Chunking changes nothing for a document that fits: the same ids, the same batches (calls
    one at a time, no time budget: the batching is deterministic), the same floats (each run on a cold prefix
    cache, so both compute the same prefixes)."""
    results = {}
    for max_chunks in (1, 10):
        any_runner.cache = type(any_runner.cache)(any_runner.cache.max_bytes)
        batcher = Batcher(any_runner, any_runner.builder, BatcherConfig(max_batch_tokens=2048, max_wait_ms=0,
                                                                        max_batch_ms=0))
        batcher.start()
        try:
            results[max_chunks] = [  # one at a time: the same batches in both runs
                await batcher.score(ScoreRequest(q, DOCUMENTS, ins,
                                                 PromptOptions(Truncation.NONE, max_chunks=max_chunks)))
                for q, ins in QUERIES]
        finally:
            await batcher.close()
    assert [r.scores for r in results[1]] == [r.scores for r in results[10]]
    for qn, result in enumerate(results[10]):
        assert [(s.chunks, s.best_chunk, s.truncated) for s in result.scores] == [(1, 0, False)] * len(DOCUMENTS)
        assert [s.logit for s in result.scores] == pytest.approx([expected[qn, d][1] for d in range(len(DOCUMENTS))],
                                                                 abs=TOL_LOGIT)


@pytest.mark.parametrize("kernel", ["flash", "math"])
@pytest.mark.parametrize("folded", [False, True])
def test_cuda_attention_layout_and_other_kernels_give_the_same_scores(
    padded_runner: ModelRunner, expected: dict[tuple[int, int], tuple[float, float]], kernel: str, folded: bool
) -> None:
    """CUDA folds the query heads of each K/V head onto the query axis and runs another kernel
    (memory-efficient) than the CPU (flash, grouped natively). Both layouts, on two kernels
    here, must give the reference's scores: the mask means the same to all of them."""
    from torch.nn.attention import SDPBackend

    from worker.runner import Item

    runner = padded_runner
    query, instruction = QUERIES[3]
    prompts = runner.builder.build(query, DOCUMENTS, instruction, PromptOptions(Truncation.NONE))
    items = [Item(s, prompts.shared_len if i % 2 else 0) for i, s in enumerate(prompts.sequences)]
    attention = runner.scorer.attention
    kept = attention.backends, attention.fold
    attention.backends = [SDPBackend.MATH] if kernel == "math" else [SDPBackend.FLASH_ATTENTION]
    attention.fold = attention.heads // attention.kv_heads if folded else 1
    try:
        out = runner.score_rows(items)
    finally:
        attention.backends, attention.fold = kept
    assert out.logits == pytest.approx([expected[3, d][1] for d in range(len(DOCUMENTS))], abs=TOL_LOGIT)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler (apt-get install g++)")
async def test_compiled_path_matches_reference(
    tiny_model_dir: Path, expected: dict[tuple[int, int], tuple[float, float]]
) -> None:
    """``--compile`` (torch.compile of the per-token parts, as a GPU and bf16 on a CPU use it;
    fp32 with rows attention here, the CPU's default) gives the reference's log-odds and scores
    within the contract on every path: prefill, prefix rows, plain rows, the one-row graph."""
    from torch._dynamo.utils import counters

    # Every runner compiles by default, and dynamo caches graphs by code object: the module's
    # other runners have built these parts already. Start from an empty cache, so the count
    # below is this runner's own graphs.
    torch._dynamo.reset()
    counters.clear()
    compiled = ModelRunner.load(str(tiny_model_dir), max_length=MAX_LENGTH, compile=True)
    compiled.warmup()
    warm_graphs = counters["stats"]["unique_graphs"]
    assert warm_graphs >= 3  # the three parts really were compiled
    batcher = Batcher(compiled, compiled.builder, BatcherConfig(max_batch_tokens=3000, max_batch_size=5, max_wait_ms=0))
    batcher.start()
    try:
        results = await asyncio.gather(*(
            batcher.score(ScoreRequest(q, DOCUMENTS, ins, PromptOptions(Truncation.NONE))) for q, ins in QUERIES),
            batcher.score(ScoreRequest(QUERIES[0][0], DOCUMENTS[:1], QUERIES[0][1], PromptOptions(Truncation.NONE))))
    finally:
        await batcher.close()
    for qn, result in enumerate(results):
        for dn, s in enumerate(result.scores):
            assert s.logit == pytest.approx(expected[qn % len(QUERIES), dn][1], abs=TOL_LOGIT), (qn, dn)
            assert s.score == pytest.approx(expected[qn % len(QUERIES), dn][0], abs=TOL_SCORE), (qn, dn)
    # Traffic after the warm-up brings new batch shapes, never a new graph: a recompile would
    # stall its batch for seconds, and past dynamo's recompile limit fall back to eager.
    from worker.runner import Item

    rng = random.Random(7)
    for step in range(24):
        docs = [" ".join(["word"] * rng.randint(1, 120)) for _ in range(rng.choice([1, 2, 3, 7, 16]))]
        prompts = compiled.builder.build(f"query {step}", docs, None)
        shared = [0, prompts.shared_len, len(compiled.builder.prefix_ids)][step % 3]
        compiled.score_rows([Item(ids, shared) for ids in prompts.sequences])
    assert counters["stats"]["unique_graphs"] == warm_graphs


@pytest.mark.slow  # a checkpoint of its own
def test_untied_head_like_the_8b_checkpoint(tmp_path: Path) -> None:
    """Qwen3-Reranker-8B does not tie its LM head to the embeddings: the yes/no rows must come
    from the head, not the embedding matrix. A tiny untied checkpoint, through from_pretrained."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from worker.offline import build_qwen3_tokenizer, qwen3_config
    from worker.runner import Item

    config = qwen3_config("tiny")
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
        model.lm_head.weight.normal_(0, 0.05)  # unlike the embeddings
    model.save_pretrained(tmp_path)
    build_qwen3_tokenizer().save_pretrained(tmp_path)
    runner = ModelRunner.load(str(tmp_path), max_length=MAX_LENGTH)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reference.lm_head.weight.data_ptr() != reference.model.embed_tokens.weight.data_ptr()
    prompts = runner.builder.build(QUERIES[0][0], DOCUMENTS[:6], None, PromptOptions(Truncation.NONE))
    items = [Item(s, prompts.shared_len) for s in prompts.sequences]
    got = runner.score_rows(items).logits
    want = [reference_logit(reference, s) for s in prompts.sequences]
    assert got == pytest.approx(want, abs=TOL_LOGIT)
    assert max(want) - min(want) > 0.5  # spread enough to tell rows apart


@pytest.mark.slow  # twelve checkpoints of their own
@pytest.mark.parametrize("layout", ["rows", "padded", "folded", "varlen"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])
def test_other_head_groupings(tmp_path: Path, heads: int, kv_heads: int, layout: str) -> None:
    """Query heads per K/V head: 2 in the tiny model and 0.6B, 4 in the 4B and 8B. Grouped and
    folded (CUDA) attention must hold for any grouping, also none (1) and all-in-one."""
    from transformers import Qwen3ForCausalLM

    from worker.offline import build_qwen3_tokenizer, qwen3_config
    from worker.runner import Item

    config = qwen3_config("tiny")
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    torch.manual_seed(2)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
    runner = ModelRunner(model, build_qwen3_tokenizer(), model_id="grouped", max_length=MAX_LENGTH,
                         attention="rows" if layout == "rows" else "padded")
    if layout == "folded":
        runner.scorer.attention.fold = heads // kv_heads
    if layout == "varlen":
        from worker.attention import VarlenAttention, varlen_reference

        runner.scorer.attention = VarlenAttention(varlen_reference, heads, runner.scorer.head_dim)
    prompts = runner.builder.build(QUERIES[1][0], DOCUMENTS[:8], QUERIES[1][1], PromptOptions(Truncation.NONE))
    items = [Item(s, prompts.shared_len if i % 2 else 0) for i, s in enumerate(prompts.sequences)]
    got = runner.score_rows(items).logits
    want = [reference_logit(model, s) for s in prompts.sequences]
    assert got == pytest.approx(want, abs=TOL_LOGIT)
    assert max(want) - min(want) > 0.5


def test_the_padded_size_reported_is_what_the_attention_pads(runner: ModelRunner, padded_runner: ModelRunner) -> None:
    """``rerank_batch_padding_ratio`` reads ``padded_tokens``: rows attention pads nothing, so
    its padded size is the rows' own tokens; padded attention's is rows x the longest."""
    from worker.runner import Item

    prompts = runner.builder.build(QUERIES[0][0], DOCUMENTS[:5], QUERIES[0][1], PromptOptions(Truncation.NONE))
    items = [Item(s, prompts.shared_len) for s in prompts.sequences]
    own = [len(s) - prompts.shared_len for s in prompts.sequences]
    assert len(set(own)) > 1
    assert runner.score_rows(items).padded_tokens == sum(own)
    assert padded_runner.score_rows(items).padded_tokens == len(own) * max(own)


@pytest.mark.parametrize("strategy", ["rows", "padded"])
def test_a_prefix_that_no_row_continues_changes_nothing(
    request: pytest.FixtureRequest, expected: dict[tuple[int, int], tuple[float, float]], strategy: str
) -> None:
    """A batch's prefix list may hold one that none of its rows reads: no row may attend to it."""
    runner: ModelRunner = request.getfixturevalue("runner" if strategy == "rows" else "padded_runner")
    query, instruction = QUERIES[0]
    prompts = runner.builder.build(query, DOCUMENTS[:3], instruction, PromptOptions(Truncation.NONE))
    other = runner.builder.build(QUERIES[1][0], DOCUMENTS[:1], QUERIES[1][1], PromptOptions(Truncation.NONE))
    shared = prompts.shared_len
    with torch.inference_mode():
        kv, stray = runner.scorer.prefill([prompts.sequences[0][:shared], other.sequences[0][:other.shared_len]])
        got = runner.scorer.score([s[shared:] for s in prompts.sequences], [stray, kv], [1, 1, 1]).tolist()
    assert got == pytest.approx([expected[0, d][1] for d in range(3)], abs=TOL_LOGIT)


def _pieces(runner: ModelRunner, ids: list[int], *ends: int) -> list[Prefix]:
    """A row's leading pieces on the system prompt, through ``ends`` of its own tokens."""
    system = runner.builder.system
    pieces: list[Prefix] = []
    for end in ends:
        pieces.append(Prefix(ids[: len(system.ids) + end], base=pieces[-1] if pieces else system, transient=True))
    return pieces


def test_a_walked_row_is_exact_and_leaves_nothing_behind(
        runner: ModelRunner, reference_model: torch.nn.Module) -> None:
    """A row split across batches is walked layer by layer: its pieces cache no K/V, the runner
    holds its walk until the row's last batch, which scores it (beside an ordinary row) as
    the reference does, and lets it go."""
    ids = runner.builder.build("capital of France", [DOCUMENTS[10]], None, PromptOptions(Truncation.NONE)).sequences[0]
    other = runner.builder.build("capital of France", [DOCUMENTS[3]], None, PromptOptions(Truncation.NONE)).sequences[0]
    system = runner.builder.system
    runner.score(Batch([Row(ids, 0)], [system]))  # the system prompt is cached, as after warm-up
    before = len(runner.cache)
    first, second = _pieces(runner, ids, 150, 300)
    assert runner.score(Batch([], [first], piece=ids)).prefill_tokens == 150
    assert runner.score(Batch([], [second], piece=ids)).prefill_tokens == 150
    assert len(runner.cache) == before and list(runner._walks) == [second]
    out = runner.score(Batch([Row(other, 1), Row(ids, 0)], [second, system]))
    assert not runner._walks and len(runner.cache) == before
    assert out.computed[1] == len(ids) - len(second.ids)
    assert out.logits == pytest.approx([reference_logit(reference_model, other), reference_logit(reference_model, ids)],
                                       abs=TOL_LOGIT)


@pytest.mark.parametrize("lost", ["between pieces", "before the last batch"])
def test_a_walk_the_runner_let_go_is_begun_again(runner: ModelRunner, reference_model: torch.nn.Module,
                                                 lost: str) -> None:
    """Walks past the runner's room go, oldest first (a cancelled row's is dropped so): a row
    whose walk went is walked again from its request's prefix, slower and as exact."""
    ids = runner.builder.build("capital of France", [DOCUMENTS[10]], None, PromptOptions(Truncation.NONE)).sequences[0]
    first, second = _pieces(runner, ids, 100, 250)
    runner.score(Batch([], [first], piece=ids))
    if lost == "between pieces":
        runner._walks.clear()
    runner.score(Batch([], [second], piece=ids))
    if lost == "before the last batch":
        runner._walks.clear()
    out = runner.score(Batch([Row(ids, 0)], [second]))
    assert out.logits[0] == pytest.approx(reference_logit(reference_model, ids), abs=TOL_LOGIT)


def test_the_runner_holds_walks_of_two_max_length_rows_at_most(runner: ModelRunner) -> None:
    """What it tells the scheduler (``max_split_tokens``) is what it keeps: the least recently
    walked go past it. The prefix cache stays --prefix-cache-mb (default 512): walks hold no K/V
    of past layers."""
    assert runner.info().max_split_tokens == runner.walk_tokens >= 2 * runner.builder.max_length
    assert runner.cache.max_bytes == 512 * 2**20
    saved = runner.walk_tokens
    rows = [runner.builder.build(f"query {n}", [DOCUMENTS[10]], None, PromptOptions(Truncation.NONE)).sequences[0]
            for n in range(3)]
    runner.walk_tokens = 2 * len(rows[0])
    try:
        firsts = [_pieces(runner, ids, 50)[0] for ids in rows]
        for ids, first in zip(rows, firsts):
            runner.score(Batch([], [first], piece=ids))
        assert list(runner._walks) == firsts[1:]
    finally:
        runner.walk_tokens = saved
        runner._walks.clear()
