"""Long documents (issue 24): one document of 2k-30k tokens, scored whole at ``--max-length
32768`` against chunked at the served default, on the real serving path below the RPC layer.

For each document length and each path, a fresh subprocess loads the checkpoint, builds the
``Batcher`` + ``ModelRunner`` exactly as ``rerank serve`` does on this device (fp32 on a CPU,
``torch.compile`` where served, the device's batcher defaults, the time budget calibrated at
warm-up), scores one query against one document of that many tokens of its own (built with the
real tokenizer), and exits. The paths:

* ``base``: load and warm up, score nothing: the RSS every other path starts from;
* ``whole``: ``max_length`` 32768 (``--whole-max-length``), ``max_chunks`` 1: the document fits
  in one row and is scored whole;
* ``chunked``: the served default ``max_length`` (service/config.py's ``--max-length``, 8192),
  ``max_chunks`` as many as cover the document (worker/prompt.py's rule): every chunk scored;
* ``small``: the same at ``--small-max-length`` (2048).

Reported per path and length: the call's wall time, the tokens the model computed and their
rate, the batches it took and the slowest of them, the peak RSS of the process that ran only
that path (``ru_maxrss`` of the child, from ``os.wait4``), the score (chunked: the best chunk's,
which chunk, how many), and what the document costs another caller: a short call (one ~10
token document) from another tenant sent ``--neighbour-after-s`` after the long call, timed
against the same short call alone in the same process just before (``neighbour alone``).
With ``--neighbour-after-s 0`` no neighbour is sent.

    python bench/long_documents.py --model-dir /work/models/q06b                 # all lengths, all paths
    python bench/long_documents.py --model-dir /work/models/q06b --lengths 2000,8000 --paths base,whole
    python bench/long_documents.py --model-dir /work/models/tiny --size tiny --lengths 600 \\
        --whole-max-length 1024 --chunked-max-length 256 --small-max-length 128   # the smoke test's
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import text_of_tokens  # noqa: E402
from service.config import ServeConfig  # noqa: E402
from worker.batcher import Batcher, BatcherConfig, BatchStats  # noqa: E402
from worker.offline import make_random_reranker  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402
from worker.types import PromptOptions, ScoreRequest  # noqa: E402

PATHS = ("base", "whole", "chunked", "small")
QUERY = "which passages explain how the capital city grew along the river"
NEIGHBOUR = ScoreRequest("capital of France", ["Paris is the capital and largest city of France."],
                         tenant="neighbour")
SERVED_MAX_LENGTH: int = {f.name: f.default for f in dataclasses.fields(ServeConfig)}["max_length"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vm_hwm_gb() -> float:
    """This process's own peak RSS so far (the kernel's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def max_length_of(args: argparse.Namespace, path: str) -> int:
    return {"base": args.chunked_max_length, "whole": args.whole_max_length,
            "chunked": args.chunked_max_length, "small": args.small_max_length}[path]


# -- the child: one path, one length, one process --------------------------------------------------

async def child(args: argparse.Namespace) -> dict[str, object]:
    max_length = max_length_of(args, args.child)
    runner = ModelRunner.load(args.model_dir, device=args.device, dtype=args.dtype, max_length=max_length,
                              compile=None if args.compile == "auto" else args.compile == "on")
    info = runner.info()
    batches: list[BatchStats] = []
    config = BatcherConfig.for_device(info.device)
    if args.max_batch_ms is not None:  # 0: no time budget, nothing split (the row runs whole)
        config = dataclasses.replace(config, max_batch_ms=args.max_batch_ms)
    batcher = Batcher(runner, runner.builder, config, on_batch=batches.append)
    batcher.start()
    await batcher.warmup()  # as the server does: runner warm-up, then the time budget's calibration
    row: dict[str, object] = dict(path=args.child, doc_tokens=args.length, max_length=max_length,
                                  dtype=str(runner.dtype).removeprefix("torch."), compiled=runner.scorer.compiled,
                                  attention=str(info.attention), max_split_tokens=info.max_split_tokens,
                                  max_batch_ms=config.max_batch_ms,
                                  warm_rss_gb=vm_hwm_gb())
    try:
        if args.child == "base":
            return row
        tokenizer = runner.builder.tokenizer
        doc = text_of_tokens(tokenizer, random.Random(args.seed), args.length)
        width = max_length - len(runner.builder.prefix_ids) - len(runner.builder.suffix_ids) - 64
        chunks = 1 if args.child == "whole" else max(1, math.ceil(args.length / max(1, width)) + 1)
        request = ScoreRequest(QUERY, [doc], options=PromptOptions(max_chunks=chunks), tenant="long")
        prompts = runner.builder.build(request.query, request.documents, request.instruction, request.options)
        alone_started = time.perf_counter()
        await batcher.score(NEIGHBOUR)
        neighbour_alone = time.perf_counter() - alone_started
        batches.clear()
        started = time.perf_counter()
        long_call = asyncio.ensure_future(batcher.score(request))
        neighbour_s = in_flight = None
        if args.neighbour_after_s > 0:
            await asyncio.sleep(args.neighbour_after_s)
            in_flight = not long_call.done()
            sent = time.perf_counter()
            await batcher.score(NEIGHBOUR)
            neighbour_s = time.perf_counter() - sent
        result = await long_call
        seconds = time.perf_counter() - started
        doc_score = result.scores[0]
        # the long call's batches, not the neighbour's: a piece (of a row walked) pads nothing
        long_batches = [b for b in batches if b.computed_tokens > 64 or not b.padded_tokens]
        row.update(
            prompt_tokens=sum(len(s) for s in prompts.sequences), computed_tokens=result.computed_tokens,
            seconds=seconds, tokens_per_s=result.computed_tokens / seconds, chunks=doc_score.chunks,
            best_chunk=doc_score.best_chunk, score=doc_score.score, truncated=doc_score.truncated,
            batches=len(long_batches), slowest_batch_s=max((b.seconds for b in long_batches), default=0.0),
            neighbour_alone_s=neighbour_alone, neighbour_s=neighbour_s, neighbour_while_long_in_flight=in_flight)
        pieces = sorted(b.seconds for b in long_batches if not b.padded_tokens)
        if pieces:  # how a row's pieces kept to the budget, and to the cost model's estimate of each
            row.update(piece_s_p50=pieces[len(pieces) // 2], piece_s_p90=pieces[9 * len(pieces) // 10],
                       piece_over_estimate_max=max(b.seconds / b.estimated_seconds for b in long_batches
                                                   if not b.padded_tokens and b.estimated_seconds > 0))
        return row
    finally:
        await batcher.close()
        row["peak_rss_gb_self"] = vm_hwm_gb()


# -- the parent: one subprocess per (length, path) -------------------------------------------------

def run_child(args: argparse.Namespace, path: str, length: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", path, "--length", str(length), "--model-dir", args.model_dir,
           "--whole-max-length", str(args.whole_max_length), "--chunked-max-length", str(args.chunked_max_length),
           "--small-max-length", str(args.small_max_length), "--compile", args.compile,
           "--neighbour-after-s", str(args.neighbour_after_s), "--seed", str(args.seed)]
    cmd += ["--max-batch-ms", str(args.max_batch_ms)] if args.max_batch_ms is not None else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(args.child_timeout_s, proc.kill)
    timer.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    # wait4, not proc.wait(): the kernel's resource usage of this child alone (ru_maxrss: its peak RSS)
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{path} at {length} tokens failed (exit {proc.returncode}, timeout "
                         f"{args.child_timeout_s:.0f} s); its output:\n{out[-2000:]}")
    row: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    print("\n| document tokens | path | max_length | chunks (best) | prompt tokens | computed tokens | seconds "
          "| tokens/s | batches (slowest s) | peak RSS GiB | score | neighbour s (alone s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["path"] == "base":
            print(f"| - | base (load + warm-up) | {r['max_length']} | - | - | - | - | - | - | "
                  f"{r['peak_rss_gb']:.2f} | - | - |")
            continue
        neighbour = ("-" if r["neighbour_s"] is None else
                     f"{r['neighbour_s']:.2f} ({r['neighbour_alone_s']:.2f})"
                     + ("" if r["neighbour_while_long_in_flight"] else ", long call already done"))
        print(f"| {r['doc_tokens']:,} | {r['path']} | {r['max_length']} | {r['chunks']} ({r['best_chunk']}) | "
              f"{r['prompt_tokens']:,} | {r['computed_tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['batches']} ({r['slowest_batch_s']:.1f}) | {r['peak_rss_gb']:.2f} | {r['score']:.4f} | "
              f"{neighbour} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=".cache/models/qwen3-reranker-0.6b-random")
    parser.add_argument("--size", default="0.6b", choices=["0.6b", "tiny"], help="to build a missing checkpoint")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: as served (fp32 on a CPU)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: as served")
    parser.add_argument("--lengths", default="2000,8000,16000,30000", help="the document's own tokens")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"of {', '.join(PATHS)}")
    parser.add_argument("--whole-max-length", type=int, default=32768)
    parser.add_argument("--chunked-max-length", type=int, default=SERVED_MAX_LENGTH)
    parser.add_argument("--small-max-length", type=int, default=2048)
    parser.add_argument("--neighbour-after-s", type=float, default=1.0,
                        help="send the short call this long after the long one (0: none)")
    parser.add_argument("--child-timeout-s", type=float, default=900.0, help="kill a path that takes longer")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-batch-ms", type=float, default=None,
                        help="the batcher's time budget (default: as served; 0: none, a long row runs whole)")
    parser.add_argument("--json", default=None, help="also write the results here (after each path)")
    parser.add_argument("--child", choices=PATHS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(asyncio.run(child(args))), flush=True)
        return 0
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths {sorted(unknown)}: use {', '.join(PATHS)}")
    if not (Path(args.model_dir) / "config.json").exists():
        print(f"building random-weight {args.size} checkpoint in {args.model_dir} ...", flush=True)
        make_random_reranker(Path(args.model_dir), args.size)
    header = dict(cpu=cpu_name(), cores=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  load_avg_start=os.getloadavg())
    print(json.dumps(header), flush=True)
    rows: list[dict[str, object]] = []
    runs = ([("base", 0)] if "base" in paths else []) + [
        (path, int(n)) for n in args.lengths.split(",") for path in paths if path != "base"]
    for path, length in runs:  # length by length: a cut run still has every path of the lengths it did
        rows.append(run_child(args, path, length))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({**header, "load_avg_end": os.getloadavg(), "rows": rows},
                                                  indent=2))
    print(f"\n{header['cpu']}, {header['cores']} cores; load average at the start "
          f"{header['load_avg_start'][0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
