"""The ``rerank`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and keeps its top-level imports light (no torch, no web framework), so ``rerank --help`` and
the client-only install (``rerank score``) start fast and need nothing they do not use. On a
client-only install every serve-side command still exists and says which extra it needs,
whether its module or its work is what imports the missing package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

SERVE_EXTRA = "rerank {command} needs the serve extra: pip install 'qwen3-rerank[serve]' (missing: {module})"
OUR_PACKAGES = {"service", "worker", "clients", "rerank"}  # missing one of these is a broken install, not an extra

# subcommand -> module
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
        except ModuleNotFoundError as exc:  # an extra that is not installed: the command says so when run
            if _ours(exc):
                raise
            cmd = sub.add_parser(name, help=f"(needs the serve extra) missing {exc.name}", add_help=False)
            cmd.add_argument("ignored", nargs=argparse.REMAINDER)
            cmd.set_defaults(handler=None, missing=exc.name)
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=DefaultsOnce)
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.run)
    return parser


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """"(default: X)" after each option's help, unless the help already says its default or
    there is none to say (``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.handler is None:
            raise ModuleNotFoundError(name=args.missing)
        return int(args.handler(args) or 0)
    except ModuleNotFoundError as exc:
        if _ours(exc):
            raise
        print(SERVE_EXTRA.format(command=args.command, module=exc.name), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _ours(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").partition(".")[0] in OUR_PACKAGES


if __name__ == "__main__":
    sys.exit(main())
