"""An ``Engine`` on remote gRPC Rerank servers: the gateway alone, in front of scorers.

``rerank gateway`` builds its own ``RerankCore`` (auth, limits, idempotent replay, rate
limits, billing) on this engine, so the billed edge and the GPU replicas scale apart. The
backends only score: run them with ``--no-auth`` on a private network (or give the gateway a
backend key). Each call goes to the next backend in turn; a backend that is UNAVAILABLE
(loading, draining, gone) passes the call to the next one, which is safe because nothing
is billed until the gateway's ledger records the reply.

A backend is asked for nothing the gateway's core does again or drops: no request id (the
gateway's core dedupes and bills; a backend's refusal, retried by ``pacing``, was never
scored, so it needs no idempotency key, and the backend hashes nothing), no ``top_n``, no
echoed text. It still validates the call and ranks it: it is a server of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc

from clients import AsyncRerankClient, Pacing, RerankError, RerankResult
from clients import ModelInfo as BackendModel
from service import tracing
from service.calls import RerankQuery
from service.errors import Code, ServiceError
from service.grpc.wire import request_to_score
from service.local import estimate_prompt_tokens
from service.seams import ModelInfo
from worker.types import Device, DocScore, DType, ScoreResult

log = logging.getLogger(__name__)
_RERANK_METHOD = "rerank.v1.RerankService/Rerank"

_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Code.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: Code.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Code.DEADLINE_EXCEEDED,
}


class RemoteEngine:
    def __init__(self, targets: Sequence[str], *, api_key: str | None = None, tls: bool = False,
                 timeout_s: float = 60.0, pacing: Pacing | None = None) -> None:
        """``pacing``: each backend's budget, and its RESOURCE_EXHAUSTED retried after its hint
        (the client's ``Pacing``); None: a refusal goes straight back to the caller."""
        if not targets:
            raise ValueError("no backends: give at least one --backend HOST:PORT")
        self.targets = list(targets)
        # retries=0: a refused call moves to the next backend here, not again to the same one
        self.clients = [AsyncRerankClient(t, api_key=api_key, tls=tls, timeout_s=timeout_s, retries=0, pacing=pacing)
                        for t in self.targets]
        self.model: BackendModel | None = None
        self._next = 0

    async def connect(self, timeout_s: float = 120.0) -> BackendModel:
        """Ask the backends what they serve until one answers (they may still be loading)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for target, client in zip(self.targets, self.clients):
                try:
                    self.model = await client.model_info(timeout_s=5)
                    log.info("backend %s serves %s (%s, %s)", target, self.model.model, self.model.device,
                             self.model.dtype)
                    return self.model
                except RerankError as exc:
                    log.info("backend %s not answering yet: %s", target, exc)
            if time.monotonic() > deadline:
                raise ConnectionError(f"no backend answered within {timeout_s:.0f}s: {', '.join(self.targets)}")
            await asyncio.sleep(1.0)  # start-up only: backends load their model for minutes

    async def score(self, request: RerankQuery, tenant: str, priority: int) -> ScoreResult:
        start, self._next = self._next, (self._next + 1) % len(self.clients)
        for attempt in range(len(self.clients)):
            index = (start + attempt) % len(self.clients)
            try:
                reply = await self._call(index, request, tenant, priority)
            except RerankError as exc:
                if exc.code is grpc.StatusCode.UNAVAILABLE and attempt + 1 < len(self.clients):
                    continue
                raise _service_error(exc) from None
            return _score_result(reply, len(request.documents))
        raise AssertionError("the backend loop fell through: this is a bug")

    async def _call(self, index: int, request: RerankQuery, tenant: str, priority: int) -> RerankResult:
        """One backend's answer; traced, the call is a CLIENT span whose ``traceparent`` the
        backend's own span continues."""
        with tracing.client_span(_RERANK_METHOD, self.targets[index]) as metadata:
            # scores only (see above): every document, no text echoed, no request id
            return await self.clients[index].rerank_message(request_to_score(request, priority),
                                                            on_behalf_of=tenant or None, metadata=metadata)

    def info(self) -> ModelInfo:
        if self.model is None:
            raise ServiceError(Code.UNAVAILABLE, "no backend has answered yet; retry shortly", retry_after_s=1.0)
        m = self.model
        return ModelInfo(m.model, m.max_length, DType(m.dtype), Device(m.device))

    def estimate_tokens(self, queries: Sequence[RerankQuery]) -> int:
        return estimate_prompt_tokens(queries, self.info().max_length)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))


def _service_error(exc: RerankError) -> ServiceError:
    code = _CODES.get(exc.code)
    if code is None:  # the backend refused the gateway itself, or failed: not the caller's doing
        return ServiceError(Code.INTERNAL, f"backend error {exc.code.name}: {exc.details}")
    retry = exc.retry_after_s if exc.retry_after_s is not None else (1.0 if code is not Code.INVALID_ARGUMENT
                                                                      else None)
    return ServiceError(code, exc.details, retry_after_s=retry)


def _score_result(reply: RerankResult, documents: int) -> ScoreResult:
    scores = sorted(reply.results, key=lambda r: r.index)
    if [r.index for r in scores] != list(range(documents)):
        raise ServiceError(Code.INTERNAL, f"a backend answered {len(scores)} of {documents} documents")
    return ScoreResult([DocScore(r.index, r.score, r.logit, r.truncated, r.chunks, r.best_chunk) for r in scores],
                       prompt_tokens=reply.usage.prompt_tokens, computed_tokens=reply.usage.computed_tokens,
                       queue_and_model_ms=reply.total_ms)
