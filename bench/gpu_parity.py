"""CUDA parity: the serving path in bf16 and fp32 against the contract's fp32 reference.

    python bench/gpu_parity.py --model-dir DIR --out parity.json

Reports, per dtype, the largest |score| and |log-odds| difference from running each pair
alone through ``Qwen3ForCausalLM`` in fp32, and for bf16 the rank agreement with fp32
(Spearman's rho and top-10 overlap per query). fp32 must be within 1e-5 on the score.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.runner import ModelRunner, _Item  # noqa: E402
from worker.types import Truncation  # noqa: E402

WORDS = "river capital city paris france history code python sort list energy market data model".split()


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs: list[float]) -> list[int]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out = [0] * len(xs)
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--docs", type=int, default=32)
    args = parser.parse_args()
    rng = random.Random(7)
    queries = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(args.queries)]
    docs = [[" ".join(rng.choices(WORDS, k=rng.randint(5, 400))) for _ in range(args.docs)] for _ in queries]

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).cuda().eval()
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    logits_by_dtype: dict[str, list[list[float]]] = {}
    reference: list[list[float]] = []
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner.load(args.model_dir, device="cuda", dtype=dtype)
        runner.warmup()
        worst_score = worst_logit = 0.0
        per_query = []
        for qn, (q, ds) in enumerate(zip(queries, docs)):
            prompts = runner.builder.build(q, ds, None, Truncation.END)
            items = [_Item(s, prompts.shared_len if i % 3 else 0) for i, s in enumerate(prompts.sequences)]
            got = runner.score(items).logits
            if dtype == "float32":
                with torch.inference_mode():
                    row = []
                    for ids in prompts.sequences:
                        lg = ref(torch.tensor([ids], device="cuda")).logits[0, -1]
                        row.append(float(lg[9693] - lg[2152]))
                reference.append(row)
            want = reference[qn]
            sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x)).item())  # noqa: E731
            worst_logit = max(worst_logit, max(abs(a - b) for a, b in zip(got, want)))
            worst_score = max(worst_score, max(abs(sig(a) - sig(b)) for a, b in zip(got, want)))
            per_query.append(got)
        logits_by_dtype[dtype] = per_query
        report[dtype] = {"max_abs_score_diff": worst_score, "max_abs_logit_diff": worst_logit}
        del runner
        torch.cuda.empty_cache()
    rho, overlap = [], []
    for a, b in zip(logits_by_dtype["float32"], logits_by_dtype["bfloat16"]):
        rho.append(spearman(a, b))
        top = lambda xs: set(sorted(range(len(xs)), key=lambda i: -xs[i])[:10])  # noqa: E731
        overlap.append(len(top(a) & top(b)) / 10)
    report["bf16_vs_fp32"] = {"spearman_min": min(rho), "top10_overlap_min": min(overlap)}
    report["fp32_within_1e-5"] = report["float32"]["max_abs_score_diff"] <= 1e-5  # type: ignore[index]
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
