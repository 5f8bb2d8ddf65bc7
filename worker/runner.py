"""The model runner: loads a Qwen3-Reranker checkpoint and scores batches synchronously.

``ModelRunner.score`` is the only code that touches the model, and it runs on the batcher's
single model thread: it owns the prefix K/V cache, and the walks of rows split across batches
(worker/qwen3.py), without locks. Tokenization lives in
``PromptBuilder`` and runs on other threads, before work reaches the queue.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker import precision as cpu_precision
from worker.attention import KV, VarlenAttention, check_attention, check_varlen_kernel
from worker.prompt import PromptBuilder
from worker.qwen3 import Qwen3Scorer, Walk
from worker.types import Attention, Batch, BatchScores, Device, DType, Prefix, Row, RunnerInfo

log = logging.getLogger(__name__)


def pick_device(device: str | None) -> torch.device:
    dev = torch.device(device if device else "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type not in tuple(Device):
        raise ValueError(f"device {dev} is not supported: use one of {', '.join(Device)}")
    return dev


def pick_dtype(dtype: DType | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == Device.CUDA else torch.float32
    try:
        kind = DType(dtype)
    except ValueError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DType)}") from None
    chosen: torch.dtype = getattr(torch, kind.value)
    return chosen


class PrefixCache:
    """LRU of prefix K/V by ``Prefix`` (its identity), bounded in bytes; a miss is recomputed,
    never wrong."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Prefix, tuple[KV, int]] = OrderedDict()

    def get(self, key: Prefix) -> KV | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: Prefix, kv: KV) -> None:
        size = kv.numel() * kv.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = (kv, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._entries)


class ModelRunner:  # implements worker.types.Runner
    """Scores ``Batch``es with a real Qwen3-Reranker checkpoint. ``builder`` is the prompt
    builder for its tokenizer: the composition root hands it to the batcher."""

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str,
                 max_length: int = 8192, prefix_cache_mb: int = 512, compile: bool = False,
                 attention: Attention | str | None = None) -> None:
        limit = int(getattr(model.config, "max_position_embeddings", 32768))
        if not 1 <= max_length <= limit:
            raise ValueError(f"max_length {max_length} outside 1..{limit} for {model_id}")
        self.model_id = model_id
        self.builder = PromptBuilder(tokenizer, max_length)
        self.model = model  # the full Qwen3ForCausalLM (benchmarks run the card's loop on it)
        device = next(model.parameters()).device
        self.scorer = Qwen3Scorer(model, self.builder.yes_id, self.builder.no_id, compile=compile,
                                  attention=attention or Attention.for_device(device.type))
        self.dtype = next(model.parameters()).dtype
        self.cache = PrefixCache(prefix_cache_mb * 2**20)
        # rows split across batches (worker/queue.py), walked layer by layer, by their latest
        # piece; the least recently walked go past two max_length rows (a cancelled row's walk
        # is dropped so; a walk not found is begun again: slower, never wrong)
        self._walks: OrderedDict[Prefix, Walk] = OrderedDict()
        self.walk_tokens = 2 * max_length

    @classmethod
    def load(cls, model_id: str, *, device: str | None = None, dtype: DType | str | None = None,
             max_length: int = 8192, prefix_cache_mb: int = 512, compile: bool | None = None,
             attention: Attention | str | None = None, precision: str | None = None) -> ModelRunner:
        """Load by hub id or local directory, the normal ``from_pretrained`` way. ``compile``
        None: on, where it was measured to pay (docs/PERFORMANCE.md: a GPU, bf16 on the CPU
        1.24-1.38x, fp32 on the CPU 1.07-1.13x, as close to the reference as eager), except for
        the exact split modes, whose GEMMs switch a oneDNN setting around each call, and for a
        CPU host without the C++ compiler inductor builds its kernels with (logged); a compile
        that fails in ``warmup`` falls back to eager, logged.
        ``attention``: "rows" (the CPU's flash kernel a row at a time, nothing padded: the CPU's
        default), "padded" (masked SDPA over padded rows, every device: the GPU's default) or
        "varlen" (FlashAttention's variable-length kernel: CUDA, bf16/fp16); see
        worker/qwen3.py. ``precision``: the CPU's
        mode (worker/precision.py); an explicit ``dtype`` overrides it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = pick_device(device)
        plan = cpu_precision.resolve(precision, dtype, dev)
        torch_dtype = pick_dtype(plan.dtype, dev)
        if compile is None:
            compile = not plan.parts and (dev.type != Device.CPU or _cpu_compiler_found())
        attention = check_attention(attention or Attention.for_device(dev.type), dev,
                                    torch_dtype)  # before minutes of loading, not after
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model: Any = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype, attn_implementation="sdpa")
        if model.config.model_type != "qwen3":
            raise ValueError(f"{model_id} is a {model.config.model_type!r} model, not a Qwen3 reranker")
        model.to(dev).eval().requires_grad_(False)
        plan.apply(model)
        log.info("loaded %s on %s as %s in %.1fs", model_id, dev, torch_dtype, time.perf_counter() - started)
        return cls(model, tokenizer, model_id=model_id, max_length=max_length,
                   prefix_cache_mb=prefix_cache_mb, compile=compile, attention=attention)

    def info(self) -> RunnerInfo:
        s = self.scorer
        return RunnerInfo(model=self.model_id, max_length=self.builder.max_length,
                          dtype=DType(str(self.dtype).removeprefix("torch.")), device=Device(s.device.type),
                          attention=s.attention.kind, max_split_tokens=self.walk_tokens, pieces_by_layer=True)

    def warmup(self) -> None:
        """Run each code path once (prefill, prefix reuse, plain rows); on a GPU also a few
        batch shapes, so kernels are chosen and the allocator has grown before traffic. With
        ``compile``, this is where the graphs are built (one row, and several: a size of 1 is
        its own graph)."""
        started = time.perf_counter()
        scorer = self.scorer
        if isinstance(scorer.attention, VarlenAttention):  # before any score depends on it
            worst = check_varlen_kernel(scorer.attention.kernel, scorer.device, self.dtype, scorer.heads,
                                        scorer.kv_heads, scorer.head_dim)
            log.info("variable-length attention kernel checked against the reference: largest "
                     "difference %.2g", worst)
        prompts = self.builder.build("warm up", ["a short document", "another one, longer " * 8], None)
        items = [Item(ids, prompts.shared_len) for ids in prompts.sequences]
        lone = Item(prompts.sequences[0], len(self.builder.prefix_ids))  # on the system prompt alone
        try:
            self.score_rows([*items, Item(prompts.sequences[0], 0), lone])
            self._walk_once(prompts.sequences[1], prompts.shared_len)
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raises: the eager path is exact
            if not scorer.compiled:
                raise
            log.warning("torch.compile could not build the layer work (%s: %s); serving it eager, which is "
                        "correct and slower (pass --no-compile to skip the attempt)", type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")
            scorer.compile(on=False)
            self.score_rows([*items, Item(prompts.sequences[0], 0), lone])
            self._walk_once(prompts.sequences[1], prompts.shared_len)
        self.score_rows(items[:1])
        if self.scorer.device.type == Device.CUDA:
            for rows, length in ((8, 128), (32, 256), (64, 512)):
                doc = "warm " * length
                shaped = self.builder.build("warm up", [doc] * rows, None)
                self.score_rows([Item(ids, shaped.shared_len) for ids in shaped.sequences])
            torch.cuda.synchronize()
        self.cache = PrefixCache(self.cache.max_bytes)  # warm-up's prefixes are nobody's
        system = self.builder.system  # everybody's: ready before the first call
        with torch.inference_mode():  # as in score(): grad mode would be a graph of its own
            self.cache.put(system, self.scorer.prefill([system.ids])[0])
        log.info("warm-up done in %.1fs%s", time.perf_counter() - started,
                 " (compiled)" if self.scorer.compiled else "")

    @torch.inference_mode()
    def score(self, batch: Batch) -> BatchScores:
        if batch.piece:  # a row's leading piece: its walk goes on, and waits for the next
            return BatchScores([], [], 0, prefill_tokens=self._walk(batch.prefixes[0], list(batch.piece)))
        walked = [i for i, row in enumerate(batch.rows) if row.prefix >= 0 and batch.prefixes[row.prefix].transient]
        if not walked:
            return self._score(batch)
        others = [i for i in range(len(batch.rows)) if i not in walked]
        out = self._score(_sub_batch(batch, others))
        logits, computed = iter(out.logits), iter(out.computed)
        ends = {i: self._finish(batch.prefixes[batch.rows[i].prefix], batch.rows[i].ids) for i in walked}
        return BatchScores([ends[i][0] if i in ends else next(logits) for i in range(len(batch.rows))],
                           [ends[i][1] if i in ends else next(computed) for i in range(len(batch.rows))],
                           out.padded_tokens + sum(e[1] for e in ends.values()), out.prefill_tokens)

    def _walk(self, piece: Prefix, ids: list[int]) -> int:
        """Walk the row ``ids`` on through its leading ``piece``; the tokens it computed."""
        base = piece.base
        walk = self._walks.pop(base, None) if base is not None else None
        spent = 0
        if walk is None:
            walk, spent = self._begin(piece, ids)
        self.scorer.walk(walk, len(piece.ids) - (len(ids) - walk.own))
        self._walks[piece] = walk
        while sum(w.own for w in self._walks.values()) > self.walk_tokens:
            self._walks.popitem(last=False)
        return spent + len(piece.ids) - (0 if base is None else len(base.ids))

    def _finish(self, piece: Prefix, ids: list[int]) -> tuple[float, int]:
        """The logit of a row walked through ``piece``, and the tokens its last batch computed."""
        walk = self._walks.pop(piece, None) or self._begin(piece, ids)[0]
        return self.scorer.finish(walk), len(ids) - len(piece.ids)

    def _begin(self, piece: Prefix, ids: list[int]) -> tuple[Walk, int]:
        """A walk of ``ids`` from the non-transient prefix under ``piece`` (its request's, or
        none), and the tokens that prefix's K/V cost if it was not cached."""
        root: Prefix | None = piece
        while root is not None and root.transient:
            root = root.base
        if root is None:
            return self.scorer.begin(ids, None), 0
        kvs, spent = self._prefix_kv([root])
        return self.scorer.begin(ids[len(root.ids):], kvs[0]), spent[0]

    def _walk_once(self, ids: list[int], prefix_len: int) -> None:
        """Warm-up: a row in two pieces, walked (the compiled parts see a walk's shapes)."""
        system = self.builder.system
        first = Prefix(ids[: prefix_len + 2], base=system, transient=True)
        self.score(Batch([], [first], piece=ids))
        self.score(Batch([Row(ids, 0)], [first]))

    def _score(self, batch: Batch) -> BatchScores:
        kvs, spent = self._prefix_kv(batch.prefixes)
        if not batch.rows:  # prefixes alone: computed and cached
            return BatchScores([], [], 0, prefill_tokens=sum(spent))
        tails = [row.ids[batch.prefix_len(row):] for row in batch.rows]
        computed = [len(t) for t in tails]
        first_row: dict[int, int] = {}
        for i, row in enumerate(batch.rows):
            first_row.setdefault(row.prefix, i)
        for p, tokens in enumerate(spent):  # a prefix computed now counts once, on its first row
            computed[first_row.get(p, 0)] += tokens
        logits = self.scorer.score(tails, kvs, [row.prefix for row in batch.rows]).tolist()
        lengths = [len(t) for t in tails]
        padded = len(tails) * max(lengths) if self.scorer.attention.kind is Attention.PADDED else sum(lengths)
        return BatchScores(logits, computed, padded, prefill_tokens=sum(spent))

    def score_rows(self, items: Sequence[Item]) -> BatchScores:
        """Score rows given as (ids, prefix length), without a batcher (benchmarks, tests):
        rows whose prefixes have the same ids share one ``Prefix``, built on the system prompt
        when they start with it."""
        system = self.builder.system
        prefixes: dict[tuple[int, ...], Prefix] = {tuple(system.ids): system}
        used: dict[Prefix, int] = {}
        rows = []
        for it in items:
            if not it.prefix_len:
                rows.append(Row(it.ids))
                continue
            ids = it.ids[: it.prefix_len]
            on_system = ids[: len(system.ids)] == system.ids
            prefix = prefixes.setdefault(tuple(ids), Prefix(ids, base=system if on_system else None))
            rows.append(Row(it.ids, used.setdefault(prefix, len(used))))
        return self.score(Batch(rows, list(used)))

    def _prefix_kv(self, prefixes: Sequence[Prefix]) -> tuple[list[KV], list[int]]:
        """Each prefix's K/V, cached or computed now, and the tokens computed for each. A
        prefix with a ``base`` (a request's, on the system prompt) is computed on top of the
        base's K/V, so only its instruction and query run; missing bases come first."""
        known: dict[Prefix, KV] = {}
        charge: dict[Prefix, int] = {}  # missing -> the batch prefix whose first row is charged
        for n, prefix in enumerate(prefixes):
            for p in (prefix, prefix.base):
                if p is None or p in known or p in charge:
                    break
                kv = self.cache.get(p)
                if kv is not None:
                    known[p] = kv
                    break
                charge[p] = n  # and its base, if that is missing too
        spent = [0] * len(prefixes)
        on_base: dict[Prefix, list[Prefix]] = {}
        roots = []
        for p in charge:
            if p.base is None or p.base not in known and p.base not in charge:
                roots.append(p)  # computed whole
            else:
                on_base.setdefault(p.base, []).append(p)
        self._compute(roots, None, known, charge, spent)
        for base, members in on_base.items():
            self._compute(members, base, known, charge, spent)
        return [known[p] for p in prefixes], spent

    def _compute(self, prefixes: list[Prefix], base: Prefix | None, known: dict[Prefix, KV],
                 charge: dict[Prefix, int], spent: list[int]) -> None:
        if not prefixes:
            return
        skip = 0 if base is None else len(base.ids)
        kvs = self.scorer.prefill([p.ids[skip:] for p in prefixes], past=None if base is None else known[base])
        for p, kv in zip(prefixes, kvs):
            self.cache.put(p, kv)
            known[p] = kv
            spent[charge[p]] += len(p.ids) - skip


def _sub_batch(batch: Batch, keep: list[int]) -> Batch:
    """The rows ``keep`` of ``batch``, with the prefixes they use."""
    slots: dict[int, int] = {}
    rows = [Row(r.ids, -1 if r.prefix < 0 else slots.setdefault(r.prefix, len(slots)))
            for r in (batch.rows[i] for i in keep)]
    return Batch(rows, [batch.prefixes[p] for p in slots])


@dataclass(frozen=True, slots=True)
class Item:
    """A row for ``score_rows``: its full prompt ids, and how many lead ids are a prefix."""

    ids: list[int]
    prefix_len: int


def _cpu_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (g++ unless its
    config names another). Without one a default compile would only fail in the warm-up, with
    a warning on every start; asked first, it is one clear line and no wasted seconds."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler, or an inductor that moved it
        log.info("no C++ compiler for torch.compile's CPU kernels (%s): the layer work runs eager, "
                 "exact and 1.07-1.38x slower; install g++ to compile it (docs/OPERATIONS.md)",
                 type(exc).__name__)
        return False
    return True
