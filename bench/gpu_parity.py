"""CUDA parity: the serving path in bf16 and fp32 against the contract's fp32 reference.

    python bench/gpu_parity.py --model-dir DIR --out parity.json

Reports, per dtype, the largest |score| and |log-odds| difference from running each pair
alone through ``Qwen3ForCausalLM`` in fp32, and for bf16 the rank agreement with fp32
(Spearman's rho and top-10 overlap per query). fp32 must be within 1e-5 on the score.
``--compile`` adds bf16 through torch.compile (what ``rerank serve`` runs on CUDA); the
other rows are eager. ``--varlen`` adds bf16 with ``--attention varlen`` (FlashAttention's
variable-length kernel; CUDA only), eager and, with ``--compile``, compiled.
``reference_batched_vs_alone`` is the fp32 reference's own noise on this device: the same
pairs in padded batches of 8 (the model card's loop) against alone.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.runner import Item, ModelRunner  # noqa: E402

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


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reference_batched(ref, sequences: list[list[int]], device: torch.device) -> list[float]:  # type: ignore[no-untyped-def]
    """The reference model on padded batches of 8, left padding, as the model card runs it."""
    out: list[float] = []
    for start in range(0, len(sequences), 8):
        chunk = sequences[start:start + 8]
        width = max(map(len, chunk))
        ids = torch.tensor([[151643] * (width - len(s)) + s for s in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in chunk], device=device)
        lg = ref(ids, attention_mask=mask).logits[:, -1].float()
        out += (lg[:, 9693] - lg[:, 2152]).tolist()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also check bf16 with --compile")
    parser.add_argument("--varlen", action="store_true", help="also check bf16 with --attention varlen")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = parser.parse_args()
    rng = random.Random(7)
    queries = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(args.queries)]
    docs = [[" ".join(rng.choices(WORDS, k=rng.randint(5, 400))) for _ in range(args.docs)] for _ in queries]

    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()
    report: dict[str, object] = {"torch": torch.__version__, "device": torch.cuda.get_device_name()
                                 if device.type == "cuda" else "cpu"}
    logits_by_dtype: dict[str, list[list[float]]] = {}
    reference: list[list[float]] = []
    noise_score = noise_logit = 0.0
    variants = [("float32", False, "padded"), ("bfloat16", False, "padded")]
    variants += [("bfloat16", True, "padded")] if args.compile else []
    if args.varlen and device.type == "cuda":  # FlashAttention: CUDA only
        variants += [("bfloat16", False, "varlen")] + ([("bfloat16", True, "varlen")] if args.compile else [])
    elif args.varlen:
        print("--varlen: skipped, FlashAttention needs CUDA", flush=True)
    for dtype, compiled, attention in variants:
        name = dtype + ("+compile" if compiled else "") + ("+varlen" if attention == "varlen" else "")
        runner = ModelRunner.load(args.model_dir, device=args.device, dtype=dtype, compile=compiled,
                                  attention=attention)
        runner.warmup()
        worst_score = worst_logit = 0.0
        per_query = []
        for qn, (q, ds) in enumerate(zip(queries, docs)):
            prompts = runner.builder.build(q, ds, None)
            items = [Item(s, prompts.shared_len if i % 3 else 0) for i, s in enumerate(prompts.sequences)]
            got = runner.score_rows(items).logits
            if dtype == "float32" and not compiled:
                with torch.inference_mode():
                    row = []
                    for ids in prompts.sequences:
                        lg = ref(torch.tensor([ids], device=device)).logits[0, -1]
                        row.append(float(lg[9693] - lg[2152]))
                    reference.append(row)
                    batched = reference_batched(ref, prompts.sequences, device)
                noise_logit = max(noise_logit, max(abs(a - b) for a, b in zip(batched, row)))
                noise_score = max(noise_score, max(abs(sig(a) - sig(b)) for a, b in zip(batched, row)))
            want = reference[qn]
            worst_logit = max(worst_logit, max(abs(a - b) for a, b in zip(got, want)))
            worst_score = max(worst_score, max(abs(sig(a) - sig(b)) for a, b in zip(got, want)))
            per_query.append(got)
        logits_by_dtype[name] = per_query
        report[name] = {"max_abs_score_diff": worst_score, "max_abs_logit_diff": worst_logit}
        print(name, report[name], flush=True)
        del runner
        torch.cuda.empty_cache()
    for name in [n for n in logits_by_dtype if n != "float32"]:
        rho, overlap = [], []
        for a, b in zip(logits_by_dtype["float32"], logits_by_dtype[name]):
            rho.append(spearman(a, b))
            top = lambda xs: set(sorted(range(len(xs)), key=lambda i: -xs[i])[:10])  # noqa: E731
            overlap.append(len(top(a) & top(b)) / 10)
        report[f"{name}_vs_fp32"] = {"spearman_min": min(rho), "top10_overlap_min": min(overlap)}
    report["reference_batched_vs_alone"] = {"max_abs_score_diff": noise_score, "max_abs_logit_diff": noise_logit}
    if "bfloat16+compile" in logits_by_dtype:
        report["compile_vs_eager_bf16_max_abs_logit_diff"] = max(
            abs(a - b) for xs, ys in zip(logits_by_dtype["bfloat16"], logits_by_dtype["bfloat16+compile"])
            for a, b in zip(xs, ys))
    for padded, varlen in (("bfloat16", "bfloat16+varlen"), ("bfloat16+compile", "bfloat16+compile+varlen")):
        if varlen in logits_by_dtype:
            report[f"{varlen}_vs_{padded}_max_abs_logit_diff"] = max(
                abs(a - b) for xs, ys in zip(logits_by_dtype[padded], logits_by_dtype[varlen])
                for a, b in zip(xs, ys))
    report["fp32_within_1e-5"] = report["float32"]["max_abs_score_diff"] <= 1e-5  # type: ignore[index]
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
