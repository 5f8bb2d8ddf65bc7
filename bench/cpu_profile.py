"""Where the CPU serving path spends its time, by part of the model, under torch's profiler.

    python bench/cpu_profile.py --model-dir /work/models/qwen3-reranker-0.6b-random \
        [--dtype bfloat16 [--compile] | --precision exact-bf16x3] [--attention padded] \
        [--workloads short,mixed] [--ops 12]

Runs each workload (bench/engine.py's seeded ones) through the serving runner in the batches
the real queue forms (``FairQueue`` with the CPU defaults, shared prefix reused), once
unprofiled (the wall time) and once under ``torch.profiler``, and prints:

* a table by part: linear layers, attention (the SDPA call), RMS norms, SiLU, and the rest
  (rotary, the gate product, K/V padding copies, embedding, Python), as the share of the
  profiled time, with the linear layers' GFLOP/s set against this process's bf16 and fp32
  GEMM rates (the 0.6B MLP shape, 2048 rows);
* the costliest aten ops by self time.

The parts are marked with module hooks (``record_function`` around each ``nn.Linear``,
RMSNorm and activation module), so the model code is profiled as served, unmodified.
``--compile`` profiles the compiled path as served (bf16's default), where hooks cannot
see inside inductor's graphs: the parts are then told apart by operator (the GEMMs, the
attention kernel, inductor's fused kernels, the attention's merge and copies, the rest).
``--attention`` picks a strategy other than the CPU's default (rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import build_workloads, gemm_gflops, linear_flops_per_token  # noqa: E402
from worker.batcher import BatcherConfig  # noqa: E402
from worker.precision import SplitLinear  # noqa: E402
from worker.queue import Entry, FairQueue  # noqa: E402
from worker.runner import Item, ModelRunner, PrefixCache  # noqa: E402

PARTS = ("linear", "attention", "norm", "silu")
ATTENTION_OP = "aten::scaled_dot_product_attention"
FLASH_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"  # what rows attention calls directly
# The compiled path's parts, by operator (self time): hooks do not run inside inductor's graphs
OP_PARTS = {
    "linear layers (aten::mm, addmm)": ("aten::mm", "aten::addmm"),
    "attention (the CPU flash kernel)": (FLASH_OP,),
    "inductor's fused kernels (norms, rotary, gate, residuals)": ("## Call CompiledFxGraph",),
    "attention merge and copies (lerp, cat, copy, fill, index)": (
        "aten::lerp_", "aten::cat", "aten::copy_", "aten::fill_", "aten::index_copy_", "aten::index_select",
        "aten::_index_put_impl_", "aten::where"),
}


class _Owner:
    cancelled = False


def mark_parts(model: nn.Module) -> None:
    """A ``record_function`` range around every module of a part, named ``part:<part>``."""
    for module in model.modules():
        name = type(module).__name__
        part = ("linear" if isinstance(module, nn.Linear | SplitLinear) else "norm" if name.endswith("RMSNorm")
                else "silu" if name in ("SiLU", "SiLUActivation") else None)
        if part is None:
            continue
        label = f"part:{part}"

        def enter(mod: nn.Module, args: Any, label: str = label) -> None:
            mod._range = record_function(label)  # type: ignore[assignment]
            mod._range.__enter__()

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            mod._range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def batches(runner: ModelRunner, request: Any, config: BatcherConfig) -> Iterator[list[Item]]:
    """The batches the serving queue forms for one request (prefix reuse on)."""
    prompts = runner.builder.build(request.query, request.documents, request.instruction, request.options)
    queue = FairQueue(config.max_batch_tokens, config.max_batch_size)
    queue.append(Entry(ids, prompts.shared_len, _Owner(), i) for i, ids in enumerate(prompts.sequences))
    while batch := queue.next_batch():
        yield [Item(e.ids, e.prefix_len) for e in batch]


def run(runner: ModelRunner, work: list[list[Item]]) -> tuple[float, int]:
    runner.cache = PrefixCache(runner.cache.max_bytes)
    started, computed = time.perf_counter(), 0
    for items in work:
        computed += sum(runner.score_rows(items).computed)
    return time.perf_counter() - started, computed


def by_hooks(prof: Any, profiled: float) -> dict[str, float]:
    """Seconds by part, from the module hooks' ranges (eager)."""
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    spent = {part: totals.get(f"part:{part}", 0.0) for part in PARTS}
    spent["attention"] = totals.get(ATTENTION_OP, 0.0) or totals.get(FLASH_OP, 0.0)
    spent["other (rotary, gate product, K/V copies, embedding, Python)"] = profiled - sum(spent.values())
    return spent


def by_operator(prof: Any, profiled: float) -> dict[str, float]:
    """Seconds by part, from operators' self time (compiled: no hooks inside the graphs)."""
    spent = dict.fromkeys(OP_PARTS, 0.0)
    for event in prof.key_averages():
        part = next((p for p, names in OP_PARTS.items() if event.key.startswith(names)), None)
        if part is not None:
            spent[part] += event.self_cpu_time_total / 1e6
    spent["other (Python, dynamo guards, embedding, rotary tables)"] = profiled - sum(spent.values())
    return spent


def profile_workload(runner: ModelRunner, work: list[list[Item]], flops_tok: float,
                     rates: dict[str, float], ops: int) -> None:
    wall, computed = run(runner, work)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled, _ = run(runner, work)
    spent = (by_operator if runner.scorer.compiled else by_hooks)(prof, profiled)
    linear = next(iter(spent))  # the linear layers come first in both tables
    linear_gflops = computed * flops_tok / spent[linear] / 1e9
    print(f"\n{computed} tokens computed in {len(work)} batches; {wall:.2f} s unprofiled, {profiled:.2f} s "
          f"profiled; whole pass {computed * flops_tok / wall / 1e9:.0f} GFLOP/s executed "
          f"({computed * flops_tok / wall / 1e9 / rates['bf16']:.0%} of the bf16 GEMM rate)\n")
    print("| part | seconds | share |")
    print("|---|---|---|")
    for part, seconds in spent.items():
        print(f"| {part} | {seconds:.2f} | {seconds / profiled:.0%} |")
    print(f"\nlinear layers: {linear_gflops:.0f} GFLOP/s = {linear_gflops / rates['bf16']:.0%} of the bf16 GEMM "
          f"rate, {linear_gflops / rates['fp32']:.2f}x the fp32 one\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops, max_name_column_width=50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--precision", default=None, help="instead of --dtype: a worker/precision.py mode")
    parser.add_argument("--workloads", default="short,mixed")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--ops", type=int, default=12, help="aten ops listed per workload")
    parser.add_argument("--compile", action="store_true", help="profile the compiled path (parts by operator)")
    parser.add_argument("--attention", default=None, help="rows (the CPU's default) or padded")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 on an oversubscribed machine: no parallel region then "
                             "waits on a descheduled peer, which inflates short elementwise ops)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = ModelRunner.load(args.model_dir, device="cpu", dtype=None if args.precision else args.dtype,
                              precision=args.precision, compile=args.compile, attention=args.attention)
    runner.warmup()
    if not runner.scorer.compiled:  # eager: the hooks see every module
        mark_parts(runner.model)
    config = BatcherConfig.for_device("cpu")
    workloads = build_workloads(runner.builder.tokenizer, argparse.Namespace(
        seed=1234, docs=args.docs, doc_tokens=256, concurrent=8, fixed_requests=1))
    rates = {"bf16": gemm_gflops(torch.device("cpu"), torch.bfloat16),
             "fp32": gemm_gflops(torch.device("cpu"), torch.float32)}
    print(f"{args.precision or args.dtype}{' compiled' if runner.scorer.compiled else ''}, "
          f"{runner.scorer.attention.kind} attention; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"GEMM (2048x1024x3072): bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s")
    flops_tok = linear_flops_per_token(runner.model.config)
    for name in args.workloads.split(","):
        print(f"\n## {name}: {workloads[name].name}")
        work = [b for r in workloads[name].requests for b in batches(runner, r, config)]
        profile_workload(runner, work, flops_tok, rates, args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
