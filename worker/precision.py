"""CPU precision modes: fp32, bf16, and an exact mode that runs on the bf16 matrix units.

Current server CPUs multiply bf16 matrices several times faster than fp32 (Intel AMX tiles,
AVX512-BF16), but bf16 activations carry 8 significant bits, so plain bf16 scores leave the
scoring contract's 1e-5 tolerance. The exact mode keeps fp32 activations and splits each one
into bf16-representable parts, ``x = x0 + x1 (+ x2)``: each part times a bf16-exact weight is
an exact product, and oneDNN accumulates them in fp32. Two parts carry 16 significant bits of
each activation, three carry all 24 of fp32's.

The operator: torch's CPU build has no bf16 x bf16 -> fp32 GEMM (``torch.mm(..., out_dtype=
torch.float32)`` is not implemented for the CPU backend in torch 2.13, and a bf16 GEMM rounds
its output to bf16, which would undo the split). What it has is oneDNN's fp32 GEMM with
``fp32_precision="bf16"``: fp32 in and out, operands rounded to bf16 inside the kernel, fp32
accumulation, on the AMX tiles. Rounding an operand that is already bf16-exact loses nothing,
so that kernel computes each split product exactly. The setting is global in torch, so it is
turned on around the split GEMMs only: attention and everything else stay plain fp32.
(Inductor's CPU GEMM template can also write an unrounded fp32 accumulator from bf16
operands; built in as this module's kernel it did not pay end to end: docs/PERFORMANCE.md.)

Qwen3 checkpoints are published in bf16, so their weights are bf16-exact; a weight that is
not is split too (``w = w0 + w1 (+ w2)``), at the cost of more products (``x_i @ w_j`` for
``i + j < parts``) and of holding each weight part.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from worker.types import Precision

log = logging.getLogger(__name__)

Capability = Literal["amx", "avx512_bf16", "none"]
SPLIT_PARTS = {"exact-bf16x2": 2, "exact-bf16x3": 3}
_HIGH_16_BITS = -65536  # 0xFFFF0000 as int32: sign, exponent and the top 7 mantissa bits


def cpu_capability() -> Capability:
    """The CPU's bf16 matrix hardware, best first."""
    try:
        flags: dict[str, Any] = torch._C._cpu._get_cpu_capability()  # private: guarded below
    except (AttributeError, RuntimeError):
        return "none"
    if flags.get("amx_bf16") and flags.get("amx_tile") and torch._C._cpu._init_amx():
        return "amx"
    return "avx512_bf16" if flags.get("avx512_bf16") else "none"


def default_precision(capability: Capability) -> str:
    """The CPU default: float32 on every CPU, measured (docs/PERFORMANCE.md). The exact split
    keeps scores within the contract but did not reliably beat fp32 even on AMX: the only
    operator torch offers converts the fp32 weight to bf16 on every call, so one split GEMM
    runs at ~2.5-3x the fp32 rate and three parts cost three of them. ``capability`` is
    logged so the choice can be revisited per CPU."""
    return "float32"


@dataclass(frozen=True)
class Plan:
    """What the runner loads (``dtype``) and does to the model once loaded (``apply``)."""

    dtype: str | None
    parts: int = 0

    def apply(self, model: Any) -> None:
        """Split the decoder layers' linear layers (not the vocabulary head, whose two scored
        rows the scorer reads in fp32)."""
        if self.parts:
            count = split_linears(model.model.layers, self.parts)
            log.info("exact split precision: %d linear layers as %d bf16 parts", count, self.parts)


def resolve(precision: str | None, dtype: str | None, device: torch.device) -> Plan:
    """An explicit ``dtype`` wins over ``precision`` (and means no split); ``auto`` (or None)
    picks by CPU capability; the choice is logged."""
    if precision is not None and precision not in Precision.__members__.values():
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(Precision)}")
    if dtype is not None or device.type != "cpu":
        return Plan(dtype)
    capability = cpu_capability()
    auto = precision in (None, "auto")
    chosen = default_precision(capability) if auto else str(precision)
    log.info("CPU bf16 matrix units: %s; precision %s%s", capability, chosen, " (auto)" if auto else "")
    if chosen in SPLIT_PARTS:
        return Plan("float32", SPLIT_PARTS[chosen])
    return Plan(chosen)


def _bf16_exact(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 or torch.equal(t.bfloat16().float(), t.float())


@contextmanager
def bf16_matmul() -> Iterator[None]:
    """oneDNN fp32 GEMMs with bf16 operands and fp32 accumulation, for this block only."""
    matmul: Any = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # not in torch's stubs
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def split_bf16(x: torch.Tensor, parts: int) -> torch.Tensor:
    """fp32 ``x`` as ``parts`` stacked fp32 tensors ``[parts, *x.shape]`` that sum to it, each
    but the last truncated to bf16's 8 significant bits (a bit mask: exact, one pass). The
    last holds the remainder: with three parts that is at most 8 bits, so bf16 holds all of
    x; with two, the kernel's rounding of it to bf16 loses bits 17-24."""
    out = x.new_empty(parts, *x.shape)
    rest = x
    for part in range(parts - 1):
        torch.bitwise_and(rest.view(torch.int32), _HIGH_16_BITS, out=out[part].view(torch.int32))
        rest = torch.sub(rest, out[part], out=out[-1])  # elementwise: safe in place
    return out


class SplitLinear(nn.Module):
    """``nn.Linear`` in fp32, computed as split bf16 products on the matrix units."""

    def __init__(self, linear: nn.Linear, parts: int) -> None:
        super().__init__()
        if parts < 2:
            raise ValueError("a split needs at least two parts")
        self.parts = parts
        # a bf16-exact weight (Qwen3's published ones) is one part; any other is split like
        # the activations, and the products x_i @ w_j with i + j < parts are summed
        weight = linear.weight.detach().float()
        if _bf16_exact(weight):
            parts_of_weight = [weight]  # the loaded tensor itself: no copy
        else:
            split = split_bf16(weight, parts)
            used = next((n for n in range(parts, 1, -1) if bool(split[n - 1].any())), 1)
            parts_of_weight = [w.clone() for w in split[:used]]  # not views: the rest is freed
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in parts_of_weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        pieces = split_bf16(rows, self.parts)
        out = None
        with bf16_matmul():  # the parts stacked: one GEMM a weight part, more rows for the tiles
            for j, weight in enumerate(self.weights):
                used = self.parts - j
                products = F.linear(pieces[:used].view(-1, self.in_features), weight)
                total = products.view(used, len(rows), -1).sum(0)
                out = total if out is None else out.add_(total)
        assert out is not None
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts}, "
                f"weight_parts={len(self.weights)}")


def split_linears(module: nn.Module, parts: int) -> int:
    """Swap every ``nn.Linear`` under ``module`` for a ``SplitLinear``; how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, SplitLinear(child, parts))
            swapped += 1
        else:
            swapped += split_linears(child, parts)
    return swapped
