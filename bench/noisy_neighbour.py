"""Noisy-neighbour benchmark: a flood tenant and a latency-sensitive tenant on one worker.

The flood tenant has ``--flood-clients`` calls of ``--flood-docs`` documents of about
``--flood-doc-tokens`` tokens in flight (``--flood-calls`` each, back to back): a fixed amount
of work. The quiet tenant sends one short document at a time, ``--quiet-gap-ms`` apart, while
the flood lasts (``--quiet-tenant same``: as the flood's own tenant, as every caller is under
``--no-auth``). Phases: the quiet tenant alone (``--seconds``), then ``--rounds`` times the
flood alone and both together under each variant (``--schedulers`` x ``--batch-ms``: the
device's time budget per batch, and 0, batches sized by tokens only, as before it),
interleaved and pooled by phase (a JSON line per phase as it ends), and the quiet tenant
alone once more (does it come back to its speed before the load?). All on the real serving
path below the RPC layer (``Batcher`` + ``ModelRunner``; the tenant is what the core sets from
the API key). Reported per phase: the quiet tenant's latency p50/p99/max, the throughput
(tokens the model ran for everyone, from the batches, over the flood's start to finish: the
same work under every variant, plus the quiet tenant's), the slowest batch, and how far the
cost model's estimates were from the measured batch times (median relative error).

    python bench/noisy_neighbour.py --size tiny --model-dir /work/models/qwen3-reranker-tiny-random
    python bench/noisy_neighbour.py --size 0.6b --model-dir /work/models/qwen3-reranker-0.6b-random
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import WORDS, percentile  # noqa: E402
from worker.batcher import Batcher, BatcherConfig, BatchStats  # noqa: E402
from worker.cost import CostModel  # noqa: E402
from worker.offline import make_random_reranker  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402
from worker.types import ScoreRequest  # noqa: E402

QUIET_QUERY = "capital of France"
QUIET_DOC = "Paris is the capital and largest city of France."


@dataclass
class Phase:
    name: str
    quiet_ms: list[float] = field(default_factory=list)
    batches: list[BatchStats] = field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> dict[str, object]:
        tokens = sum(b.computed_tokens for b in self.batches)
        quiet = self.quiet_ms or [float("nan")]
        errors = [abs(b.estimated_seconds - b.seconds) / b.seconds for b in self.batches
                  if b.estimated_seconds > 0 and b.seconds > 0]
        return {"phase": self.name, "quiet_calls": len(self.quiet_ms),
                "quiet_p50_ms": round(percentile(quiet, 50), 1), "quiet_p99_ms": round(percentile(quiet, 99), 1),
                "quiet_max_ms": round(max(quiet), 1),
                "tokens_per_s": round(tokens / self.seconds), "seconds": round(self.seconds, 2),
                # the model thread's busy time: wall time less idle gaps (tokenizing, waking up)
                "model_s": round(sum(b.seconds for b in self.batches), 2), "batches": len(self.batches),
                # where the model's time went: batches of one short row (the quiet tenant's) and the rest
                "short_batch_ms": _mean_ms([b for b in self.batches if b.computed_tokens < SHORT_BATCH_TOKENS]),
                "long_batch_ms": _mean_ms([b for b in self.batches if b.computed_tokens >= SHORT_BATCH_TOKENS]),
                "max_batch_ms": round(1000 * max((b.seconds for b in self.batches), default=0.0), 1),
                "estimate_error_pct": round(100 * percentile(errors, 50), 1) if errors else float("nan")}


def text_of_about(tokenizer, rng: random.Random, n: int) -> str:  # type: ignore[no-untyped-def]
    """About ``n`` tokens of words, tokenized once (bench.engine's exact fit re-tokenizes per
    word removed: minutes for the flood's 3,000-token documents)."""
    ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(n)), add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids[:n]))


SHORT_BATCH_TOKENS = 500


def _mean_ms(batches: list[BatchStats]) -> float:
    return round(1000 * sum(b.seconds for b in batches) / len(batches), 1) if batches else float("nan")


async def quiet_tenant(batcher: Batcher, phase: Phase, until: Callable[[], bool], gap_s: float,
                       tenant: str = "quiet") -> None:
    request = ScoreRequest(QUIET_QUERY, [QUIET_DOC], tenant=tenant)
    while True:  # at least one call
        started = time.perf_counter()
        await batcher.score(request)
        phase.quiet_ms.append(1000 * (time.perf_counter() - started))
        if until():
            return
        await asyncio.sleep(gap_s)


async def flood_tenant(batcher: Batcher, request: ScoreRequest, calls: int) -> None:
    for _ in range(calls):
        await batcher.score(request)


async def run_phase(runner: ModelRunner, cost: CostModel, config: BatcherConfig, into: Phase,
                    flood: ScoreRequest | None, args: argparse.Namespace, quiet: bool = True) -> None:
    """One phase, added to ``into`` (phases of one name pool across rounds). With a flood, the
    phase is the flood's fixed work, start to finish (the same under every policy), and the
    quiet tenant runs from ``--flood-lead-s`` after its first batch until it is done."""
    phase = Phase(into.name)
    # the cost model fitted once at warm-up, as a server's is, and corrected by every phase since
    batcher = Batcher(runner, runner.builder, config, on_batch=phase.batches.append, cost=cost)
    batcher.start()
    started = time.perf_counter()
    try:
        if flood is None:
            await quiet_tenant(batcher, phase, lambda: time.perf_counter() > started + args.seconds,
                               args.quiet_gap_ms / 1000)
        else:
            work = asyncio.gather(*(flood_tenant(batcher, flood, args.flood_calls)
                                    for _ in range(args.flood_clients)))
            while not phase.batches:
                await asyncio.sleep(0.01)
            await asyncio.sleep(args.flood_lead_s)
            if quiet:
                await quiet_tenant(batcher, phase, work.done, args.quiet_gap_ms / 1000,
                                   "flood" if args.quiet_tenant == "same" else "quiet")
            await work
        phase.seconds = time.perf_counter() - started
    finally:
        await batcher.close()
    print(json.dumps(phase.row()), flush=True)
    into.quiet_ms += phase.quiet_ms
    into.batches += phase.batches
    into.seconds += phase.seconds


def cpu_name() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


async def run(runner: ModelRunner, args: argparse.Namespace) -> list[dict[str, object]]:
    rng = random.Random(args.seed)
    tokenizer = runner.builder.tokenizer
    flood = ScoreRequest("which passages explain how the capital city grew along the river",
                         [text_of_about(tokenizer, rng, args.flood_doc_tokens) for _ in range(args.flood_docs)],
                         tenant="flood")
    base = BatcherConfig.for_device(runner.scorer.device.type)
    config = BatcherConfig(max_batch_tokens=args.max_batch_tokens or base.max_batch_tokens,
                           max_batch_size=base.max_batch_size, max_wait_ms=base.max_wait_ms,
                           max_batch_ms=base.max_batch_ms,
                           max_queued_docs=10 * args.flood_docs * args.flood_clients,
                           max_queued_tokens=10 * args.flood_docs * args.flood_clients * args.flood_doc_tokens)
    cost = await calibrated(runner, config)
    variants = {_variant(s, ms): dataclasses.replace(config, scheduler=s, max_batch_ms=ms)
                for s in args.schedulers.split(",")
                for ms in (config.max_batch_ms if b == "default" else float(b) for b in args.batch_ms.split(","))}
    kinds = ["flood alone", "flood"] if args.flood_alone else ["flood"]
    names = ["quiet alone", *(f"{k}, {v}" for k in kinds for v in variants), "quiet alone, after"]
    phases = {name: Phase(name) for name in names}
    await run_phase(runner, cost, config, phases["quiet alone"], None, args)
    for round_ in range(args.rounds):  # interleaved, the order turned each round: drift in a shared
        for kind in kinds:                # machine's load hits every variant alike
            for name in list(variants)[::-1] if round_ % 2 else variants:
                await run_phase(runner, cost, variants[name], phases[f"{kind}, {name}"], flood, args,
                                quiet=kind == "flood")
    await run_phase(runner, cost, config, phases["quiet alone, after"], None, args)
    return [p.row() for p in phases.values()]


def _variant(scheduler: str, max_batch_ms: float) -> str:
    return f"{scheduler}, " + (f"{max_batch_ms:g} ms" if max_batch_ms else "tokens only")


async def calibrated(runner: ModelRunner, config: BatcherConfig) -> CostModel:
    """The cost model a server fits at warm-up (the runner is warm already)."""
    batcher = Batcher(runner, runner.builder, config)
    await batcher.warmup()
    print(f"cost model: {json.dumps({k: round(v, 3) for k, v in batcher.cost.coefficients().items()})} "
          "(ms per batch, row, 1k tokens, 1M attention pairs)", flush=True)
    await batcher.close()
    return batcher.cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/work/models/qwen3-reranker-tiny-random")
    parser.add_argument("--size", default="tiny", choices=["0.6b", "tiny"], help="built if --model-dir is empty")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flood-docs", type=int, default=24)
    parser.add_argument("--flood-doc-tokens", type=int, default=400, help="~300 words")
    parser.add_argument("--flood-clients", type=int, default=1, help="flood calls in flight at once")
    parser.add_argument("--flood-calls", type=int, default=1, help="calls each flood client makes, one after another")
    parser.add_argument("--flood-lead-s", type=float, default=1.0,
                        help="the flood runs this long (from its first batch) before a phase starts")
    parser.add_argument("--quiet-gap-ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="of the quiet tenant alone")
    parser.add_argument("--rounds", type=int, default=2, help="flood phases per scheduler, interleaved, pooled")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: the device's")
    parser.add_argument("--schedulers", default="fair", help="fair, fifo or both (comma-separated)")
    parser.add_argument("--batch-ms", default="default,0",
                        help="time budgets per batch to compare: ms, 'default' (the device's) or 0 (tokens only)")
    parser.add_argument("--quiet-tenant", choices=["other", "same"], default="other",
                        help="same: the quiet calls come from the flood's tenant (every caller under --no-auth)")
    parser.add_argument("--flood-alone", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the flood without the quiet tenant (throughput without interruptions)")
    parser.add_argument("--prefix-cache-mb", type=int, default=512,
                        help="the runner's prefix cache: a row runs in pieces only if its K/V fits in it")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        print(f"building random-weight {args.size} checkpoint in {model_dir} ...", flush=True)
        make_random_reranker(model_dir, args.size)
    runner = ModelRunner.load(str(model_dir), device=args.device, prefix_cache_mb=args.prefix_cache_mb)
    runner.warmup()
    print(f"cpu={cpu_name()!r} device={args.device} model={model_dir.name}", flush=True)
    rows = asyncio.run(run(runner, args))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
