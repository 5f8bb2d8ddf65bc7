"""The in-process engine: the worker's batcher behind the core's ``Engine`` seam.

``BatcherEngine`` maps worker errors to service errors and the runner's facts to
``ModelInfo``; ``WarmingEngine`` answers UNAVAILABLE until the model is loaded and warm.
"""

from __future__ import annotations

from service.core import ModelInfo
from service.errors import Code, ServiceError, from_worker
from worker.batcher import Batcher  # no torch: the runner behind it is built by the caller
from worker.types import ScoreRequest, ScoreResult, WorkerError


class BatcherEngine:
    """The in-process engine: the worker's batcher, with its errors mapped."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    async def score(self, request: ScoreRequest) -> ScoreResult:
        try:
            return await self.batcher.score(request)
        except WorkerError as exc:
            raise from_worker(exc) from exc

    def info(self) -> ModelInfo:
        info = self.batcher.runner.info()
        return ModelInfo(info.model, info.max_length, info.dtype, info.device)


class WarmingEngine:
    """The core's engine: UNAVAILABLE until the model is loaded and warm, then the batcher."""

    def __init__(self) -> None:
        self.batcher: Batcher | None = None
        self._engine: BatcherEngine | None = None

    def attach(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self._engine = BatcherEngine(batcher)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self._ready().score(request)

    def info(self) -> ModelInfo:
        return self._ready().info()

    def _ready(self) -> BatcherEngine:
        if self._engine is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is loading; retry shortly", retry_after_s=1.0)
        return self._engine
