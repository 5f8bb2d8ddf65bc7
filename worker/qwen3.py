"""A scoring-only forward pass over a loaded ``Qwen3ForCausalLM``'s own modules.

The reference is ``model(input_ids).logits[:, -1, [no, yes]]``. This computes the same
numbers and skips everything a reranker does not need:

* no padding in the matrix work: every linear layer and MLP runs on the batch's tokens
  packed into one ``[tokens, hidden]`` matrix; only attention sees a padded layout, built
  per batch with an explicit mask (so neither padding side nor position ids can leak);
* a shared prefix (system prompt + instruction + query) can be passed in as per-layer K/V
  computed once; each row's positions continue from its own prefix length;
* the last layer computes queries, attention and MLP for the last position only, and the
  head is the two LM-head rows for ``yes`` and ``no``: no vocabulary-sized logits anywhere.

The module list, norms, projections, MLPs and rotary frequencies are the checkpoint's, so
this stays exact for every Qwen3 size (0.6B, 4B, 8B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KV = torch.Tensor  # one prefix's keys and values: [layers, 2, length, kv_heads, head_dim]


@dataclass(frozen=True)
class Layout:
    """Where each row's tokens sit in the packed and padded views of one forward pass."""

    lengths: list[int]  # new tokens per row
    past_lengths: list[int]  # prefix tokens per row (0: none)
    positions: torch.Tensor  # [tokens] rotary position of each packed token
    slot: torch.Tensor  # [tokens] flat index of each packed token in [rows * max_len]
    key_slot: torch.Tensor  # [tokens] flat index of its key in [rows * (past_max + max_len)]
    last_index: torch.Tensor  # [rows] packed index of each row's last token
    # True = may attend. With ``fold`` > 1 the query heads that share one K/V head sit side
    # by side on the query axis (query t, head g at t * fold + g), so that a kernel without
    # grouped-query support never needs K/V copied out per query head.
    mask: torch.Tensor  # [rows, 1, max_len * fold, past_max + max_len] bool
    last_mask: torch.Tensor  # [rows, 1, 1, past_max + max_len] for last-position queries

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def past_max(self) -> int:
        return max(self.past_lengths)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without stalling the host: from pinned memory, asynchronously, on a
    GPU (a pageable copy waits for all queued GPU work first)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_layout(lengths: list[int], past_lengths: list[int], device: torch.device,
                fold: int = 1) -> Layout:
    rows, max_len, past_max = len(lengths), max(lengths), max(past_lengths)
    width = past_max + max_len
    lens = torch.tensor(lengths)
    pasts = torch.tensor(past_lengths)
    row_of = torch.repeat_interleave(torch.arange(rows), lens)
    starts = torch.cumsum(lens, 0) - lens
    offset = torch.arange(int(lens.sum())) - starts[row_of]
    tokens = len(offset)
    # the per-token and per-row vectors travel in one copy; the masks are built on the device
    small = to_device(torch.cat((pasts[row_of] + offset, row_of * max_len + offset,
                                 row_of * width + past_max + offset, starts + lens - 1, lens, pasts)), device)
    positions, slot, key_slot, last_index, lens, pasts = torch.split(small, [tokens] * 3 + [rows] * 3)
    q_pos = torch.arange(max_len, device=device)
    k_pos = torch.arange(width, device=device)
    in_past = k_pos[None, :] < pasts[:, None]  # [rows, keys]
    doc_k = k_pos - past_max  # key slot -> position within the row's new tokens
    causal = (doc_k[None, :] >= 0) & (doc_k[None, :] <= q_pos[:, None])  # [max_len, keys]
    real_k = doc_k[None, :] < lens[:, None]  # [rows, keys]
    mask = in_past[:, None, :] | (causal[None] & real_k[:, None, :])
    mask |= (doc_k == 0)[None, None, :]  # padded query rows attend one key: no NaN rows
    last_mask = in_past | ((doc_k[None, :] >= 0) & real_k)
    return Layout(
        lengths=lengths, past_lengths=past_lengths, positions=positions, slot=slot,
        key_slot=key_slot, last_index=last_index,
        mask=mask.repeat_interleave(fold, dim=1)[:, None],
        last_mask=last_mask[:, None, None],
    )


class Qwen3Scorer:
    """Runs the yes/no scoring forward pass with a ``Qwen3ForCausalLM``'s weights."""

    def __init__(self, model: Any, yes_id: int, no_id: int, *, compile: bool = False) -> None:
        # `Any`: the checkpoint's modules are duck-typed (Qwen3ForCausalLM of any size)
        config = model.config
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by this scorer")
        self.model: Any = model.model
        self.layers: list[Any] = list(self.model.layers)
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.inv_freq: torch.Tensor = self.model.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(self.model.rotary_emb, "attention_scaling", 1.0))
        # On CUDA, the memory-efficient kernel: it takes an arbitrary mask at a few microseconds
        # of host time a call, where cuDNN's (PyTorch's first choice for bf16 on Hopper) spent
        # ~3.7 ms of host time a call and left the GPU waiting (measured: docs/PERFORMANCE.md).
        # It has no grouped-query support, so the query heads of each K/V head are folded onto
        # the query axis there (``fold``). The CPU's flash kernel groups natively; folding
        # would only double its mask (a max-length document's mask is ~0.7 GB in fp32).
        cuda = self.device.type == "cuda"
        self.backends = ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if cuda
                         else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        self.fold = self.heads // self.kv_heads if cuda else 1  # query heads per K/V head, or 1
        head = model.get_output_embeddings().weight
        self.yes_no = head[[yes_id, no_id]].detach().float().clone()  # fp32 head rows
        # The per-token work outside attention (norms, projections, rotary, MLP, residuals)
        # runs as three functions of (layer, tensors). With ``compile`` they go through
        # torch.compile with dynamic token counts: one graph serves all layers and batch
        # sizes, and the norms, rotary and SiLU-gate fuse into a few kernels instead of many
        # (what pays on a GPU, where eager elementwise passes rival the matrix work).
        self.compiled = compile
        self._kv_part: Any = torch.compile(_kv_part) if compile else _kv_part
        self._q_part: Any = torch.compile(_q_part) if compile else _q_part
        self._post_part: Any = torch.compile(_post_part) if compile else _post_part

    @property
    def device(self) -> torch.device:
        device: torch.device = self.inv_freq.device
        return device

    def prefill(self, sequences: list[list[int]]) -> list[KV]:
        """Per-layer K/V of each sequence, to serve as a shared prefix later."""
        layout = make_layout([len(s) for s in sequences], [0] * len(sequences), self.device, self.fold)
        per_layer: list[torch.Tensor] = []  # [2, tokens, kv_heads, dim] per layer
        self._run(sequences, Pasts.none(), layout, per_layer)
        stacked = torch.stack(per_layer)  # [layers, 2, tokens, kv_heads, dim]
        return [kv.contiguous() for kv in torch.split(stacked, layout.lengths, dim=2)]

    def score(self, tails: list[list[int]], pasts: list[KV | None]) -> torch.Tensor:
        """``logit_yes - logit_no`` at each row's last token, as float32 ``[rows]``."""
        past_lengths = [0 if p is None else p.shape[2] for p in pasts]
        layout = make_layout([len(t) for t in tails], past_lengths, self.device, self.fold)
        hidden = self._run(tails, Pasts.group(pasts, self.device), layout, None)
        hidden = self.model.norm(hidden).float()
        yes_no = hidden @ self.yes_no.T
        diff: torch.Tensor = yes_no[:, 0] - yes_no[:, 1]
        return diff

    def _run(self, tokens: list[list[int]], pasts: Pasts, layout: Layout,
             collect: list[torch.Tensor] | None) -> torch.Tensor:
        flat = [t for seq in tokens for t in seq]
        ids = to_device(torch.tensor(flat, dtype=torch.long), self.device)
        x: torch.Tensor = self.model.embed_tokens(ids)
        cos, sin = self._rotary(layout.positions, x.dtype)
        last = len(self.layers) - 1
        with sdpa_kernel(self.backends):
            for i, layer in enumerate(self.layers):
                only_last = i == last
                if only_last and collect is not None:
                    _, k, v = self._kv_part(layer, x, cos, sin, self.kv_heads, self.head_dim)
                    collect.append(torch.stack((k, v)))
                    return x  # a prefix needs K/V, never the last layer's output
                x = self._layer(layer, x, cos, sin, layout, pasts, i, only_last, collect)
        return x

    def _layer(self, layer: Any, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, layout: Layout, pasts: Pasts, index: int,
               only_last: bool, collect: list[torch.Tensor] | None) -> torch.Tensor:
        h, k, v = self._keys_values(layer, x, cos, sin, layout, pasts, index, collect)
        if only_last:
            x, h, cos, sin = (t[layout.last_index] for t in (x, h, cos, sin))
        q = self._q_part(layer, h, cos, sin, self.heads, self.head_dim)
        out = self._attend(q, k, v, layout, only_last)
        x_next: torch.Tensor = self._post_part(layer, x, out)
        return x_next

    def _keys_values(self, layer: Any, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, layout: Layout, pasts: Pasts, index: int,
                     collect: list[torch.Tensor] | None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The normed input, and padded keys/values ``[rows, kv_heads, past_max + max_len,
        dim]`` for one layer."""
        h, k, v = self._kv_part(layer, x, cos, sin, self.kv_heads, self.head_dim)
        if collect is not None:
            collect.append(torch.stack((k, v)))
        return h, self._pad_kv(k, layout, pasts, index, 0), self._pad_kv(v, layout, pasts, index, 1)

    def _pad_kv(self, t: torch.Tensor, layout: Layout, pasts: Pasts, index: int,
                which: int) -> torch.Tensor:
        """Keys or values ``[tokens, kv_heads, dim]`` copied once into their padded slots,
        after each row's prefix: ``[rows, kv_heads, past_max + max_len, dim]``, a view of
        sequence-major memory (the layout the attention kernels read natively)."""
        width = layout.past_max + layout.max_len
        padded = t.new_zeros(layout.rows, width, self.kv_heads, self.head_dim)
        padded.view(-1, self.kv_heads, self.head_dim).index_copy_(0, layout.key_slot, t)
        for kv, row_index in pasts.groups:  # one copy per distinct prefix, broadcast to its rows
            padded[row_index, : kv.shape[2]] = kv[index, which]
        return padded.transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                only_last: bool) -> torch.Tensor:
        """Attention of packed queries ``[tokens, heads, dim]`` over padded K/V, ``fold``
        query heads a K/V head folded onto the query axis (see ``Layout.mask``); the rest,
        if any, grouped by the kernel. Returns ``[tokens, heads * dim]``."""
        rows, fold, dim = layout.rows, self.fold, self.head_dim
        hq = self.heads // fold  # query heads the kernel sees
        gqa = hq != self.kv_heads
        if only_last:  # one query a row: its folded heads are the query axis
            out = F.scaled_dot_product_attention(q.view(rows, hq, fold, dim), k, v,
                                                 attn_mask=layout.last_mask, enable_gqa=gqa)
            return out.reshape(rows, self.heads * dim)
        max_len = layout.max_len
        folded = q.new_zeros(rows * max_len, fold, hq, dim)  # sequence-major, like K/V
        folded.index_copy_(0, layout.slot, q.view(-1, hq, fold, dim).transpose(1, 2))
        queries = folded.view(rows, max_len * fold, hq, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, k, v, attn_mask=layout.mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(rows * max_len, fold, hq, dim).index_select(0, layout.slot)
        return out.transpose(1, 2).reshape(-1, self.heads * dim)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# The dense per-token parts of a decoder layer, as the checkpoint's modules compute them.
# Free functions of (layer, tensors, sizes), so that one torch.compile graph serves every
# layer: dynamo treats the layer's weights as inputs, not as constants of the graph.
def _kv_part(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = _rope(attn.k_norm(attn.k_proj(h).view(-1, kv_heads, head_dim)), cos, sin)
    v = attn.v_proj(h).view(-1, kv_heads, head_dim)
    return h, k, v


def _q_part(layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
            head_dim: int) -> torch.Tensor:
    attn = layer.self_attn
    return _rope(attn.q_norm(attn.q_proj(h).view(-1, heads, head_dim)), cos, sin)


def _post_part(layer: Any, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    x = x + layer.self_attn.o_proj(attn_out)
    out: torch.Tensor = x + layer.mlp(layer.post_attention_layernorm(x))
    return out


@dataclass(frozen=True)
class Pasts:
    """A batch's prefixes, each once, with the rows that continue it."""

    groups: list[tuple[KV, torch.Tensor]]  # (prefix K/V, row indices on the device)

    @classmethod
    def none(cls) -> Pasts:
        return cls([])

    @classmethod
    def group(cls, pasts: list[KV | None], device: torch.device) -> Pasts:
        rows: dict[int, list[int]] = {}
        tensors: dict[int, KV] = {}
        for row, kv in enumerate(pasts):
            if kv is not None:
                rows.setdefault(id(kv), []).append(row)
                tensors[id(kv)] = kv
        return cls([(tensors[key], to_device(torch.tensor(r), device)) for key, r in rows.items()])
