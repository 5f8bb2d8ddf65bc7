"""``rerank score``: call a running server and print the ranked documents.

Imports only the client (grpc, protobuf, the generated stubs), so it works on the
client-only install. Documents come from the arguments, or one per line from a file or
standard input (``--documents-file -``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

HELP = "rerank documents against a query on a running server and print them best first"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="the search query")
    parser.add_argument("documents", nargs="*", help="documents to rank (or use --documents-file)")
    parser.add_argument("--documents-file", type=Path, metavar="FILE",
                        help="read documents from FILE, one per line ('-': standard input)")
    parser.add_argument("--target", default=os.environ.get("RERANK_TARGET", "localhost:50051"),
                        help="server address host:port [env RERANK_TARGET]")
    parser.add_argument("--instruction", help="task instruction (default: the model's)")
    parser.add_argument("--top-n", type=int, default=None, help="print only the best N")
    parser.add_argument("--no-truncate", action="store_true",
                        help="refuse documents too long for the model instead of cutting them")
    parser.add_argument("--model", default=None, help="model name to ask for (default: the served one)")
    parser.add_argument("--api-key", default=os.environ.get("RERANK_API_KEY"),
                        help="API key, sent as 'authorization: Bearer' [env RERANK_API_KEY]")
    parser.add_argument("--tls", action="store_true", help="connect over TLS")
    parser.add_argument("--ca", type=Path, help="PEM root certificates for --tls (default: the system's)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline for the call")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")


def run(args: argparse.Namespace) -> int:
    from clients import RerankClient, RerankError

    documents = list(args.documents) + _read_documents(args.documents_file)
    roots = args.ca.read_bytes() if args.ca else None
    try:
        with RerankClient(args.target, api_key=args.api_key, tls=args.tls or roots is not None,
                          root_certificates=roots, timeout_s=args.timeout_s) as client:
            result = client.rerank(args.query, documents, instruction=args.instruction, top_n=args.top_n,
                                   truncate=not args.no_truncate, model=args.model)
    except RerankError as exc:
        print(f"rerank score: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    for rank, r in enumerate(result.results, 1):
        cut = " (truncated)" if r.truncated else ""
        print(f"{rank:>3}  {r.score:.4f}  [{r.index}]  {_preview(documents[r.index])}{cut}")
    return 0


def _read_documents(path: Path | None) -> list[str]:
    if path is None:
        return []
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _preview(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
