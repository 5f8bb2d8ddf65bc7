"""How far each CPU precision mode moves scores and rankings from fp32, measured so it does not mislead.

    python bench/fidelity.py --model-dir /work/models/qwen3-reranker-0.6b-random-bf16 \
        [--modes float32,bfloat16,exact-bf16x2,exact-bf16x3] [--queries 12] [--docs 16] \
        [--scales 1,4,40]

* The checkpoint should hold bf16 weights, as Qwen publishes them (``rerank make-test-model
  DIR --size 0.6b --dtype bfloat16``): the exact modes rely on bf16-exact weights, and a
  random fp32 checkpoint would charge bf16 for rounding the weights too.
* The random test checkpoint multiplies its final norm by 40 to spread its scores, which
  magnifies every rounding error as much. So the final norm is applied here at several
  scales, 1 (unscaled, as initialized) included: the hidden state entering it is captured
  once per mode (a forward pre-hook), then normed at each scale, in the mode's dtype, and
  put through the fp32 yes/no head rows, as the scorer does.
* Per scale: the largest |score difference| from float32 (the first mode, which parity
  tests hold within 1e-5 of the contract's reference), the mean and worst Spearman rank
  correlation per query, and top-1 / top-5 agreement over all queries. Rankings do not
  depend on a uniform norm scale; the score differences do.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import WORDS, text_of_tokens  # noqa: E402
from worker.runner import Item, ModelRunner  # noqa: E402


def queries(tokenizer: Any, count: int, docs: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))),
             [text_of_tokens(tokenizer, rng, rng.randint(30, 300)) for _ in range(docs)]) for _ in range(count)]


@torch.inference_mode()
def logits_by_scale(runner: ModelRunner, work: list[tuple[str, list[str]]], scales: list[float]) -> torch.Tensor:
    """``[scales, queries, docs]`` yes-minus-no log-odds, the final norm at each scale."""
    captured: list[torch.Tensor] = []
    norm = runner.model.model.norm
    hook = norm.register_forward_pre_hook(lambda mod, args: captured.append(args[0].clone()))
    try:
        for query, docs in work:
            prompts = runner.builder.build(query, docs, None)
            runner.score_rows([Item(ids, prompts.shared_len) for ids in prompts.sequences])
    finally:
        hook.remove()
    weight = norm.weight.clone()
    head = runner.scorer.yes_no  # fp32 rows [yes, no]
    out = []
    for scale in scales:
        norm.weight.fill_(scale)
        out.append(torch.stack([(norm(h).float() @ head.T).diff(dim=-1).neg().squeeze(-1) for h in captured]))
    norm.weight.copy_(weight)
    return torch.stack(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack((ra, rb)))[0, 1])


def compare(base: torch.Tensor, other: torch.Tensor, k: int = 5) -> dict[str, float]:
    """One scale: base and other are ``[queries, docs]`` log-odds."""
    diff = (torch.sigmoid(base.double()) - torch.sigmoid(other.double())).abs().max()
    rho = [spearman(x, y) for x, y in zip(base, other)]
    top1 = [int(x.argmax() == y.argmax()) for x, y in zip(base, other)]
    topk = [len(set(x.topk(k).indices.tolist()) & set(y.topk(k).indices.tolist())) / k for x, y in zip(base, other)]
    return {"max_score_diff": float(diff), "spearman_mean": sum(rho) / len(rho), "spearman_min": min(rho),
            "top1": sum(top1) / len(top1), "top5_overlap": sum(topk) / len(topk)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--modes", default="float32,bfloat16,exact-bf16x2,exact-bf16x3",
                        help="the first is the baseline (float32)")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--scales", default="1,4,40", help="final-norm scales (1: unscaled)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    modes, scales = args.modes.split(","), [float(s) for s in args.scales.split(",")]
    results: dict[str, torch.Tensor] = {}
    print(f"{args.queries} queries x {args.docs} documents (30-300 tokens); against {modes[0]}\n")
    print("| mode | norm scale | max \\|score diff\\| | Spearman mean | Spearman worst | top-1 same | top-5 overlap |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for mode in modes:  # each mode's rows as soon as it is done: a long run keeps what it has
        dtype = mode if mode in ("float32", "bfloat16") else None
        runner = ModelRunner.load(args.model_dir, device="cpu", dtype=dtype, precision=mode)
        work = queries(runner.builder.tokenizer, args.queries, args.docs, args.seed)
        results[mode] = logits_by_scale(runner, work, scales)
        del runner
        gc.collect()
        for i, scale in enumerate(scales if mode != modes[0] else []):
            r = compare(results[modes[0]][i], results[mode][i])
            print(f"| {mode} | {scale:g} | {r['max_score_diff']:.1e} | {r['spearman_mean']:.5f} | "
                  f"{r['spearman_min']:.5f} | {r['top1']:.0%} | {r['top5_overlap']:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
