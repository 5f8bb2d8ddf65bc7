"""An optional speed mode, measured: the engine in bfloat16 against float32 on the same workloads.

    python bench/dtype_compare.py [--model-dir DIR] [--device cpu] [--workloads short,mixed]

Reports each dtype's time, the speedup, the largest |score| difference from float32 and the
top-5 overlap per workload. On a CPU with AVX512-BF16 or AMX, bf16 matrix work is much
faster; scores then follow bf16 arithmetic and leave the contract's fp32 tolerance, which is
why float32 stays the CPU default (`rerank serve --dtype bfloat16` opts in).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import build_workloads, run_engine  # noqa: E402
from worker.batcher import BatcherConfig  # noqa: E402
from worker.runner import ModelRunner, PrefixCache  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=".cache/models/qwen3-reranker-0.6b-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="short,mixed")
    args = parser.parse_args()
    names = args.workloads.split(",")
    results: dict[tuple[str, str], tuple[float, list[float]]] = {}
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner.load(args.model_dir, device=args.device, dtype=dtype)
        runner.warmup()
        workloads = build_workloads(runner.builder.tokenizer,
                                    argparse.Namespace(seed=1234, docs=16, doc_tokens=256, concurrent=8))
        for name in names:
            runner.cache = PrefixCache(runner.cache.max_bytes)
            started = time.perf_counter()
            scores, _, _ = asyncio.run(run_engine(runner, BatcherConfig.for_device(args.device), workloads[name]))
            results[dtype, name] = (time.perf_counter() - started, [s for request in scores for s in request])
        del runner
    print("| workload | float32 s | bfloat16 s | speedup | max |score diff| | top-5 overlap |")
    print("|---|---|---|---|---|---|")
    for name in names:
        (t32, s32), (t16, s16) = results["float32", name], results["bfloat16", name]
        top = [set(sorted(range(len(s)), key=lambda i, s=s: -s[i])[:5]) for s in (s32, s16)]
        diff = max(abs(a - b) for a, b in zip(s32, s16))
        print(f"| {name} | {t32:.1f} | {t16:.1f} | {t32 / t16:.2f}x | {diff:.3f} | {len(top[0] & top[1])}/5 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
