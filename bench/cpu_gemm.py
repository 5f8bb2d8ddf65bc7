"""GEMM rates on this CPU for the 0.6B MLP shape: fp32, bf16, and the exact split modes.

    python bench/cpu_gemm.py [--rows 64,512,2048] [--k 1024] [--n 3072] [--reps 10]

One process, side by side, each shape timed for every path in turn (so load drift on a
shared machine hits all paths alike). The weight is bf16-representable, as in Qwen3's
published bf16 checkpoints. ``max rel err`` is against a float64 product of the same fp32
activations: what each path loses compared with exact arithmetic (plain fp32 loses ~1e-6).

The ``template`` rows are the other operator that reaches the matrix units with fp32
accumulation: inductor's CPU GEMM template (AMX micro-kernel), compiled with the weight frozen
as a constant, whose fused ``.float()`` epilogue writes the fp32 accumulator out unrounded.
The split parts sit side by side along K against the weight repeated, so one GEMM sums them.
It was tried as the exact modes' kernel and taken back out: docs/PERFORMANCE.md says why.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.precision import SplitLinear, bf16_matmul, cpu_capability  # noqa: E402


def timed(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, torch.Tensor]:
    out = fn()
    fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps, out


class TemplateSplit(torch.nn.Module):
    """fp32 rows split into ``parts`` bf16 parts (exact bit masks), side by side along K,
    times the bf16 weight repeated ``parts`` times: one GEMM, fp32 out."""

    def __init__(self, weight: torch.Tensor, parts: int) -> None:
        super().__init__()
        self.parts = parts
        self.weight = torch.nn.Parameter(torch.cat([weight] * parts, dim=1).bfloat16(), requires_grad=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        pieces, rest = [], rows
        for _ in range(self.parts - 1):
            high = (rest.view(torch.int32) & -65536).view(torch.float32)
            pieces.append(high)
            rest = rest - high
        pieces.append(rest)
        return F.linear(torch.cat(pieces, dim=1).to(torch.bfloat16), self.weight).float()


def template(linear: torch.nn.Linear, parts: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # the template needs the weight as a constant (this process only)
    return torch.compile(TemplateSplit(linear.weight.detach(), parts), dynamic=True,  # type: ignore[return-value]
                         options={"max_autotune": True, "max_autotune_gemm_backends": "CPP"})


def paths(x: torch.Tensor, linear: torch.nn.Linear) -> dict[str, Callable[[], torch.Tensor]]:
    xb, wb = x.bfloat16(), linear.weight.bfloat16()
    split2, split3 = SplitLinear(linear, 2), SplitLinear(linear, 3)

    def rounded() -> torch.Tensor:
        with bf16_matmul():
            return F.linear(x, linear.weight)

    found = {"fp32": lambda: F.linear(x, linear.weight), "bf16 (in and out)": lambda: F.linear(xb, wb),
             "fp32, mkldnn bf16 precision (x rounded)": rounded,
             "exact-bf16x2": lambda: split2(x), "exact-bf16x3": lambda: split3(x)}
    if not (shutil.which("g++") or shutil.which("c++")):
        return found  # inductor builds its CPU kernels with a C++ compiler: no template rows
    global _templates
    _templates = _templates or (template(linear, 2), template(linear, 3))
    template2, template3 = _templates

    return {**found, "exact-bf16x2, template": lambda: template2(x), "exact-bf16x3, template": lambda: template3(x)}


_templates: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()


@torch.inference_mode()  # no grad: inductor freezes constants only then
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64,512,2048")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 units: {cpu_capability()}")
    linear = torch.nn.Linear(args.k, args.n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.bfloat16().float())
    print("| rows | path | ms | GFLOP/s | vs fp32 | max rel err |")
    print("|---|---|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        x = torch.randn(rows, args.k)
        exact = F.linear(x.double(), linear.weight.double())
        base = None
        for name, fn in paths(x, linear).items():
            seconds, out = timed(fn, args.reps)
            base = base or seconds
            err = float((out.double() - exact).abs().max() / exact.abs().max())
            gflops = 2 * rows * args.k * args.n / seconds / 1e9
            print(f"| {rows} | {name} | {1e3 * seconds:.2f} | {gflops:.0f} | {base / seconds:.2f}x | {err:.1e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
