"""CPU precision modes: fp32, bf16, and an exact mode that runs on the bf16 matrix units.

Current server CPUs multiply bf16 matrices several times faster than fp32 (Intel AMX tiles,
AVX512-BF16), but bf16 activations carry 8 significant bits, so plain bf16 scores leave the
scoring contract's 1e-5 tolerance. The exact mode keeps fp32 activations and splits each one
into bf16-representable parts, ``x = x0 + x1 (+ x2)``: each part times a bf16-exact weight is
an exact product, and oneDNN accumulates them in fp32. Two parts carry 16 significant bits of
each activation, three carry all 24 of fp32's.

The operator (``Kernel``). torch's CPU build has no eager bf16 x bf16 -> fp32 GEMM
(``torch.mm(..., out_dtype=torch.float32)`` is not implemented for the CPU backend in torch
2.13, and an eager bf16 GEMM rounds its output to bf16, which would undo the split). Two
routes reach the matrix units with fp32 accumulation and an unrounded fp32 result:

* ``"template"`` (the default on AMX): inductor's CPU GEMM template, whose AMX micro-kernel
  accumulates bf16 products in fp32 and, with the ``.float()`` fused as its epilogue, writes
  that accumulator out as fp32. The parts sit side by side along K (``[x0 | x1 | x2]`` against
  ``[W | W | W]``), so one GEMM sums them inside the kernel. The template needs the weight as a
  constant (inductor's freezing prepacks it), so every linear layer is a compiled graph of its
  own, built on its first call (the runner's warm-up: ~0.3 s a layer after the first of each
  shape), and each one's first result is checked against float64 arithmetic before any score
  depends on it (``TEMPLATE_TOLERANCE``: a rounded output is ~1e-3 off).
* ``"fpmath"``: oneDNN's fp32 GEMM with ``fp32_precision="bf16"``: fp32 in and out, operands
  rounded to bf16 inside the kernel, fp32 accumulation. Rounding an operand that is already
  bf16-exact loses nothing, so it computes each split product exactly, but it converts the
  fp32 weight to bf16 on every call, which makes it slower than plain fp32 (docs/PERFORMANCE.md).
  The setting is global in torch, so it is turned on around the split GEMMs only. It is the
  fallback where the template cannot be built (no C++ compiler, a failed check).

Attention and everything but the decoder's linear layers stay plain fp32.

Qwen3 checkpoints are published in bf16, so their weights are bf16-exact; a weight that is
not is split too (``w = w0 + w1 (+ w2)``), at the cost of more products (``x_i @ w_j`` for
``i + j < parts``) and of holding each weight part.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from worker.types import PRECISIONS

log = logging.getLogger(__name__)

Capability = Literal["amx", "avx512_bf16", "none"]
Kernel = Literal["template", "fpmath"]
SPLIT_PARTS = {"exact-bf16x2": 2, "exact-bf16x3": 3}
_HIGH_16_BITS = -65536  # 0xFFFF0000 as int32: sign, exponent and the top 7 mantissa bits
# A compiled split GEMM's first result against float64, relative to its largest value: fp32
# accumulation of exact products is ~1e-7 (three parts) to ~5e-6 (two); an output rounded to
# bf16 anywhere (a fallback to eager, an unfused cast) is ~1e-3.
TEMPLATE_TOLERANCE = 1e-4
_TEMPLATE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "max_autotune": True, "max_autotune_gemm_backends": "CPP"}


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


def default_kernel(capability: Capability) -> Kernel:
    """The split GEMM's operator: inductor's template where its AMX micro-kernel runs, else
    oneDNN's fpmath (the template's non-AMX micro-kernels convert bf16 to fp32 first)."""
    return "template" if capability == "amx" else "fpmath"


@dataclass(frozen=True)
class Plan:
    """What the runner loads (``dtype``) and does to the model once loaded (``apply``)."""

    dtype: str | None
    parts: int = 0
    kernel: Kernel = "fpmath"

    def apply(self, model: Any) -> None:
        """Split the decoder layers' linear layers (not the vocabulary head, whose two scored
        rows the scorer reads in fp32)."""
        if self.parts:
            count = split_linears(model.model.layers, self.parts, self.kernel)
            log.info("exact split precision: %d linear layers as %d bf16 parts, %s kernel%s", count,
                     self.parts, self.kernel, " (each compiles on its first call: the warm-up)"
                     if self.kernel == "template" else "")


def resolve(precision: str | None, dtype: str | None, device: torch.device) -> Plan:
    """An explicit ``dtype`` wins over ``precision`` (and means no split); ``auto`` (or None)
    picks by CPU capability; the choice is logged."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if dtype is not None or device.type != "cpu":
        return Plan(dtype)
    capability = cpu_capability()
    auto = precision in (None, "auto")
    chosen = default_precision(capability) if auto else str(precision)
    log.info("CPU bf16 matrix units: %s; precision %s%s", capability, chosen, " (auto)" if auto else "")
    if chosen in SPLIT_PARTS:
        return Plan("float32", SPLIT_PARTS[chosen], default_kernel(capability))
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
    """``nn.Linear`` in fp32, computed as split bf16 products on the matrix units (``kernel``:
    see the module's docstring)."""

    def __init__(self, linear: nn.Linear, parts: int, kernel: Kernel = "fpmath") -> None:
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
        self.kernel: Kernel = kernel
        self._gemm: Any = None  # the template's compiled graph, built on the first call
        if kernel == "template":
            # the products as one GEMM: activation part i against weight part j, side by side along K
            self._pairs = [(i, j) for j in range(len(parts_of_weight)) for i in range(parts - j)]
            stacked = torch.cat([parts_of_weight[j] for _, j in self._pairs], dim=1).bfloat16()
            self._gemm = torch.compile(_SplitGemm(stacked, [i for i, _ in self._pairs], parts), dynamic=True,
                                       options=_TEMPLATE_OPTIONS)
            self.weights = nn.ParameterList()  # the compiled graph holds the weight, prepacked
            self._unchecked: torch.Tensor | None = stacked  # for ``_check``, then dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = self._fpmath(rows) if self._gemm is None else self._template(rows)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _fpmath(self, rows: torch.Tensor) -> torch.Tensor:
        pieces = split_bf16(rows, self.parts)
        out = None
        with bf16_matmul():  # the parts stacked: one GEMM a weight part, more rows for the tiles
            for j, weight in enumerate(self.weights):
                used = self.parts - j
                products = F.linear(pieces[:used].view(-1, self.in_features), weight)
                total = products.view(used, len(rows), -1).sum(0)
                out = total if out is None else out.add_(total)
        assert out is not None
        return out

    def _template(self, rows: torch.Tensor) -> torch.Tensor:
        single = len(rows) == 1  # one row would be a graph of its own (dynamo specializes 1): pad
        padded = torch.cat((rows, rows.new_zeros(1, self.in_features))) if single else rows
        unchecked = self._unchecked
        try:
            # read when a graph is built, so set for these graphs only; the prepacked weight
            # replaces the module's, which is discarded (the graph never runs eager)
            with inductor_config.patch(freezing=True, freezing_discard_parameters=True):
                out: torch.Tensor = self._gemm(padded)
            if single:
                out = out[:1]
            if unchecked is not None:
                self._check(rows, out, unchecked)
        except Exception as exc:  # noqa: BLE001 - any failure to build it: the exact fallback
            if unchecked is None:
                raise  # it was built and checked: a failure now is the batch's, not the kernel's
            self._fall_back(unchecked, exc)
            return self._fpmath(rows)
        self._unchecked = None
        return out

    def _check(self, rows: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> None:
        """The compiled graph's first result against float64 arithmetic (``TEMPLATE_TOLERANCE``)."""
        stacked = weight.double()
        k = self.in_features
        exact = sum(F.linear(split_bf16(rows, self.parts)[i].double(), stacked[:, n * k:(n + 1) * k])
                    for n, (i, _) in enumerate(self._pairs))
        assert isinstance(exact, torch.Tensor)
        err = float((out.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30))
        if not err <= TEMPLATE_TOLERANCE:
            raise RuntimeError(f"the compiled split GEMM is {err:.2g} off exact arithmetic (over "
                               f"{TEMPLATE_TOLERANCE}): its output was rounded")

    def _fall_back(self, stacked: torch.Tensor, why: Exception) -> None:
        """This layer on the fpmath kernel from now on: as exact, slower (see the module)."""
        log.warning("the compiled split GEMM of a %dx%d layer cannot be used (%s: %s); this layer falls back "
                    "to the fpmath kernel, as exact and slower", self.in_features, self.out_features,
                    type(why).__name__, str(why).splitlines()[0][:200] if str(why) else "")
        k = self.in_features
        first = {j: n for n, (_, j) in reversed(list(enumerate(self._pairs)))}  # each weight part's first slot
        self.weights = nn.ParameterList(nn.Parameter(stacked[:, first[j] * k:(first[j] + 1) * k].float(),
                                                     requires_grad=False) for j in sorted(first))
        self._gemm, self._unchecked, self.kernel = None, None, "fpmath"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts}, "
                f"kernel={self.kernel}")


class _SplitGemm(nn.Module):
    """The template kernel's graph: fp32 rows split into bf16 parts (exact bit masks), laid
    side by side along K, one GEMM against the stacked bf16 weight parts, fp32 out. Each
    instance runs its own copy of ``forward``'s code: dynamo keeps its compiled graphs per
    code object, so hundreds of layers sharing one would each search all the others' guards
    on every call (and past ``recompile_limit``, silently run eager, rounded to bf16)."""

    def __init__(self, weight: torch.Tensor, order: list[int], parts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.order, self.parts = order, parts
        _SplitGemm._count += 1
        code = _split_gemm_forward.__code__.replace(co_name=f"split_gemm_{_SplitGemm._count}")
        self.forward = types.MethodType(types.FunctionType(code, _split_gemm_forward.__globals__), self)
        limit = torch._dynamo.config.accumulated_recompile_limit  # every graph counts towards it
        torch._dynamo.config.accumulated_recompile_limit = max(limit, 4 * _SplitGemm._count)

    _count = 0


def _split_gemm_forward(self: _SplitGemm, rows: torch.Tensor) -> torch.Tensor:
    pieces = []
    rest = rows
    for _ in range(self.parts - 1):
        high = (rest.view(torch.int32) & _HIGH_16_BITS).view(torch.float32)
        pieces.append(high)
        rest = rest - high  # exact: ``high`` is ``rest`` with its low bits cleared
    pieces.append(rest)
    stacked = torch.cat([pieces[i] for i in self.order], dim=1).to(torch.bfloat16)
    return F.linear(stacked, self.weight).float()  # the cast is the template's epilogue: fp32 out


def split_linears(module: nn.Module, parts: int, kernel: Kernel = "fpmath") -> int:
    """Swap every ``nn.Linear`` under ``module`` for a ``SplitLinear``; how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, SplitLinear(child, parts, kernel))
            swapped += 1
        else:
            swapped += split_linears(child, parts, kernel)
    return swapped
