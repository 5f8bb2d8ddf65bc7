"""A scoring-only forward pass over a loaded ``Qwen3ForCausalLM``'s own modules.

The reference is ``model(input_ids).logits[:, -1, [no, yes]]``. This computes the same
numbers and skips everything a reranker does not need:

* no padding in the matrix work: every linear layer and MLP runs on the batch's tokens
  packed into one ``[tokens, hidden]`` matrix; only attention sees a padded layout, built
  per batch with an explicit mask (so neither padding side nor position ids can leak), or,
  with ``attention="varlen"`` (CUDA, bf16/fp16), no padding at all: FlashAttention's
  variable-length kernel over packed queries and packed [prefix; new] keys;
* a shared prefix (system prompt + instruction + query) can be passed in as per-layer K/V
  computed once; each row's positions continue from its own prefix length;
* the last layer computes queries, attention and MLP for the last position only, and the
  head is the two LM-head rows for ``yes`` and ``no``: no vocabulary-sized logits anywhere.

The module list, norms, projections, MLPs and rotary frequencies are the checkpoint's, so
this stays exact for every Qwen3 size (0.6B, 4B, 8B).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.types import Attention, Device

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
    mask: torch.Tensor | None  # [rows, 1, max_len * fold, past_max + max_len] bool
    last_mask: torch.Tensor | None  # [rows, 1, 1, past_max + max_len] for last-position queries
    varlen: Varlen | None = None  # instead of the masks, for the variable-length kernel

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def past_max(self) -> int:
        return max(self.past_lengths)


@dataclass(frozen=True)
class Varlen:
    """Packed sequences for a variable-length attention kernel: row r's queries are its new
    tokens, its keys its prefix then its new tokens, causal aligned to the end (query i of a
    row with prefix p sees keys 0 .. p + i)."""

    cu_q: torch.Tensor  # [rows + 1] int32 offsets of each row's queries in the packed tokens
    cu_k: torch.Tensor  # [rows + 1] int32 offsets of each row's keys in the packed keys
    cu_last: torch.Tensor  # [rows + 1] int32: 0, 1, .., rows (one query a row, the last layer)
    max_q: int
    max_k: int
    # packed keys = cat(new tokens' K, each distinct prefix's K in ``Pasts.groups`` order)
    # .index_select(0, key_gather); None when no row has a prefix (the keys are the tokens')
    key_gather: torch.Tensor | None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without stalling the host: from pinned memory, asynchronously, on a
    GPU (a pageable copy waits for all queued GPU work first)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_layout(lengths: list[int], past_lengths: list[int], device: torch.device,
                fold: int = 1, *, varlen_groups: list[int] | None = None) -> Layout:
    """``varlen_groups`` (each row's prefix as an index into ``Pasts.groups``, -1 for none):
    build the variable-length kernel's offsets instead of the padded masks."""
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
    if varlen_groups is not None:
        return Layout(lengths=lengths, past_lengths=past_lengths, positions=positions, slot=slot,
                      key_slot=key_slot, last_index=last_index, mask=None, last_mask=None,
                      varlen=make_varlen(lengths, past_lengths, varlen_groups, device))
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


def check_attention(attention: Attention | str, device: torch.device, dtype: torch.dtype) -> Attention:
    """The attention kind, if it can run here; ValueError if not: FlashAttention needs CUDA
    and 16 bits."""
    try:
        kind = Attention(attention)
    except ValueError:
        raise ValueError(f"attention must be {' or '.join(Attention)}, not {attention!r}") from None
    if kind is Attention.VARLEN and (device.type != Device.CUDA or dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError("varlen attention runs FlashAttention: it needs a CUDA device and bfloat16 or "
                         f"float16, not {device.type} {str(dtype).removeprefix('torch.')}; use padded attention")
    return kind


# (queries, keys, values, query offsets, key offsets, longest query run, longest key run)
VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int],
                        torch.Tensor]


def make_varlen(lengths: list[int], past_lengths: list[int], groups: list[int], device: torch.device) -> Varlen:
    """Offsets of each row's queries and keys, and where each packed key comes from: row r's
    prefix (group ``groups[r]``, -1 for none) then its own new tokens."""
    rows, tokens = len(lengths), sum(lengths)
    lens, pasts = torch.tensor(lengths), torch.tensor(past_lengths)
    zero = torch.zeros(1, dtype=torch.long)
    cu_q = torch.cat((zero, torch.cumsum(lens, 0)))
    cu_k = torch.cat((zero, torch.cumsum(lens + pasts, 0)))
    offsets = torch.cat((cu_q, cu_k, torch.arange(rows + 1))).to(torch.int32)
    max_q, max_k = max(lengths), max(n + p for n, p in zip(lengths, past_lengths))
    if not any(past_lengths):
        cu_q, cu_k, cu_last = torch.split(to_device(offsets, device), rows + 1)
        return Varlen(cu_q, cu_k, cu_last, max_q, max_k, None)
    # each key's source row in cat(new K [tokens], prefix 0 K, prefix 1 K, ...)
    gather = torch.empty(int(cu_k[-1]), dtype=torch.long)
    row_of = torch.repeat_interleave(torch.arange(rows), lens)
    within = torch.arange(tokens) - cu_q[:-1][row_of]
    gather[cu_k[:-1][row_of] + pasts[row_of] + within] = torch.arange(tokens)
    group_len = {g: p for g, p in zip(groups, past_lengths) if g >= 0}  # groups are 0 .. G-1
    sizes = torch.tensor([group_len[g] for g in range(len(group_len))])
    starts = torch.cumsum(sizes, 0) - sizes  # where each prefix's keys begin after the tokens'
    group = torch.tensor([max(g, 0) for g in groups])
    prow = torch.repeat_interleave(torch.arange(rows), pasts)
    j = torch.arange(int(pasts.sum())) - (torch.cumsum(pasts, 0) - pasts)[prow]
    gather[cu_k[:-1][prow] + j] = tokens + starts[group[prow]] + j
    cu_q, cu_k, cu_last = torch.split(to_device(offsets, device), rows + 1)
    return Varlen(cu_q, cu_k, cu_last, max_q, max_k, to_device(gather, device))


def check_varlen_kernel(kernel: VarlenKernel, device: torch.device, dtype: torch.dtype, heads: int,
                        kv_heads: int, head_dim: int, tolerance: float = 0.05) -> float:
    """Run ``kernel`` on random rows with and without prefixes, and with one query a row (the
    last layer), against ``varlen_reference`` in fp32; the largest difference. Raises
    RuntimeError if it is over ``tolerance``: a kernel that aligns its causal mask otherwise,
    or maps query heads to other K/V heads, is off by O(1), where 16-bit rounding is ~1e-2."""
    gen = torch.Generator().manual_seed(0)
    prefix, new = [0, 5, 9, 2], [7, 3, 1, 12]
    cu_q = torch.cumsum(torch.tensor([0, *new]), 0)
    cu_k = torch.cumsum(torch.tensor([0, *(p + n for p, n in zip(prefix, new))]), 0)
    q = torch.randn(int(cu_q[-1]), heads, head_dim, generator=gen)
    k, v = (torch.randn(int(cu_k[-1]), kv_heads, head_dim, generator=gen) for _ in range(2))
    last = cu_q[1:] - 1
    cu_last = torch.arange(len(new) + 1)
    max_k = max(p + n for p, n in zip(prefix, new))
    worst = 0.0
    for queries, offsets, max_q in ((q, cu_q, max(new)), (q[last], cu_last, 1)):
        want = varlen_reference(queries, k, v, offsets, cu_k, max_q, max_k)
        got = kernel(queries.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                     offsets.to(device, torch.int32), cu_k.to(device, torch.int32), max_q, max_k)
        worst = max(worst, float((got.float().cpu() - want).abs().max()))
    if not worst <= tolerance:
        raise RuntimeError(f"the variable-length attention kernel disagrees with the reference on {device} "
                           f"(largest difference {worst:.3g}, over {tolerance}): use padded attention")
    return worst


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int) -> torch.Tensor:
    """PyTorch's FlashAttention-2 variable-length kernel (CUDA, bf16/fp16), causal aligned to
    the end of each row's keys; grouped-query heads natively. ``[tokens, heads, dim]``."""
    out: torch.Tensor = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, 0.0, True, False)[0]
    return out


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int) -> torch.Tensor:
    """What ``flash_varlen`` computes, row by row in plain SDPA (any device and dtype): the
    tests' stand-in on the CPU, and the warm-up's check of the kernel on a GPU."""
    del max_q, max_k
    outs = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for r in range(len(bounds_q) - 1):
        qs = q[bounds_q[r]:bounds_q[r + 1]].transpose(0, 1)  # [heads, queries, dim]
        ks, vs = (t[bounds_k[r]:bounds_k[r + 1]].transpose(0, 1) for t in (k, v))
        n_q, n_k = qs.shape[1], ks.shape[1]
        seen = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_q, device=q.device)[:, None] + n_k - n_q
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seen, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


class Qwen3Scorer:
    """Runs the yes/no scoring forward pass with a ``Qwen3ForCausalLM``'s weights."""

    def __init__(self, model: Any, yes_id: int, no_id: int, *, compile: bool = False,
                 attention: Attention | str = Attention.PADDED, varlen_kernel: VarlenKernel | None = None) -> None:
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
        cuda = self.device.type == Device.CUDA
        self.backends = ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if cuda
                         else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        self.fold = self.heads // self.kv_heads if cuda else 1  # query heads per K/V head, or 1
        head = model.get_output_embeddings().weight
        self.yes_no = head[[yes_id, no_id]].detach().float().clone()  # fp32 head rows
        # "varlen": no padded layout, no mask, no scatter (see ``Varlen``); FlashAttention
        # needs CUDA and a 16-bit dtype. ``varlen_kernel`` replaces the kernel (tests run
        # ``varlen_reference`` on the CPU).
        if varlen_kernel is None:  # an injected kernel (the tests' stand-in) runs anywhere
            check_attention(attention, self.device, head.dtype)
        varlen = Attention(attention) is Attention.VARLEN
        self.varlen_kernel: VarlenKernel | None = (varlen_kernel or flash_varlen) if varlen else None
        # The per-token work outside attention (norms, projections, rotary, MLP, residuals)
        # runs as three functions of (layer, tensors). With ``compile`` they go through
        # torch.compile with dynamic token counts: one graph serves all layers and batch
        # sizes, and the norms, rotary and SiLU-gate fuse into a few kernels instead of many
        # (what pays on a GPU, where eager elementwise passes rival the matrix work).
        # ``dynamic=True``: the token count is symbolic from the first call, so no graph is
        # built for the first batch's exact size only (dynamo's default specializes first
        # and recompiles on the second size).
        self.compiled = compile
        self._kv_part: Any = torch.compile(_kv_part, dynamic=True) if compile else _kv_part
        self._q_part: Any = torch.compile(_q_part, dynamic=True) if compile else _q_part
        self._post_part: Any = torch.compile(_post_part, dynamic=True) if compile else _post_part

    @property
    def device(self) -> torch.device:
        device: torch.device = self.inv_freq.device
        return device

    def prefill(self, sequences: list[list[int]], past: KV | None = None) -> list[KV]:
        """Per-layer K/V of each sequence, to serve as a shared prefix later; with ``past``,
        of ``past``'s tokens followed by each sequence (only the sequence is computed)."""
        grouped = Pasts.of([] if past is None else [past], [-1 if past is None else 0] * len(sequences),
                           self.device)
        past_len = 0 if past is None else past.shape[2]
        layout = make_layout([len(s) for s in sequences], [past_len] * len(sequences), self.device, self.fold,
                             varlen_groups=grouped.row_group if self.varlen_kernel else None)
        per_layer: list[torch.Tensor] = []  # [2, tokens, kv_heads, dim] per layer
        self._run(sequences, grouped, layout, per_layer)
        stacked = torch.stack(per_layer)  # [layers, 2, tokens, kv_heads, dim]
        new = torch.split(stacked, layout.lengths, dim=2)
        if past is None:
            return [kv.contiguous() for kv in new]
        return [torch.cat((past, kv), dim=2) for kv in new]

    def score(self, tails: list[list[int]], prefixes: Sequence[KV], row_prefix: Sequence[int]) -> torch.Tensor:
        """``logit_yes - logit_no`` at each row's last token, as float32 ``[rows]``. Row r
        continues ``prefixes[row_prefix[r]]`` (-1: no prefix)."""
        past_lengths = [0 if g < 0 else prefixes[g].shape[2] for g in row_prefix]
        grouped = Pasts.of(prefixes, row_prefix, self.device)
        layout = make_layout([len(t) for t in tails], past_lengths, self.device, self.fold,
                             varlen_groups=grouped.row_group if self.varlen_kernel else None)
        hidden = self._run(tails, grouped, layout, None)
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
        if layout.varlen is not None:
            return h, self._pack_kv(k, layout.varlen, pasts, index, 0), self._pack_kv(v, layout.varlen, pasts, index, 1)
        return h, self._pad_kv(k, layout, pasts, index, 0), self._pad_kv(v, layout, pasts, index, 1)

    @staticmethod
    def _pack_kv(t: torch.Tensor, varlen: Varlen, pasts: Pasts, index: int, which: int) -> torch.Tensor:
        """Keys or values ``[tokens, kv_heads, dim]`` with each row's prefix put before its
        tokens: ``[keys, kv_heads, dim]`` in ``varlen.cu_k`` order."""
        if varlen.key_gather is None:
            return t
        source = torch.cat([t, *(kv[index, which] for kv, _ in pasts.groups)])
        return source.index_select(0, varlen.key_gather)

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
        if layout.varlen is not None and self.varlen_kernel is not None:
            vl = layout.varlen
            out = (self.varlen_kernel(q, k, v, vl.cu_last, vl.cu_k, 1, vl.max_k) if only_last
                   else self.varlen_kernel(q, k, v, vl.cu_q, vl.cu_k, vl.max_q, vl.max_k))
            return out.reshape(-1, self.heads * self.head_dim)
        assert layout.mask is not None and layout.last_mask is not None
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
    row_group: list[int]  # each row's index into ``groups``, -1 for a row without a prefix

    @classmethod
    def of(cls, prefixes: Sequence[KV], row_group: Sequence[int], device: torch.device) -> Pasts:
        rows: list[list[int]] = [[] for _ in prefixes]
        for row, group in enumerate(row_group):
            if group >= 0:
                rows[group].append(row)
        return cls([(kv, to_device(torch.tensor(r), device)) for kv, r in zip(prefixes, rows)], list(row_group))
