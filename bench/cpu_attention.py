"""The CPU's attention strategies side by side, per batch shape: rows (the default) and padded.

    python bench/cpu_attention.py --model-dir /work/models/qwen3-reranker-0.6b-random-bf16 \
        [--dtype bfloat16] [--no-compile] [--rounds 3]

One runner per strategy is loaded in this process, with the dtype's serving default for
``--compile``, and each batch shape below runs as one model batch (the query's prefix
computed once, as served), alternating the strategies, ``--rounds`` times; the best time of
each is printed with the ratio and the largest |log-odds difference| between the two.

The shapes are the cases that decide between the two: many tiny rows (the per-row kernel
calls of rows attention against little padding), rows of even length (nothing for rows to
skip) and rows of mixed length (the padding that padded attention computes).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.runner import Item, ModelRunner, PrefixCache  # noqa: E402

WORDS = "alpha beta gamma delta river city paris france bank loan".split()
SHAPES = (("tiny", 64, 5, 15), ("even", 32, 40, 50), ("mixed", 16, 20, 300))  # name, rows, words min-max
STRATEGIES = ("rows", "padded")


def batch(runner: ModelRunner, rows: int, low: int, high: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(rows)]
    prompts = runner.builder.build("what is the capital of france", docs, None)
    return [Item(ids, prompts.shared_len) for ids in prompts.sequences]


def timed(runner: ModelRunner, items: list[Item]) -> tuple[float, list[float]]:
    runner.cache = PrefixCache(runner.cache.max_bytes)  # the prefix computed in the batch, as served
    started = time.perf_counter()
    logits = runner.score_rows(items).logits
    return time.perf_counter() - started, logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="eager even where the dtype compiles by default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="rows per shape, scaled (a smoke run: 0.1)")
    args = parser.parse_args()
    runners = {kind: ModelRunner.load(args.model_dir, device="cpu", dtype=args.dtype, attention=kind,
                                      compile=False if args.no_compile else None) for kind in STRATEGIES}
    for runner in runners.values():
        runner.warmup()
    compiled = runners["rows"].scorer.compiled
    print(f"{args.dtype}{' compiled' if compiled else ' eager'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| batch | rows | prompt tokens | rows attention | padded attention | rows vs padded | max \\|diff\\| |")
    print("|---|---|---|---|---|---|---|")
    for seed, (name, rows, low, high) in enumerate(SHAPES):
        rows = max(2, round(rows * args.scale))
        items = batch(runners["rows"], rows, low, high, seed)
        best = dict.fromkeys(STRATEGIES, float("inf"))
        logits: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for kind, runner in runners.items():
                seconds, logits[kind] = timed(runner, items)
                best[kind] = min(best[kind], seconds)
        tokens = sum(len(i.ids) for i in items)
        diff = max(abs(a - b) for a, b in zip(logits["rows"], logits["padded"]))
        print(f"| {name}: {low}-{high} words | {rows} | {tokens} | {best['rows']:.2f} s | {best['padded']:.2f} s "
              f"| {best['padded'] / best['rows']:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
