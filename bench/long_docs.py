"""Long documents: chunked against whole, on the serving path (``Batcher`` + ``ModelRunner``).

For each document length (``--tokens``, the document's own tokens) and each path, one call of
one document, in a process of its own so that its peak RSS is its own:

* ``whole``: ``--max-length 32768`` (the checkpoint's positions), one chunk: the whole
  document is one pair, its attention over all of it;
* ``chunked``: ``--chunk-length`` (8192 by default, the server's default ``--max-length``) and
  up to ``--max-chunks`` chunks (docs/SCORING.md, "Long documents: chunks").

Reported per run, one JSON line: seconds for the call (after a short warm-up call), tokens the
model computed and their rate, the chunks, the process's peak RSS after the warm-up (the
weights, memory-mapped, are read in by then) and after the call, the difference (what the long
call itself added), and the CPU. Batches are sized by tokens only (``max_batch_ms`` 0: no calibration ladder), which
changes nothing here: a row this long is over any batch's budget and runs alone either way.

    python bench/long_docs.py --model-dir /work/models/q06b --tokens 2000 8000 30000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import text_of_tokens  # noqa: E402
from worker.batcher import Batcher, BatcherConfig  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402
from worker.types import ScoreRequest  # noqa: E402

QUERY = "which river flows through the capital"
WHOLE_LENGTH = 32_768


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def one_call(runner: ModelRunner, request: ScoreRequest) -> tuple[float, int, int, float]:
    """The call's seconds, computed tokens and chunks, and the peak RSS before it (the weights
    are memory-mapped: the warm-up call reads them all in)."""
    batcher = Batcher(runner, runner.builder, BatcherConfig(max_wait_ms=0, max_batch_ms=0))
    batcher.start()
    try:
        await batcher.score(ScoreRequest("warm-up", ["a short document"]))
        warm = rss_mib()
        started = time.perf_counter()
        result = await batcher.score(request)
        seconds = time.perf_counter() - started
    finally:
        await batcher.close()
    return seconds, result.computed_tokens, result.scores[0].chunks, warm


def run_one(args: argparse.Namespace) -> dict[str, object]:
    whole, tokens = args.path == "whole", args.tokens[0]
    max_length = WHOLE_LENGTH if whole else args.chunk_length
    runner = ModelRunner.load(str(args.model_dir), dtype=args.dtype, max_length=max_length, compile=False)
    doc = text_of_tokens(runner.builder.tokenizer, random.Random(tokens), tokens)
    request = ScoreRequest(QUERY, [doc], max_chunks=1 if whole else args.max_chunks)
    seconds, computed, chunks, warm = asyncio.run(one_call(runner, request))
    return {"path": args.path, "doc_tokens": tokens, "max_length": max_length, "chunks": chunks,
            "seconds": round(seconds, 2), "computed_tokens": computed,
            "tokens_per_s": round(computed / seconds, 1), "rss_warm_mib": round(warm),
            "peak_rss_mib": round(rss_mib()), "call_rss_mib": round(rss_mib() - warm), "dtype": args.dtype,
            "cpu": cpu_name()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2000, 8000, 30000])
    parser.add_argument("--paths", nargs="+", default=["chunked", "whole"], choices=["chunked", "whole"])
    parser.add_argument("--chunk-length", type=int, default=8192)
    parser.add_argument("--max-chunks", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # a child process's one run
    args = parser.parse_args()
    if args.path:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    for tokens in args.tokens:
        for path in args.paths:
            child = [sys.executable, __file__, "--model-dir", str(args.model_dir), "--tokens", str(tokens),
                     "--path", path, "--chunk-length", str(args.chunk_length), "--max-chunks",
                     str(args.max_chunks), "--dtype", args.dtype]
            out = subprocess.run(child, capture_output=True, text=True, check=False)
            line = out.stdout.strip().splitlines()[-1:] or [json.dumps({"path": path, "doc_tokens": tokens,
                                                                        "error": out.stderr[-2000:]})]
            print(line[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
