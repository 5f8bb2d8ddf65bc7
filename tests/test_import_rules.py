"""What may import what, held the way tests/test_facts_once.py holds the limits: the rules of
docs/ARCHITECTURE.md ("What may import what"), read from the product code's own imports
(every import statement, at module level or inside a function), so a line that breaks one
fails here, not in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("service", "worker", "clients")
FRONTS = ("service.http", "service.grpc")
ENGINES = ("service.local", "service.remote")
CORE = ("service.core", "service.calls", "service.seams")  # the core, its vocabulary and its seams


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for top in PRODUCT for p in sorted((ROOT / top).rglob("*.py"))
           if not p.is_relative_to(ROOT / "clients" / "rerank")}  # generated stubs


def _imports(path: Path) -> set[str]:
    """Every module ``path`` names in an import, as written (``from a import b``: ``a`` and ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _product(name: str) -> str | None:
    """The product module ``name`` is, or lies in; None for a library."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {m: {d for i in found if (d := _product(i)) not in (None, m)} for m, found in IMPORTS.items()}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _breaking(importer: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, found in IMPORTS.items() if _under(m, *importer)
                  for i in found if _under(i, *forbidden))


def test_the_product_code_has_no_import_circle() -> None:
    def circle_from(start: str, path: list[str]) -> list[str] | None:
        for dep in sorted(GRAPH[path[-1]]):
            if dep == start:
                return [*path, dep]
            if dep not in path and dep > start:  # each circle once, from its smallest module
                found = circle_from(start, [*path, dep])
                if found:
                    return found
        return None

    circles = [" -> ".join(c) for m in sorted(GRAPH) if (c := circle_from(m, [m]))]
    assert circles == []


@pytest.mark.parametrize(("importer", "forbidden"), [
    # the worker is torch and data: no wire format, no billing, nothing of the service above it
    (("worker",), ("service", "clients", "grpc", "fastapi", "starlette", "uvicorn", "pydantic", "sqlalchemy",
                   "prometheus_client", "opentelemetry")),
    (("service",), ("torch", "transformers")),  # the model lives behind worker.types.Runner
    (("clients",), ("service", "worker")),  # the client package installs without the server
    # the fronts translate wire formats into the core's vocabulary and back: nothing of the worker
    (FRONTS, ("worker", *ENGINES, "service.billing")),
    # the core: its own types and seams; no front, engine, billing or composition
    (CORE, (*FRONTS, *ENGINES, "service.billing", "service.app", "service.config", "worker.prompt",
            "worker.batcher", "worker.queue", "worker.runner")),
    # the core's vocabulary and seams are plain values and protocols: they import not the core itself
    (("service.calls", "service.seams"), ("service.core", "service.tracing", "service.flight")),
    (("service.billing",), (*FRONTS, *ENGINES, "worker", "service.app")),
    # tracing is called from every layer of the service, so it imports none of them (the worker's
    # batch statistics it reads by type only); OpenTelemetry stays in service/tracing.py alone
    (("service.tracing",), (*FRONTS, *ENGINES, *CORE, "service.billing", "service.app",
                            "service.config", "worker.queue", "worker.runner", "clients")),
])
def test_what_may_import_what(importer: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert _breaking(importer, forbidden) == []


def test_opentelemetry_is_imported_by_the_tracing_module_alone() -> None:
    """Off by default at no cost: no other module may import it (service/tracing.py does, lazily)."""
    assert sorted(m for m, found in IMPORTS.items() for i in found if _under(i, "opentelemetry")
                  and m != "service.tracing") == []


def test_only_the_local_engine_builds_the_workers_request() -> None:
    """A new per-query field reaches the worker through ``service/local.py`` alone."""
    builders = sorted(m for m, path in MODULES.items() if _under(m, "service") and "ScoreRequest" in path.read_text())
    assert builders == ["service.local"]


def test_the_rules_see_the_code() -> None:
    """A rule that checks nothing cannot fail: the walk must find the modules and their imports."""
    assert {"service.core", "service.local", "service.http.app", "worker.batcher"} <= set(MODULES)
    assert "service.calls" in GRAPH["service.local"] and "worker.types" in GRAPH["service.calls"]
    assert {"service.calls", "service.seams"} <= GRAPH["service.core"]
