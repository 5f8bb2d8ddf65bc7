"""Shared fixtures: the tiny random-weight Qwen3 reranker, built once per test run.

The checkpoint goes through the real ``save_pretrained`` / ``from_pretrained`` path with the
real Qwen3 tokenizer (built offline), so every test exercises the loading code users run.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.offline import make_random_reranker

    return make_random_reranker(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(autouse=True)
def _servers_bind_free_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every HTTP server a test starts binds port 0: a fixed port (the default 8080) fails
    whenever anything else on the host holds it, a server started the README's way included."""
    from service.http.server import HttpServer

    start = HttpServer.start

    async def start_on_port_0(self: HttpServer) -> None:
        assert self.port == 0, f"a test started an HTTP server on fixed port {self.port}: pass http_port=0"
        await start(self)

    monkeypatch.setattr(HttpServer, "start", start_on_port_0)
