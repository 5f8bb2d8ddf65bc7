"""``rerank make-test-model``: write a random-weight Qwen3 reranker checkpoint, offline."""

from __future__ import annotations

import argparse

HELP = ("write a random-weight Qwen3-Reranker checkpoint (real Qwen3 tokenizer) for tests, "
        "demos and benchmarks where the real weights cannot be downloaded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="directory to write (config, safetensors, tokenizer)")
    parser.add_argument("--size", choices=["tiny", "0.6b"], default="tiny",
                        help="tiny: 2 layers, hidden 64; 0.6b: the real Qwen3-Reranker-0.6B shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights' dtype on disk (Qwen publishes bf16: every weight bf16-exact)")
    parser.add_argument("--tokenizer-from", default=None,
                        help="copy the tokenizer of this checkpoint instead of building Qwen3's")


def run(args: argparse.Namespace) -> int:
    from worker.offline import make_random_reranker

    path = make_random_reranker(args.out_dir, args.size, seed=args.seed, tokenizer_from=args.tokenizer_from,
                                dtype=args.dtype)
    print(path)
    return 0
