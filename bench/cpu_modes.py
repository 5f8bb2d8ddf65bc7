"""The CPU precision modes side by side, against the model card's fp32 loop, in one run.

    python bench/cpu_modes.py --model-dir /work/models/qwen3-reranker-0.6b-random-bf16 \
        [--modes float32,exact-bf16x3,bfloat16] [--workloads short,mixed] [--rounds 2] [--rss]

Every mode is loaded once, in this process, and the workloads (bench/engine.py's seeded
ones, through the real ``Batcher``) run round-robin: card, then each mode, ``--rounds``
times, so load drift on a shared machine hits every path alike; each figure is the best
round. A mode is a ``--precision`` value, with ``+compile`` for torch.compile (inductor's
CPU backend) of the per-token layer work, and ``+rows`` or ``+padded`` for an attention
strategy other than the CPU's default (worker/qwen3.py). Reported per workload and mode: seconds, speedup
over the card, executed GFLOP/s (linear layers, 0.88 GFLOP a computed token) as a share of
the bf16 and the fp32 GEMM rates measured in this process (0.6B MLP shape, 2048 rows; the
higher of the measurements at the start and at the end), and
the largest |score difference| from the card and from the float32 engine.

``--rss``: also the peak RSS of each mode alone, in a fresh process: load, warm up, one
32-document call (what `rerank serve` holds after its first call).

The checkpoint should be bf16, as Qwen publishes it (``rerank make-test-model DIR --size
0.6b --dtype bfloat16``): the exact modes assume bf16-exact weights, and the card loads it
in fp32 like everyone else.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import (  # noqa: E402
    Workload,
    build_workloads,
    card_scores,
    gemm_gflops,
    linear_flops_per_token,
    run_engine,
)
from worker.batcher import BatcherConfig  # noqa: E402
from worker.runner import ModelRunner, PrefixCache  # noqa: E402

CPU = torch.device("cpu")


def load(model_dir: str, mode: str) -> ModelRunner:
    precision, *flags = mode.split("+")
    unknown = set(flags) - {"compile", "rows", "padded"}
    if unknown:
        raise SystemExit(f"cpu_modes: unknown mode flag(s) {sorted(unknown)} in {mode!r}: use +compile, +rows, +padded")
    dtype = precision if precision in ("float32", "bfloat16") else None
    attention = next((f for f in flags if f in ("rows", "padded")), None)
    runner = ModelRunner.load(model_dir, device="cpu", dtype=dtype, precision=precision,
                              compile="compile" in flags, attention=attention)
    runner.warmup()
    return runner


def engine_pass(runner: ModelRunner, wl: Workload) -> tuple[float, list[float], int]:
    runner.cache = PrefixCache(runner.cache.max_bytes)
    started = time.perf_counter()
    scores, _, computed = asyncio.run(run_engine(runner, BatcherConfig.for_device("cpu"), wl))
    return time.perf_counter() - started, [s for r in scores for s in r], computed


def card_pass(runner: ModelRunner, wl: Workload) -> tuple[float, list[float]]:
    started = time.perf_counter()
    scores = [s for r in wl.requests for s in card_scores(runner.model, runner.builder.tokenizer, r, 8192)]
    return time.perf_counter() - started, scores


def peak_rss(model_dir: str, mode: str) -> float:
    """GB, of one mode alone in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--model-dir", model_dir, "--rss-child", mode],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def rss_child(model_dir: str, mode: str) -> None:
    runner = load(model_dir, mode)
    wl = build_workloads(runner.builder.tokenizer, _workload_args(16))["short"]
    engine_pass(runner, wl)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def _workload_args(docs: int) -> argparse.Namespace:
    return argparse.Namespace(seed=1234, docs=docs, doc_tokens=256, concurrent=8, fixed_requests=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--modes", default="float32,exact-bf16x3,bfloat16")
    parser.add_argument("--workloads", default="short,mixed")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-card", action="store_true")
    parser.add_argument("--rss", action="store_true", help="also each mode's peak RSS, in a fresh process")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.model_dir, args.rss_child)
        return 0
    modes = args.modes.split(",")
    runners = {mode: load(args.model_dir, mode) for mode in modes}
    card = None if args.no_card else load(args.model_dir, "float32")
    tokenizer = runners[modes[0]].builder.tokenizer
    workloads = build_workloads(tokenizer, _workload_args(args.docs))
    flops_tok = linear_flops_per_token(runners[modes[0]].model.config)
    rates = {"bf16": gemm_gflops(CPU, torch.bfloat16), "fp32": gemm_gflops(CPU, torch.float32)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GEMM bf16 {rates['bf16']:.0f}, "
          f"fp32 {rates['fp32']:.0f} GFLOP/s", flush=True)
    best: dict[tuple[str, str], float] = {}
    scores: dict[tuple[str, str], list[float]] = {}
    computed: dict[tuple[str, str], int] = {}
    for rnd in range(args.rounds):
        for name in args.workloads.split(","):
            wl = workloads[name]
            if card is not None:
                seconds, scores[name, "card"] = card_pass(card, wl)
                best[name, "card"] = min(seconds, best.get((name, "card"), seconds))
                print(f"round {rnd} {name} card: {seconds:.1f} s", flush=True)
            for mode, runner in runners.items():
                seconds, scores[name, mode], computed[name, mode] = engine_pass(runner, wl)
                best[name, mode] = min(seconds, best.get((name, mode), seconds))
                print(f"round {rnd} {name} {mode}: {seconds:.1f} s", flush=True)
    rates_end = {"bf16": gemm_gflops(CPU, torch.bfloat16), "fp32": gemm_gflops(CPU, torch.float32)}
    print(f"GEMM at the end: bf16 {rates_end['bf16']:.0f}, fp32 {rates_end['fp32']:.0f} GFLOP/s")
    # the shares are taken against the less disturbed of the two measurements
    ceiling = {k: max(rates[k], rates_end[k]) for k in rates}
    del runners, card
    gc.collect()
    rss = {mode: peak_rss(args.model_dir, mode) for mode in modes} if args.rss else {}
    rows = table(args, modes, best, scores, computed, flops_tok, ceiling, rss)
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "rates_end": rates_end, "rss_gb": rss,
                                               "rows": rows}, indent=2))
    return 0


def table(args: argparse.Namespace, modes: list[str], best: dict[tuple[str, str], float],
          scores: dict[tuple[str, str], list[float]], computed: dict[tuple[str, str], int], flops_tok: float,
          rates: dict[str, float], rss: dict[str, float]) -> list[dict[str, Any]]:
    print("\n| workload | path | seconds | vs card | executed GFLOP/s | of bf16 GEMM | of fp32 GEMM "
          "| max \\|diff\\| vs card | max \\|diff\\| vs float32 engine | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.workloads.split(","):
        card_s = best.get((name, "card"))
        if card_s:
            print(f"| {name} | card (fp32) | {card_s:.1f} | 1.00x | | | | | | |")
        for mode in modes:
            seconds = best[name, mode]
            gflops = computed[name, mode] * flops_tok / seconds / 1e9
            vs_card = max_diff(scores[name, mode], scores.get((name, "card")))
            vs_fp32 = max_diff(scores[name, mode], scores.get((name, "float32")))
            row = {"workload": name, "mode": mode, "seconds": seconds, "speedup": card_s / seconds if card_s else None,
                   "gflops": gflops, "of_bf16": gflops / rates["bf16"], "of_fp32": gflops / rates["fp32"],
                   "diff_card": vs_card, "diff_fp32": vs_fp32, "rss_gb": rss.get(mode)}
            rows.append(row)
            print(f"| {name} | {mode} | {seconds:.1f} | {fmt(row['speedup'], '.2f', 'x')} | {gflops:.0f} | "
                  f"{row['of_bf16']:.0%} | {row['of_fp32']:.2f}x | {fmt(vs_card, '.1e')} | {fmt(vs_fp32, '.1e')} | "
                  f"{fmt(rss.get(mode), '.2f')} |")
    return rows


def max_diff(a: list[float], b: list[float] | None) -> float | None:
    return None if b is None else max(abs(x - y) for x, y in zip(a, b))


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{unit}"


if __name__ == "__main__":
    sys.exit(main())
