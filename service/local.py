"""The in-process engine: the worker's batcher behind the core's ``Engine`` seam."""

from __future__ import annotations

from service.core import ModelInfo
from service.errors import Code, ServiceError, from_worker
from worker.batcher import Batcher  # no torch: the runner behind it is built by the caller
from worker.types import ScoreRequest, ScoreResult, WorkerError


class BatcherEngine:
    """The batcher with its errors mapped and its runner's facts as ``ModelInfo``; until a
    batcher is attached (the model is loading), UNAVAILABLE."""

    def __init__(self, batcher: Batcher | None = None) -> None:
        self.batcher = batcher  # set by the app once the model is warm

    async def score(self, request: ScoreRequest) -> ScoreResult:
        batcher = self._ready()
        try:
            return await batcher.score(request)
        except WorkerError as exc:
            raise from_worker(exc) from exc

    def info(self) -> ModelInfo:
        info = self._ready().runner.info()
        return ModelInfo(info.model, info.max_length, info.dtype, info.device)

    def _ready(self) -> Batcher:
        if self.batcher is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is loading; retry shortly", retry_after_s=1.0)
        return self.batcher
