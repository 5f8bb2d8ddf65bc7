"""The load tool against real servers, at small bounded loads (the full 1..256 sweep is run by
hand: docs/LOAD_AND_FAULTS.md).

``python -m bench.load --spawn`` is run as a user runs it: it starts ``rerank serve`` with the
tiny checkpoint and a SQLite ledger, drives both fronts at each level, prints the table, and
exits non-zero unless the ledger reconciles with what its clients saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import running_app

from service.http.server import HttpServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_cli_sweeps_both_fronts_and_reconciles_the_ledger(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", "--spawn", "--model", str(tiny_model_dir), "--clients", "1,4",
         "--requests-per-client", "3", "--documents", "4", "--serve-env", "OMP_NUM_THREADS=1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    levels = [(lv["transport"], lv["clients"], lv["requests"], lv["succeeded"]) for lv in result["levels"]]
    assert levels == [("grpc", 1, 3, 3), ("grpc", 4, 12, 12), ("http", 1, 3, 3), ("http", 4, 12, 12)]
    assert all(lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"] for lv in result["levels"])
    assert result["reconciliation"]["ok"] and result["reconciliation"]["records"] == 30
    assert "| grpc | 4 | 12 | 12 | 0 |" in done.stdout and "ledger OK" in done.stdout


async def test_http_front_answers_without_nagle_delay() -> None:
    """Latency under load starts from the latency of one call. With Nagle's algorithm on the
    server's sockets every HTTP response waited ~40 ms for the client's delayed ACK; the best
    of ten sequential calls shows whether that floor is back."""
    async with running_app() as app:
        http = next(c for c in app.components if isinstance(c, HttpServer))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.port}") as client:
            best = {"health": 1.0, "rerank": 1.0}
            for _ in range(10):
                for name, call in (("health", client.get("/health")),
                                   ("rerank", client.post("/v1/rerank", json={"query": "q", "documents": ["a"]}))):
                    started = time.perf_counter()
                    assert (await call).status_code == 200
                    best[name] = min(best[name], time.perf_counter() - started)
    assert max(best.values()) < 0.02, f"best-of-10 latencies {best}: a delayed-ACK floor (~40 ms)?"
