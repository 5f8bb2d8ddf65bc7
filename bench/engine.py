"""Engine benchmark: the serving path against the model card's plain transformers loop.

Builds (once, cached) a random-weight checkpoint of the real Qwen3-Reranker-0.6B shape (speed
does not depend on weight values), then scores fixed seeded workloads twice in one process:

* ``engine``: the real serving path, ``Batcher`` + ``ModelRunner`` (token-budget batches,
  packed tokens, shared-prefix reuse, last-position yes/no head);
* ``card``: the model card's loop: batches of 8 in input order, left padding, the full
  ``model(**inputs).logits`` (every position, whole vocabulary), softmax over (no, yes).

and reports tokens/s (prompt tokens: what the card must compute), docs/s, latency
percentiles, GFLOP/s against this machine's fp32 GEMM rate measured in the same run, peak
RSS of the engine phase, and the largest score difference between the two.

    python bench/engine.py                       # CPU, fp32, all workloads
    python bench/engine.py --workloads short     # one workload
    python bench/engine.py --device cuda --dtype bfloat16 --docs 100 --doc-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.batcher import Batcher, BatcherConfig  # noqa: E402
from worker.offline import make_random_reranker  # noqa: E402
from worker.prompt import PREFIX, SUFFIX, format_body  # noqa: E402
from worker.runner import ModelRunner, PrefixCache  # noqa: E402
from worker.types import ScoreRequest  # noqa: E402

WORDS = ("search ranking model query document passage answer city river capital history "
         "science code python function value result system network data train test score "
         "paris france tokyo japan banana yellow green energy market price").split()


@dataclass
class Workload:
    name: str
    requests: list[ScoreRequest]


def text_of_tokens(tokenizer, rng: random.Random, n: int) -> str:  # type: ignore[no-untyped-def]
    words = [rng.choice(WORDS) for _ in range(n)]
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > n:
        words.pop()
    return " ".join(words)


def build_workloads(tokenizer, args: argparse.Namespace) -> dict[str, Workload]:  # type: ignore[no-untyped-def]
    rng = random.Random(args.seed)
    query = "which passages explain how the capital city grew along the river"

    def docs(count: int, lo: int, hi: int) -> list[str]:
        return [text_of_tokens(tokenizer, rng, rng.randint(lo, hi)) for _ in range(count)]

    fixed = args.doc_tokens
    return {
        "mixed": Workload(f"1 query x {args.docs} docs, 50-400 tokens",
                          [ScoreRequest(query, docs(args.docs, 50, 400))]),
        "short": Workload(f"1 query x {2 * args.docs} docs, ~60 tokens",
                          [ScoreRequest(query, docs(2 * args.docs, 55, 65))]),
        "concurrent": Workload(f"{args.concurrent} concurrent requests x 4 docs, 50-150 tokens",
                               [ScoreRequest(f"{query} #{i}", docs(4, 50, 150)) for i in range(args.concurrent)]),
        "lone": Workload(f"{2 * args.docs} concurrent requests x 1 doc, ~60 tokens",
                         [ScoreRequest(f"{query} #{i}", docs(1, 55, 65)) for i in range(2 * args.docs)]),
        "fixed": Workload(f"{args.fixed_requests} x (1 query x {args.docs} docs, {fixed} tokens)",
                          [ScoreRequest(f"{query} #{i}" if i else query, docs(args.docs, fixed, fixed))
                           for i in range(args.fixed_requests)]),
    }


def card_prompt_ids(tokenizer, request: ScoreRequest, max_length: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    pairs = [format_body(request.query, d, request.instruction) for d in request.documents]
    body = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                     max_length=max_length - len(prefix) - len(suffix))["input_ids"]
    return [prefix + list(ids) + suffix for ids in body]


@torch.inference_mode()
def card_scores(model, tokenizer, request: ScoreRequest, max_length: int, batch: int = 8) -> list[float]:  # type: ignore[no-untyped-def]
    """The model card's loop, verbatim in substance."""
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    ids = card_prompt_ids(tokenizer, request, max_length)
    tokenizer.padding_side = "left"  # as the card loads it
    scores: list[float] = []
    for start in range(0, len(ids), batch):
        inputs = tokenizer.pad({"input_ids": ids[start:start + batch]}, padding=True, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        logits = model(**inputs).logits[:, -1, :]
        pair = torch.stack([logits[:, no], logits[:, yes]], dim=1).float()
        scores += torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()
    return scores


def gemm_gflops(device: torch.device, dtype: torch.dtype, m: int = 2048, k: int = 1024, n: int = 3072,
                reps: int = 10) -> float:
    """The matrix rate on one ``[m, k] @ [k, n]`` product of random data, in GFLOP/s. The
    default is a layer-sized product (this model's MLP on 2048 tokens)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """The chip's matrix rate on a large square product: the ceiling that "share of peak"
    figures are taken against (on a GPU; a CPU uses the layer-sized ``gemm_gflops``)."""
    return gemm_gflops(device, dtype, n, n, n, reps=20) / 1000


def measure_latency(runner: ModelRunner, config: BatcherConfig, request: ScoreRequest,
                    reps: int) -> dict:  # type: ignore[type-arg]
    """One request at a time, ``reps`` times, each with a cold prefix cache (a new query)."""
    seconds = []
    for _ in range(reps):
        runner.cache = PrefixCache(runner.cache.max_bytes)
        sync(runner.scorer.device)
        started = time.perf_counter()
        asyncio.run(run_engine(runner, config, Workload("latency", [request])))
        sync(runner.scorer.device)
        seconds.append(time.perf_counter() - started)
    prompts = runner.builder.build(request.query, request.documents, request.instruction, request.options)
    tokens = sum(len(s) for s in prompts.sequences)
    row = dict(workload="latency", desc=f"1 request x {len(request.documents)} docs, alone, {reps} runs",
               path="engine", seconds=statistics.median(seconds), docs=len(request.documents),
               prompt_tokens=tokens, tokens_per_s=tokens / statistics.median(seconds),
               docs_per_s=len(request.documents) / statistics.median(seconds),
               p50_ms=1000 * percentile(seconds, 50), p95_ms=1000 * percentile(seconds, 95))
    print(json.dumps(row), flush=True)
    return row


def write_profile(runner: ModelRunner, config: BatcherConfig, request: ScoreRequest, path: Path) -> None:
    """Where one request's time goes, op by op (kernels on a GPU): what to fuse next. One
    batch of the whole request, whatever the token budget would have made of it."""
    from torch.profiler import ProfilerActivity, profile

    from worker.runner import Item

    device = runner.scorer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runner.cache = PrefixCache(runner.cache.max_bytes)
    prompts = runner.builder.build(request.query, request.documents, request.instruction, request.options)
    items = [Item(ids, prompts.shared_len if config.prefix_reuse else 0) for ids in prompts.sequences]
    # the runner on this thread, not through the batcher: the profiler sees this thread's ops
    with profile(activities=activities) as prof:
        runner.score_rows(items)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    print(f"profile of one request written to {path}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def linear_flops_per_token(config) -> float:  # type: ignore[no-untyped-def]
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return 2.0 * layers * (h * q + 2 * h * kv + q * h + 3 * h * i)


async def run_engine(runner: ModelRunner, config: BatcherConfig,
                     workload: Workload) -> tuple[list[list[float]], list[float], int]:
    batcher = Batcher(runner, runner.builder, config)
    batcher.start()
    latencies: list[float] = []

    computed = 0

    async def one(request: ScoreRequest) -> list[float]:
        nonlocal computed
        started = time.perf_counter()
        result = await batcher.score(request)
        latencies.append(time.perf_counter() - started)
        computed += result.computed_tokens
        return [s.score for s in result.scores]

    try:
        results = await asyncio.gather(*(one(r) for r in workload.requests))
    finally:
        await batcher.close()
    return list(results), latencies, computed


def measure_engine(runner: ModelRunner, config: BatcherConfig, wl: Workload, name: str,
                   flops_tok: float) -> tuple[dict, list[list[float]]]:  # type: ignore[type-arg]
    device = runner.scorer.device
    runner.cache = PrefixCache(runner.cache.max_bytes)  # no run may profit from an earlier one's prefixes
    prompts = [runner.builder.build(r.query, r.documents, r.instruction, r.options) for r in wl.requests]
    prompt_tokens = sum(len(s) for p in prompts for s in p.sequences)
    docs = sum(len(r.documents) for r in wl.requests)
    sync(device)
    started = time.perf_counter()
    scores, latencies, computed = asyncio.run(run_engine(runner, config, wl))
    sync(device)
    seconds = time.perf_counter() - started
    row = dict(workload=name, desc=wl.name, path="engine", seconds=seconds, docs=docs,
               prompt_tokens=prompt_tokens, computed_tokens=computed,
               tokens_per_s=prompt_tokens / seconds, docs_per_s=docs / seconds,
               p50_ms=1000 * percentile(latencies, 50), p95_ms=1000 * percentile(latencies, 95),
               executed_gflops=computed * flops_tok / seconds / 1e9)
    print(json.dumps(row), flush=True)
    return row, scores


def measure_card(model, tokenizer, wl: Workload, name: str, device: torch.device) -> dict:  # type: ignore[no-untyped-def, type-arg]
    prompt_tokens = sum(len(s) for r in wl.requests for s in card_prompt_ids(tokenizer, r, 8192))
    docs = sum(len(r.documents) for r in wl.requests)
    latencies, scores = [], []
    sync(device)
    started = time.perf_counter()
    for r in wl.requests:  # the card's loop serves one request at a time
        t0 = time.perf_counter()
        scores.append(card_scores(model, tokenizer, r, 8192))
        sync(device)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    row = dict(workload=name, desc=wl.name, path="card", seconds=seconds, docs=docs,
               prompt_tokens=prompt_tokens, tokens_per_s=prompt_tokens / seconds, docs_per_s=docs / seconds,
               p50_ms=1000 * percentile(latencies, 50), p95_ms=1000 * percentile(latencies, 95))
    print(json.dumps(row), flush=True)
    return {**row, "scores": scores}


@torch.inference_mode()
def check_alone(runner: ModelRunner, wl: Workload, name: str, count: int) -> dict:  # type: ignore[type-arg]
    """Largest difference between the engine and each pair run alone, the contract's reference."""
    request = wl.requests[0]
    prompts = runner.builder.build(request.query, request.documents, request.instruction, request.options)
    engine, _, _ = asyncio.run(run_engine(runner, BatcherConfig.for_device(runner.info().device),
                                          Workload(wl.name, [request])))
    worst_score = 0.0
    for ids, mine in list(zip(prompts.sequences, engine[0]))[:count]:
        logits = runner.model(torch.tensor([ids], device=runner.scorer.device)).logits[0, -1].float()
        ref_logit = float(logits[9693] - logits[2152])
        worst_score = max(worst_score, abs(mine - float(torch.sigmoid(torch.tensor(ref_logit)))))
    row = dict(workload=name, desc=wl.name, path=f"engine vs {count} pairs alone", max_alone_score_diff=worst_score)
    print(json.dumps(row), flush=True)
    return row


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=".cache/models/qwen3-reranker-0.6b-random")
    parser.add_argument("--size", default="0.6b", choices=["0.6b", "tiny"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--workloads", default="mixed,short,concurrent,lone")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--doc-tokens", type=int, default=256, help="length for the 'fixed' workload")
    parser.add_argument("--fixed-requests", type=int, default=1,
                        help="concurrent requests (distinct queries) in the 'fixed' workload")
    parser.add_argument("--latency-reps", type=int, default=0,
                        help="also time one 'fixed'-shaped request alone this many times (p50/p95)")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--no-card", action="store_true", help="skip the model-card baseline")
    parser.add_argument("--prefix-reuse", choices=["on", "off"], default="on")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the per-token layer work (auto: as served: on for cuda and for cpu bf16)")
    parser.add_argument("--attention", choices=["padded", "varlen"], default="padded",
                        help="attention kernel (varlen: FlashAttention variable-length, CUDA + bf16 only)")
    parser.add_argument("--check-alone", type=int, default=4,
                        help="per workload, compare this many scores with the pair run alone (the contract)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", default=None,
                        help="write the torch.profiler table of one 'fixed' request (the 25 costliest ops) here")
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        print(f"building random-weight {args.size} checkpoint in {model_dir} ...", flush=True)
        make_random_reranker(model_dir, args.size)
    runner = ModelRunner.load(str(model_dir), device=args.device, dtype=args.dtype,
                              compile=None if args.compile == "auto" else args.compile == "on",
                              attention=args.attention)
    device, dtype = runner.scorer.device, runner.dtype
    defaults = BatcherConfig.for_device(device.type)
    config = BatcherConfig(
        max_batch_tokens=args.max_batch_tokens or defaults.max_batch_tokens,
        max_batch_size=args.max_batch_size or defaults.max_batch_size,
        max_wait_ms=defaults.max_wait_ms, prefix_reuse=args.prefix_reuse == "on")
    print(f"device={device} dtype={dtype} compiled={runner.scorer.compiled} attention={args.attention} "
          f"threads={torch.get_num_threads()} "
          f"max_batch_tokens={config.max_batch_tokens} max_batch_size={config.max_batch_size} "
          f"prefix_reuse={config.prefix_reuse}", flush=True)
    runner.warmup()
    tokenizer = runner.builder.tokenizer
    workloads = build_workloads(tokenizer, args)
    flops_tok = linear_flops_per_token(runner.scorer.model.config)
    gemm = gemm_gflops(device, dtype)
    print(f"fp GEMM rate in this process: {gemm:.1f} GFLOP/s", flush=True)
    peak = peak_matmul_tflops(device, dtype) if device.type == "cuda" else None
    if peak:
        print(f"chip matmul rate (8192^3, {dtype}): {peak:.0f} TFLOP/s", flush=True)

    engine_rows = {name: measure_engine(runner, config, workloads[name], name, flops_tok)
                   for name in args.workloads.split(",")}
    engine_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [row for row, _ in engine_rows.values()]
    if args.latency_reps:
        alone = workloads["fixed"].requests[0]
        rows.append(measure_latency(runner, config, alone, args.latency_reps))
    if not args.no_card:
        # Side by side: each card run is followed at once by another engine run on the same
        # workload, and the ratio is taken between those two, so load drift cannot skew it.
        for name in args.workloads.split(","):
            card = measure_card(runner.model, tokenizer, workloads[name], name, device)
            again, scores = measure_engine(runner, config, workloads[name], name, flops_tok)
            again["path"] = "engine (rerun beside card)"
            card["speedup"] = card["seconds"] / again["seconds"]
            card["max_score_diff"] = max(abs(a - b) for xs, ys in zip(scores, card.pop("scores"))
                                         for a, b in zip(xs, ys))
            rows += [card, again]
    for name in args.workloads.split(",") if args.check_alone else []:
        rows.append(check_alone(runner, workloads[name], name, args.check_alone))
    if args.profile:
        write_profile(runner, config, workloads["fixed"].requests[0], Path(args.profile))
    gemm_after = gemm_gflops(device, dtype)
    print(f"fp GEMM rate at the end: {gemm_after:.1f} GFLOP/s (a large drop means the machine was busy)")
    print_table(rows, gemm, engine_rss_gb, device, dtype, peak)
    if args.json:
        Path(args.json).write_text(json.dumps({"gemm_gflops": gemm, "gemm_gflops_end": gemm_after,
                                               "peak_matmul_tflops": peak, "compile": runner.scorer.compiled,
                                               "attention": args.attention,
                                               "engine_peak_rss_gb": engine_rss_gb,
                                               "device": str(device), "dtype": str(dtype), "rows": rows}, indent=2))
    return 0


def print_table(rows: list[dict], gemm: float, rss_gb: float, device: torch.device, dtype: torch.dtype,  # type: ignore[type-arg]
                peak_tflops: float | None) -> None:
    peak = f"; chip matmul peak {peak_tflops:.0f} TFLOP/s" if peak_tflops else ""
    print(f"\n{device} {dtype}; GEMM {gemm:.0f} GFLOP/s{peak}; engine peak RSS {rss_gb:.2f} GB\n")
    ceiling = 1000 * peak_tflops if peak_tflops else gemm
    print("| workload | path | docs/s | tokens/s | p50 ms | p95 ms | executed GFLOP/s | of peak | speedup "
          "| max |score diff| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "max_alone_score_diff" in r:
            continue
        executed = r.get("executed_gflops", float("nan"))
        print(f"| {r['desc']} | {r['path']} | {r['docs_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {executed:.1f} | {executed / ceiling:.0%} | "
              f"{r.get('speedup', 1.0):.2f}x | {r.get('max_score_diff', 0.0):.2e} |")
    for r in rows:
        if "max_alone_score_diff" in r:
            print(f"\n{r['desc']}: {r['path']}: max |score difference| {r['max_alone_score_diff']:.2e}", end="")
    print()


if __name__ == "__main__":
    sys.exit(main())
