"""How attention sees a packed batch: the layouts, and three strategies behind ``AttentionStrategy``.

``PaddedAttention`` (every device) pads rows and masks them explicitly, so neither padding
side nor position ids can leak; ``VarlenAttention`` (CUDA, bf16/fp16) pads nothing:
FlashAttention's variable-length kernel over packed queries and packed [prefix; new] keys;
``RowsAttention`` (the CPU's default) pads nothing either: the CPU flash kernel once a row,
causal, and once a distinct prefix for all its rows, the two merged by their log-sum-exp.
The model that uses them is ``worker.qwen3.Qwen3Scorer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from worker.types import Attention, Device

KV = torch.Tensor  # one prefix's keys and values: [layers, 2, length, kv_heads, head_dim]


@dataclass(frozen=True)
class Layout:
    """Where each row's tokens sit in the packed and padded views of one forward pass
    (``PaddedAttention``)."""

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


@dataclass(frozen=True)
class VarlenLayout:
    """Packed tokens and their offsets for ``VarlenAttention``: nothing is padded."""

    positions: torch.Tensor  # [tokens] rotary position of each packed token
    last_index: torch.Tensor  # [rows] packed index of each row's last token
    offsets: Varlen


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without stalling the host: from pinned memory, asynchronously, on a
    GPU (a pageable copy waits for all queued GPU work first)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _token_map(lengths: list[int], past_lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """Host-side: (new tokens per row, prefix tokens per row, each token's row, each row's
    first packed index, each token's offset within its row)."""
    lens, pasts = torch.tensor(lengths), torch.tensor(past_lengths)
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), lens)
    starts = torch.cumsum(lens, 0) - lens
    return lens, pasts, row_of, starts, torch.arange(int(lens.sum())) - starts[row_of]


def make_layout(lengths: list[int], past_lengths: list[int], device: torch.device, fold: int = 1) -> Layout:
    rows, max_len, past_max = len(lengths), max(lengths), max(past_lengths)
    width = past_max + max_len
    lens, pasts, row_of, starts, offset = _token_map(lengths, past_lengths)
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


@dataclass(frozen=True)
class RowsLayout:
    """Packed tokens and where each row and each prefix's rows sit in them (``RowsAttention``)."""

    positions: torch.Tensor  # [tokens] rotary position of each packed token
    last_index: torch.Tensor  # [rows] packed index of each row's last token
    bounds: list[tuple[int, int]]  # each row's [start, end) in the packed tokens
    # per ``Pasts.groups`` entry: its rows' tokens, and its rows (the last layer's queries),
    # as a slice where they are contiguous (a view, no copy), else as an index; None: no rows
    group_tokens: list[slice | torch.Tensor | None]
    group_rows: list[slice | torch.Tensor | None]


def check_attention(attention: Attention | str, device: torch.device, dtype: torch.dtype) -> Attention:
    """The attention kind, if it can run here; ValueError if not: FlashAttention needs CUDA
    and 16 bits, the row kernel a CPU."""
    try:
        kind = Attention(attention)
    except ValueError:
        raise ValueError(f"attention must be one of {', '.join(Attention)}, not {attention!r}") from None
    if kind is Attention.ROWS and device.type != Device.CPU:
        raise ValueError(f"rows attention runs the CPU's flash kernel: it needs the CPU, not {device.type}; "
                         "use padded attention")
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
        indices = [to_device(torch.tensor(r, dtype=torch.long), device) for r in rows]  # long: also when empty
        return cls(list(zip(prefixes, indices)), list(row_group))

    def lengths(self) -> list[int]:
        return [0 if g < 0 else self.groups[g][0].shape[2] for g in self.row_group]


L = TypeVar("L", Layout, VarlenLayout, RowsLayout)
KVs = TypeVar("KVs")
KeysValues = tuple[torch.Tensor, torch.Tensor]  # [keys, values], laid out as the strategy's kernel reads them
RowsKeysValues = tuple[torch.Tensor, torch.Tensor, list[KeysValues]]  # own K, own V, each prefix's


class AttentionStrategy(Protocol[L, KVs]):
    """One way to run a batch's attention: the layout of its rows, where each layer's keys
    and values (the rows' own and their prefix's) go, and the kernel over them."""

    kind: Attention
    backends: list[SDPBackend]  # what SDPA may choose from during the forward pass

    def layout(self, lengths: list[int], pasts: Pasts, device: torch.device) -> L: ...

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, layout: L, pasts: Pasts, layer: int) -> KVs: ...

    def attend(self, q: torch.Tensor, kv: KVs, layout: L,
               only_last: bool) -> torch.Tensor: ...  # [tokens or rows, heads * dim]


class PaddedAttention:  # implements AttentionStrategy[Layout, KeysValues]
    """Masked SDPA over rows padded to the longest, prefix K/V before each row's own.

    On CUDA, the memory-efficient kernel: it takes an arbitrary mask at a few microseconds
    of host time a call, where cuDNN's (PyTorch's first choice for bf16 on Hopper) spent
    ~3.7 ms of host time a call and left the GPU waiting (measured: docs/PERFORMANCE.md).
    It has no grouped-query support, so the query heads of each K/V head are folded onto
    the query axis there (``fold``). The CPU's flash kernel groups natively; folding would
    only double its mask (a max-length document's mask is ~0.7 GB in fp32)."""

    kind = Attention.PADDED

    def __init__(self, heads: int, kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        cuda = device.type == Device.CUDA
        self.backends = ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if cuda
                         else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        self.fold = heads // kv_heads if cuda else 1  # query heads per K/V head, or 1

    def layout(self, lengths: list[int], pasts: Pasts, device: torch.device) -> Layout:
        return make_layout(lengths, pasts.lengths(), device, self.fold)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, layout: Layout, pasts: Pasts,
                    layer: int) -> KeysValues:
        """K and V ``[tokens, kv_heads, dim]`` copied once into their padded slots, after each
        row's prefix: ``[rows, kv_heads, past_max + max_len, dim]`` each, views of
        sequence-major memory (the layout the attention kernels read natively)."""
        padded = k.new_zeros(2, layout.rows, layout.past_max + layout.max_len, self.kv_heads, self.head_dim)
        for slots, new in zip(padded, (k, v)):
            slots.view(-1, self.kv_heads, self.head_dim).index_copy_(0, layout.key_slot, new)
        for kv, row_index in pasts.groups:  # one copy per distinct prefix, broadcast to its rows
            padded[:, row_index, : kv.shape[2]] = kv[layer][:, None]
        keys, values = padded.transpose(2, 3)
        return keys, values

    def attend(self, q: torch.Tensor, kv: KeysValues, layout: Layout, only_last: bool) -> torch.Tensor:
        """Packed queries ``[tokens, heads, dim]`` over padded K/V, ``fold`` query heads a K/V
        head folded onto the query axis (see ``Layout.mask``); the rest, if any, grouped by
        the kernel."""
        k, v = kv
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


class VarlenAttention:  # implements AttentionStrategy[VarlenLayout, KeysValues]
    """A variable-length kernel (FlashAttention's, or a stand-in) over packed queries and
    packed [prefix; new] keys: no padding, no mask, no scatter (see ``Varlen``)."""

    kind = Attention.VARLEN

    def __init__(self, kernel: VarlenKernel, heads: int, head_dim: int) -> None:
        self.kernel, self.heads, self.head_dim = kernel, heads, head_dim
        self.backends = [SDPBackend.MATH]  # SDPA runs only in a stand-in kernel: the plain one

    def layout(self, lengths: list[int], pasts: Pasts, device: torch.device) -> VarlenLayout:
        past_lengths = pasts.lengths()
        lens, past, row_of, starts, offset = _token_map(lengths, past_lengths)
        small = to_device(torch.cat((past[row_of] + offset, starts + lens - 1)), device)
        positions, last_index = torch.split(small, [len(offset), len(lengths)])
        return VarlenLayout(positions, last_index, make_varlen(lengths, past_lengths, pasts.row_group, device))

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout, pasts: Pasts,
                    layer: int) -> KeysValues:
        """K and V ``[keys, kv_heads, dim]`` with each row's prefix put before its tokens, in
        ``Varlen.cu_k`` order."""
        gather = layout.offsets.key_gather
        if gather is None:
            return k, v
        prefix_k, prefix_v = zip(*(kv[layer].unbind() for kv, _ in pasts.groups))
        return (torch.cat((k, *prefix_k)).index_select(0, gather),
                torch.cat((v, *prefix_v)).index_select(0, gather))

    def attend(self, q: torch.Tensor, kv: KeysValues, layout: VarlenLayout, only_last: bool) -> torch.Tensor:
        k, v = kv
        o = layout.offsets
        out = (self.kernel(q, k, v, o.cu_last, o.cu_k, 1, o.max_k) if only_last
               else self.kernel(q, k, v, o.cu_q, o.cu_k, o.max_q, o.max_k))
        return out.reshape(-1, self.heads * self.head_dim)


class RowsAttention:  # implements AttentionStrategy[RowsLayout, RowsKeysValues]
    """The CPU flash kernel with nothing padded and no mask (the CPU has no variable-length
    kernel, and a masked padded call computes every padded and every masked-out pair).

    Attention over [prefix; own tokens] splits exactly in two: a row's queries over its own
    keys, which is plain top-left causal attention (queries and keys are the same tokens),
    one call a row on views of the packed tensors; and the same queries over the prefix's
    keys, which every query sees whole, one unmasked call a distinct prefix for all the rows
    that continue it (no K/V copied out per row). Each call also returns its log-sum-exp, and
    the two softmax halves merge exactly: ``own + sigmoid(lse_prefix - lse_own) * (prefix -
    own)``, in place, in the activations' dtype. Each call costs ~0.1 ms of kernel set-up, so
    batches of many tiny or even rows can run up to ~4% faster padded (docs/PERFORMANCE.md)."""

    kind = Attention.ROWS

    def __init__(self, heads: int, head_dim: int) -> None:
        self.heads, self.head_dim = heads, head_dim
        self.backends = [SDPBackend.FLASH_ATTENTION]  # the op is called directly; SDPA is not

    def layout(self, lengths: list[int], pasts: Pasts, device: torch.device) -> RowsLayout:
        lens, past, row_of, starts, offset = _token_map(lengths, pasts.lengths())
        small = to_device(torch.cat((past[row_of] + offset, starts + lens - 1)), device)
        positions, last_index = torch.split(small, [len(offset), len(lengths)])
        bounds = [(s, s + n) for s, n in zip(starts.tolist(), lengths)]
        group_tokens: list[slice | torch.Tensor | None] = []
        group_rows: list[slice | torch.Tensor | None] = []
        for group in range(len(pasts.groups)):
            rows = [r for r, g in enumerate(pasts.row_group) if g == group]
            if not rows:
                group_tokens.append(None)
                group_rows.append(None)
            elif rows == list(range(rows[0], rows[-1] + 1)):
                group_tokens.append(slice(bounds[rows[0]][0], bounds[rows[-1]][1]))
                group_rows.append(slice(rows[0], rows[-1] + 1))
            else:
                group_tokens.append(to_device(torch.cat([torch.arange(*bounds[r]) for r in rows]), device))
                group_rows.append(pasts.groups[group][1])
        return RowsLayout(positions, last_index, bounds, group_tokens, group_rows)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, layout: RowsLayout, pasts: Pasts,
                    layer: int) -> RowsKeysValues:
        """The rows' own K and V as computed (packed ``[tokens, kv_heads, dim]``), and each
        prefix's for this layer as ``[1, kv_heads, length, dim]`` views: nothing copied."""
        return k, v, [(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None])
                      for kv, _ in pasts.groups]

    def attend(self, q: torch.Tensor, kv: RowsKeysValues, layout: RowsLayout, only_last: bool) -> torch.Tensor:
        k, v, prefixes = kv
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        outs, lses = [], []
        for row, (start, end) in enumerate(layout.bounds):
            keys, values = (t[start:end].transpose(0, 1)[None] for t in (k, v))
            # the last layer: one query a row, its last token, which sees all its own keys
            queries = q[row:row + 1] if only_last else q[start:end]
            out, lse = flash(queries.transpose(0, 1)[None], keys, values, 0.0, not only_last)
            outs.append(out[0].transpose(0, 1))  # [queries, heads, dim]
            lses.append(lse[0].transpose(0, 1))  # [queries, heads], fp32
        own = torch.cat(outs)
        if prefixes:
            own_lse = torch.cat(lses)
            for (keys, values), sel in zip(prefixes, layout.group_rows if only_last else layout.group_tokens):
                if sel is None:
                    continue
                out, lse = flash(q[sel].transpose(0, 1)[None], keys, values, 0.0, False)
                # the prefix's share of each query's softmax mass, from the two log-sum-exps
                weight = torch.sigmoid(lse[0].transpose(0, 1) - own_lse[sel]).to(own.dtype)[..., None]
                if isinstance(sel, slice):  # a view: blended in place, one pass
                    own[sel].lerp_(out[0].transpose(0, 1), weight)
                else:
                    own[sel] = own[sel].lerp_(out[0].transpose(0, 1), weight)
        return own.reshape(-1, self.heads * self.head_dim)
