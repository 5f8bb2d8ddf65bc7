"""Optional CPU speed modes, measured: the engine in bfloat16, and with int8 dynamic
quantization, against float32 on the same workloads.

    python bench/dtype_compare.py [--model-dir DIR] [--device cpu] [--workloads short,mixed]
                                  [--modes float32,bfloat16,int8-dynamic]

Reports each mode's time, its speedup over float32, the largest |score| difference from
float32 and the top-5 overlap per workload. On a CPU with AVX512-BF16 or AMX, bf16 matrix work
is much faster; scores then follow bf16 arithmetic and leave the contract's fp32 tolerance,
which is why float32 stays the CPU default (`rerank serve --dtype bfloat16` opts in).

`int8-dynamic` is measured here only, not served: every decoder linear layer is swapped for
PyTorch's dynamically quantized one (int8 weights, per-batch int8 activations; the yes/no head
stays fp32). On this CPU it measured about as fast as bf16 while moving scores about three
times as far (docs/PERFORMANCE.md), and PyTorch has deprecated the quantized tensors it is
built on.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.engine import build_workloads, run_engine  # noqa: E402
from worker.batcher import BatcherConfig  # noqa: E402
from worker.offline import make_random_reranker  # noqa: E402
from worker.runner import ModelRunner, PrefixCache  # noqa: E402

MODES = ("float32", "bfloat16", "int8-dynamic")


def load_mode(model_dir: str, device: str, mode: str) -> ModelRunner:
    if mode == "int8-dynamic":
        runner = ModelRunner.load(model_dir, device=device, dtype="float32")
        with warnings.catch_warnings():  # torch's quantized-tensor deprecation notices
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(runner.model.model.layers, {torch.nn.Linear},
                                                   dtype=torch.qint8, inplace=True)
        return runner
    return ModelRunner.load(model_dir, device=device, dtype=mode, compile=False)  # the dtype alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=".cache/models/qwen3-reranker-0.6b-random")
    parser.add_argument("--size", default="0.6b", choices=["0.6b", "tiny"],
                        help="shape to build when --model-dir holds no checkpoint yet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="short,mixed")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, float32 first (the baseline): {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "float32" or not set(modes) <= set(MODES):
        parser.error(f"--modes must start with float32 and name only {', '.join(MODES)}")
    if not (Path(args.model_dir) / "config.json").exists():
        print(f"building random-weight {args.size} checkpoint in {args.model_dir} ...", flush=True)
        make_random_reranker(Path(args.model_dir), args.size)
    names = args.workloads.split(",")
    results: dict[tuple[str, str], tuple[float, list[float]]] = {}
    for mode in modes:
        runner = load_mode(args.model_dir, args.device, mode)
        runner.warmup()
        workloads = build_workloads(runner.builder.tokenizer, argparse.Namespace(
            seed=1234, docs=args.docs, doc_tokens=256, concurrent=8, fixed_requests=1))
        for name in names:
            runner.cache = PrefixCache(runner.cache.max_bytes)
            started = time.perf_counter()
            scores, _, _ = asyncio.run(run_engine(runner, BatcherConfig.for_device(args.device), workloads[name]))
            results[mode, name] = (time.perf_counter() - started, [s for request in scores for s in request])
            print(f"{mode} {name}: {results[mode, name][0]:.1f} s", flush=True)
        del runner
    print("| workload | mode | seconds | speedup over float32 | max |score diff| | top-5 overlap |")
    print("|---|---|---|---|---|---|")
    for name in names:
        base_s, base = results["float32", name]
        top_base = top5(base)
        for mode in modes:
            took, scores = results[mode, name]
            diff = max(abs(a - b) for a, b in zip(base, scores))
            print(f"| {name} | {mode} | {took:.1f} | {base_s / took:.2f}x | {diff:.3g} | "
                  f"{len(top_base & top5(scores))}/{min(5, len(scores))} |")
    return 0


def top5(scores: list[float]) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda i: -scores[i])[:5])


if __name__ == "__main__":
    sys.exit(main())
