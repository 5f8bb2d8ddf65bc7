"""The ``rerank`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and keeps its top-level imports light (no torch, no web framework), so ``rerank --help`` and
the client-only install (``rerank score``) start fast and need nothing they do not use.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> module; a module missing from a client-only install is simply left out
COMMANDS = {
    "serve": "service.commands.serve",
    "score": "service.commands.score",
    "make-test-model": "service.commands.make_test_model",
    "keys": "service.commands.keys",
    "usage": "service.commands.usage",
    "gateway": "service.commands.gateway",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank", description="Serve and call Qwen3-Reranker.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an extra that is not installed
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
