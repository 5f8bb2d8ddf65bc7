"""The model runner: loads a Qwen3-Reranker checkpoint and scores batches synchronously.

``ModelRunner.score`` is the only code that touches the model, and it runs on the batcher's
single model thread: it owns the prefix K/V cache without locks. Tokenization lives in
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
from worker.prompt import PromptBuilder
from worker.qwen3 import KV, Qwen3Scorer, check_attention, check_varlen_kernel
from worker.types import BatchScores, Truncation, WorkItem

log = logging.getLogger(__name__)


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]


class PrefixCache:
    """LRU of shared-prefix K/V, bounded in bytes; a miss is recomputed, never wrong."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[KV, int]] = OrderedDict()

    def get(self, key: tuple[int, ...]) -> KV | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[int, ...], kv: KV) -> None:
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
    """Scores batches of ``WorkItem`` with a real Qwen3-Reranker checkpoint."""

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str,
                 max_length: int = 8192, prefix_cache_mb: int = 512, compile: bool = False,
                 attention: str = "padded") -> None:
        limit = int(getattr(model.config, "max_position_embeddings", 32768))
        if not 1 <= max_length <= limit:
            raise ValueError(f"max_length {max_length} outside 1..{limit} for {model_id}")
        self.model_id = model_id
        self.builder = PromptBuilder(tokenizer, max_length)
        self.model = model  # the full Qwen3ForCausalLM (benchmarks run the card's loop on it)
        self.scorer = Qwen3Scorer(model, self.builder.yes_id, self.builder.no_id, compile=compile,
                                  attention=attention)
        self.cache = PrefixCache(prefix_cache_mb * 2**20)
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, model_id: str, *, device: str | None = None, dtype: str | None = None,
             max_length: int = 8192, prefix_cache_mb: int = 512, compile: bool | None = None,
             attention: str = "padded", precision: str | None = None) -> ModelRunner:
        """Load by hub id or local directory, the normal ``from_pretrained`` way. ``compile``
        None: on for CUDA (measured to pay there), off for the CPU (matrix-bound already).
        ``attention``: "padded" (masked SDPA, every device) or "varlen" (FlashAttention's
        variable-length kernel: CUDA, bf16/fp16; see worker/qwen3.py). ``precision``: the CPU's
        mode (worker/precision.py); an explicit ``dtype`` overrides it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = pick_device(device)
        plan = cpu_precision.resolve(precision, dtype, dev)
        torch_dtype = pick_dtype(plan.dtype, dev)
        if compile is None:
            compile = dev.type == "cuda"
        check_attention(attention, dev, torch_dtype)  # before minutes of loading, not after
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

    def describe(self) -> dict[str, str]:
        return {"model": self.model_id, "device": str(self.scorer.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "max_length": str(self.builder.max_length),
                "attention": "varlen" if self.scorer.varlen_kernel else "padded"}

    def warmup(self) -> None:
        """Run each code path once (prefill, prefix reuse, plain rows); on a GPU also a few
        batch shapes, so kernels are chosen and the allocator has grown before traffic. With
        ``compile``, this is where the graphs are built (one row, and several: a size of 1 is
        its own graph)."""
        started = time.perf_counter()
        scorer = self.scorer
        if scorer.varlen_kernel is not None:  # before any score depends on it
            worst = check_varlen_kernel(scorer.varlen_kernel, scorer.device, self.dtype, scorer.heads,
                                        scorer.kv_heads, scorer.head_dim)
            log.info("variable-length attention kernel checked against the reference: largest "
                     "difference %.2g", worst)
        prompts = self.builder.build("warm up", ["a short document", "another one, longer " * 8],
                                     None, Truncation.END)
        items = [_Item(ids, prompts.shared_len) for ids in prompts.sequences]
        lone = _Item(prompts.sequences[0], len(self.builder.prefix_ids))  # on the system prompt alone
        self.score([*items, _Item(prompts.sequences[0], 0), lone])
        self.score(items[:1])
        if self.scorer.device.type == "cuda":
            for rows, length in ((8, 128), (32, 256), (64, 512)):
                doc = "warm " * length
                shaped = self.builder.build("warm up", [doc] * rows, None, Truncation.END)
                self.score([_Item(ids, shaped.shared_len) for ids in shaped.sequences])
            torch.cuda.synchronize()
        self.cache = PrefixCache(self.cache.max_bytes)  # warm-up's prefixes are nobody's
        system = self.builder.prefix_ids  # everybody's: ready before the first call
        self.cache.put(tuple(system), self.scorer.prefill([system])[0])
        log.info("warm-up done in %.1fs%s", time.perf_counter() - started,
                 " (compiled)" if self.scorer.compiled else "")

    @torch.inference_mode()
    def score(self, items: Sequence[WorkItem]) -> BatchScores:
        computed = [len(it.ids) - it.prefix_len for it in items]
        pasts: list[KV | None] = [None] * len(items)
        missing: dict[tuple[int, ...], list[int]] = {}
        for i, it in enumerate(items):
            if it.prefix_len:
                key = tuple(it.ids[: it.prefix_len])
                kv = self.cache.get(key)
                if kv is None:
                    missing.setdefault(key, []).append(i)
                pasts[i] = kv
        prefill_tokens = self._prefill(missing, pasts, computed) if missing else 0
        tails = [it.ids[it.prefix_len:] for it in items]
        logits = self.scorer.score(tails, pasts).tolist()
        return BatchScores(logits, computed, len(items) * max(len(t) for t in tails),
                           prefill_tokens=prefill_tokens)

    def _prefill(self, missing: dict[tuple[int, ...], list[int]], pasts: list[KV | None],
                 computed: list[int]) -> int:
        """Compute and cache the batch's missing prefixes; the tokens that took. Every prompt
        starts with the template's system prompt: it is computed once and cached like any
        prefix (single-document requests use it alone), and a request's longer prefix is
        computed on top of it, so only its instruction and query run."""
        system = tuple(self.builder.prefix_ids)
        on_system = [k for k in missing if len(k) > len(system) and k[: len(system)] == system]
        plain = [k for k in missing if k not in on_system]
        base = self.cache.get(system) if on_system else None
        if on_system and base is None and system not in missing:
            plain.append(system)  # needed only as the base of the others
        spent = 0
        if plain:
            for key, kv in zip(plain, self.scorer.prefill([list(k) for k in plain])):
                rows = missing.get(key, [])
                self.cache.put(key, kv)
                computed[rows[0] if rows else missing[on_system[0]][0]] += len(key)  # counted once
                spent += len(key)
                for i in rows:
                    pasts[i] = kv
                if key == system:
                    base = kv
        if on_system:
            assert base is not None
            tails = [list(k[len(system):]) for k in on_system]
            for key, kv in zip(on_system, self.scorer.prefill(tails, past=base)):
                rows = missing[key]
                self.cache.put(key, kv)
                computed[rows[0]] += len(key) - len(system)
                spent += len(key) - len(system)
                for i in rows:
                    pasts[i] = kv
        return spent


@dataclass(frozen=True, slots=True)
class _Item:
    ids: list[int]
    prefix_len: int

