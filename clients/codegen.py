"""Regenerate the Python stubs from ``protos/``: ``python -m clients.codegen``.

The generated modules are committed (callers need no protoc) and never edited by hand;
``tests/test_codegen.py`` regenerates them into a temporary directory and fails if the
result differs from what is committed. The output depends on the generator's version, which
is why ``grpcio-tools`` and ``mypy-protobuf`` are pinned in the ``test`` extra: bump them
together with a regeneration.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients"
PROTOS = ("rerank/v1/rerank.proto",)
# What a run writes, relative to the output root; the test compares exactly these.
GENERATED = ("rerank/v1/rerank_pb2.py", "rerank/v1/rerank_pb2.pyi",
             "rerank/v1/rerank_pb2_grpc.py", "rerank/v1/rerank_pb2_grpc.pyi")


def generate(out_root: Path = OUT_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) with the Python, gRPC and mypy-protobuf plugins."""
    from grpc_tools import protoc  # the test extra: callers never need it

    out_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_root}", f"--grpc_python_out={out_root}",
            *_plugin("protoc-gen-mypy"), *_plugin("protoc-gen-mypy_grpc"),
            f"--mypy_out={out_root}", f"--mypy_grpc_out={out_root}", *PROTOS]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    return [out_root / name for name in GENERATED]


def _plugin(name: str) -> list[str]:
    # mypy-protobuf's plugins sit beside the interpreter in a venv, which need not be on PATH
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise RuntimeError(f"{name} not found: pip install -e '.[test]' (mypy-protobuf)")
    return [f"--plugin={name}={path}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_ROOT, help="output root (default: clients/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
