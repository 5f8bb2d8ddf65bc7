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
