"""A scoring-only forward pass over a loaded ``Qwen3ForCausalLM``'s own modules.

The reference is ``model(input_ids).logits[:, -1, [no, yes]]``. This computes the same
numbers and skips everything a reranker does not need:

* no padding in the matrix work: every linear layer and MLP runs on the batch's tokens
  packed into one ``[tokens, hidden]`` matrix; only attention sees a layout of its own, one
  of the three strategies of ``worker.attention`` (padded, varlen, rows);
* a shared prefix (system prompt + instruction + query) is computed once (``prefill``)
  and passed to ``score`` as per-layer K/V; each row's positions continue from its own
  prefix length;
* the last layer computes queries, attention and MLP for the last position only, and the
  head is the two LM-head rows for ``yes`` and ``no``: no vocabulary-sized logits anywhere;
* a row too long for one batch's time is *walked* (``begin``, ``walk``, ``finish``): layer by
  layer, each layer in blocks of its tokens, so the batches it is split across each run a
  slice of it and it holds only two layers' activations and one layer's K/V in between.

The module list, norms, projections, MLPs and rotary frequencies are the checkpoint's, so
this stays exact for every Qwen3 size (0.6B, 4B, 8B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel

from worker.attention import (
    KV,
    AttentionStrategy,
    PaddedAttention,
    Pasts,
    RowsAttention,
    VarlenAttention,
    VarlenKernel,
    check_attention,
    flash_varlen,
    to_device,
)
from worker.types import Attention


class Qwen3Scorer:
    """Runs the yes/no scoring forward pass with a ``Qwen3ForCausalLM``'s weights: ``prefill``
    computes prefixes' K/V, ``score`` rows' log-odds on top of them."""

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
        head = model.get_output_embeddings().weight
        self.yes_no = head[[yes_id, no_id]].detach().float().clone()  # fp32 head rows
        # ``varlen_kernel`` replaces FlashAttention (tests run ``varlen_reference`` on the CPU)
        if varlen_kernel is None:  # an injected kernel (the tests' stand-in) runs anywhere
            check_attention(attention, self.device, head.dtype)
        kind = Attention(attention)
        self.attention: AttentionStrategy[Any, Any] = (
            VarlenAttention(varlen_kernel or flash_varlen, self.heads, self.head_dim) if kind is Attention.VARLEN
            else RowsAttention(self.heads, self.head_dim) if kind is Attention.ROWS
            else PaddedAttention(self.heads, self.kv_heads, self.head_dim, self.device))
        # a walk's yardstick (``walk``): a token at position t costs a layer ``1 + t / pair_tokens``
        # (its dense work, and attention over t keys as a dense token's share), the last layer's
        # K/V alone ``kv_share`` of it; from the config, as a split-precision layer's modules
        # hold their weights in parts
        hidden, kv = config.hidden_size, 2 * config.hidden_size * self.kv_heads * self.head_dim
        dense = 2 * hidden * self.heads * self.head_dim + kv + 3 * hidden * config.intermediate_size
        self.pair_tokens: float = dense / (2 * self.heads * self.head_dim)
        self.kv_share: float = kv / dense
        # The per-token work outside attention (norms, projections, rotary, MLP, residuals)
        # runs as three functions of (layer, tensors). With ``compile`` they go through
        # torch.compile with dynamic token counts: one graph serves all layers and batch
        # sizes, and the norms, rotary and SiLU-gate fuse into a few kernels instead of many
        # (what pays on a GPU, where eager elementwise passes rival the matrix work).
        # ``dynamic=True``: the token count is symbolic from the first call, so no graph is
        # built for the first batch's exact size only (dynamo's default specializes first
        # and recompiles on the second size).
        self.compiled = False
        self._kv_part: Any = _kv_part
        self._q_part: Any = _q_part
        self._post_part: Any = _post_part
        if compile:
            self.compile()

    def compile(self, on: bool = True) -> None:
        """The three per-token parts through torch.compile (built on their first call), or back
        to eager (``on=False``: where the compiler cannot build them)."""
        self.compiled = on
        self._kv_part, self._q_part, self._post_part = (
            torch.compile(part, dynamic=True) if on else part for part in (_kv_part, _q_part, _post_part))

    @property
    def device(self) -> torch.device:
        device: torch.device = self.inv_freq.device
        return device

    def prefill(self, sequences: list[list[int]], past: KV | None = None) -> list[KV]:
        """Per-layer K/V of each sequence, to serve as a shared prefix later; with ``past``,
        of ``past``'s tokens followed by each sequence (only the sequence is computed)."""
        pasts = Pasts.of([] if past is None else [past], [-1 if past is None else 0] * len(sequences), self.device)
        x, cos, sin, layout = self._embed(sequences, pasts)
        per_layer: list[torch.Tensor] = []  # [2, tokens, kv_heads, dim] per layer
        with sdpa_kernel(self.attention.backends):
            for i, layer in enumerate(self.layers):
                h, k, v = self._kv_part(layer, x, cos, sin, self.kv_heads, self.head_dim)
                per_layer.append(torch.stack((k, v)))
                if i + 1 < len(self.layers):  # a prefix needs the last layer's K/V, never its output
                    x = self._attend_and_mix(layer, x, h, k, v, cos, sin, layout, pasts, i, only_last=False)
        new = torch.split(torch.stack(per_layer), [len(s) for s in sequences], dim=2)
        if past is None:
            return [kv.contiguous() for kv in new]
        return [torch.cat((past, kv), dim=2) for kv in new]

    def score(self, tails: list[list[int]], prefixes: Sequence[KV], row_prefix: Sequence[int]) -> torch.Tensor:
        """``logit_yes - logit_no`` at each row's last token, as float32 ``[rows]``. Row r
        continues ``prefixes[row_prefix[r]]`` (-1: no prefix)."""
        pasts = Pasts.of(prefixes, row_prefix, self.device)
        x, cos, sin, layout = self._embed(tails, pasts)
        last = len(self.layers) - 1
        with sdpa_kernel(self.attention.backends):
            for i, layer in enumerate(self.layers):
                h, k, v = self._kv_part(layer, x, cos, sin, self.kv_heads, self.head_dim)
                x = self._attend_and_mix(layer, x, h, k, v, cos, sin, layout, pasts, i, only_last=i == last)
        yes_no = self.model.norm(x).float() @ self.yes_no.T
        diff: torch.Tensor = yes_no[:, 0] - yes_no[:, 1]
        return diff

    def begin(self, ids: list[int], past: KV | None) -> Walk:
        """A row's walk, before its first block: ``ids`` continue ``past`` (None: no prefix)."""
        x = self.model.embed_tokens(to_device(torch.tensor(ids, dtype=torch.long), self.device))
        length = 0 if past is None else past.shape[2]
        kv = x.new_empty((2, length + len(ids), self.kv_heads, self.head_dim))
        if past is not None:
            kv[:, :length] = past[0]
        return Walk(len(ids), len(self.layers) - 1, past, length, x, torch.empty_like(x), kv)

    def walk(self, state: Walk, done: int) -> None:
        """Walk on until the row has had the work of its first ``done`` own tokens run whole
        (layers 0 .. L-2 in full, then the last one's K/V, weighted as ``pair_tokens`` says),
        whole blocks at a time; the row's very last step is ``finish``'s."""
        layer = self._token_work(state, 0, state.own)
        total = state.last * layer + self.kv_share * (state.own - 1)
        target = total * min(1.0, self._token_work(state, 0, done) / layer)
        with torch.inference_mode(), sdpa_kernel(self.attention.backends):
            while state.work < target and state.unwalked:
                end = self._block_end(state, target - state.work)
                state.work += self._step(state, end)

    def finish(self, state: Walk) -> float:
        """The rest of the walk, and the row's ``logit_yes - logit_no``."""
        with torch.inference_mode(), sdpa_kernel(self.attention.backends):
            while state.unwalked:
                self._step(state, state.own - 1 if state.layer == state.last else state.own)
            x = self._walk_block(state, state.own - 1, state.own, only_last=True)
        yes_no = self.model.norm(x).float() @ self.yes_no.T
        return float(yes_no[0, 0] - yes_no[0, 1])

    def _token_work(self, state: Walk, start: int, end: int) -> float:
        """A layer's work on own tokens [start, end), in dense tokens."""
        a, b = state.past_len + start, state.past_len + end
        return (b - a) + (b * b - a * a) / (2 * self.pair_tokens)

    def _block_end(self, state: Walk, need: float) -> int:
        """Where the block from ``state.done`` ends so that it does about ``need`` work."""
        if state.layer == state.last:
            return min(state.own - 1, state.done + max(1, math.ceil(need / self.kv_share)))
        a, p = state.past_len + state.done, self.pair_tokens
        end = math.ceil(math.sqrt((p + a) ** 2 + 2 * p * need) - p) - state.past_len
        return min(state.own, max(state.done + 1, end))

    def _step(self, state: Walk, end: int) -> float:
        """Own tokens [done, end) through the current layer (the last: their K/V only); the
        layer, once done, hands its output on. The work done, as ``walk`` weighs it."""
        start, layer = state.done, state.layer
        if layer == state.last:
            self._walk_block(state, start, end, only_last=None)
            work = self.kv_share * (end - start)
        else:
            state.y[start:end] = self._walk_block(state, start, end, only_last=False)
            work = self._token_work(state, start, end)
        state.done = end
        if end == state.own and layer < state.last:
            state.x, state.y, state.layer, state.done = state.y, state.x, layer + 1, 0
            if state.past is not None:
                state.kv[:, :state.past_len] = state.past[layer + 1]
        return work

    def _walk_block(self, state: Walk, start: int, end: int, only_last: bool | None) -> torch.Tensor:
        """One block of the current layer: its K/V into the layer's, then (``only_last`` not
        None) its attention over every earlier key and the MLP."""
        before = state.past_len + start
        past = [state.kv[None, :, :before]] if before else []
        pasts = Pasts.of(past, [0 if before else -1], self.device)
        x = state.x[start:end]
        layout = self.attention.layout([end - start], pasts, self.device)
        cos, sin = self._rotary(layout.positions, x.dtype)
        layer = self.layers[state.layer]
        h, k, v = self._kv_part(layer, x, cos, sin, self.kv_heads, self.head_dim)
        state.kv[0, before:before + end - start], state.kv[1, before:before + end - start] = k, v
        if only_last is None:
            return x
        return self._attend_and_mix(layer, x, h, k, v, cos, sin, layout, pasts, 0, only_last=only_last)

    def _embed(self, tokens: list[list[int]], pasts: Pasts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """The packed tokens' embeddings, rotary tables and the attention's layout."""
        layout = self.attention.layout([len(t) for t in tokens], pasts, self.device)
        ids = to_device(torch.tensor([t for seq in tokens for t in seq], dtype=torch.long), self.device)
        x: torch.Tensor = self.model.embed_tokens(ids)
        cos, sin = self._rotary(layout.positions, x.dtype)
        return x, cos, sin, layout

    def _attend_and_mix(self, layer: Any, x: torch.Tensor, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, layout: Any, pasts: Pasts, index: int,
                        only_last: bool) -> torch.Tensor:
        """The rest of one decoder layer after its K/V: queries, attention, the MLP. With
        ``only_last``, for each row's last position only (all the head reads)."""
        kv = self.attention.keys_values(k, v, layout, pasts, index)
        if only_last:
            x, h, cos, sin = (t[layout.last_index] for t in (x, h, cos, sin))
        q = self._q_part(layer, h, cos, sin, self.heads, self.head_dim)
        x_next: torch.Tensor = self._post_part(layer, x, self.attention.attend(q, kv, layout, only_last))
        return x_next

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


@dataclass(eq=False, slots=True)
class Walk:
    """A row being walked (``Qwen3Scorer.begin``): where it stands, and what it holds between
    the batches it is split across: two layers' activations and the current layer's K/V."""

    own: int  # the row's own tokens (after its prefix)
    last: int  # the model's last layer
    past: KV | None  # the prefix's K/V, every layer
    past_len: int
    x: torch.Tensor  # [own, hidden]: the current layer's input
    y: torch.Tensor  # [own, hidden]: its output, as far as ``done``
    kv: torch.Tensor  # [2, past_len + own, kv_heads, dim]: the current layer's keys and values
    layer: int = 0
    done: int = 0  # own tokens through the current layer
    work: float = 0.0  # as ``Qwen3Scorer.walk`` weighs it

    @property
    def unwalked(self) -> bool:
        """Whether blocks are left before the last layer's last token (``finish``'s)."""
        return self.layer < self.last or self.done < self.own - 1


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
