"""One attempt over the wire: gRPC through ``AsyncRerankClient``, HTTP through httpx.

Both map what happened to a ``Verdict`` by the same rule: an answer that leaves the outcome
unknown or says "later" (connection lost, UNAVAILABLE/503, deadline, cancelled by a stopping
server) is RETRY, since the idempotency key makes a resend safe; RESOURCE_EXHAUSTED/429 is
REJECTED; anything else that is not a success is FAILED.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bench.load.driver import Attempt, Verdict
from bench.load.workload import LogicalRequest

_GRPC_RETRY = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED"}
_HTTP_RETRY = {502, 503, 504}


def grpc_verdict(code: str) -> Verdict:
    if code == "OK":
        return Verdict.OK
    if code in _GRPC_RETRY:
        return Verdict.RETRY
    return Verdict.REJECTED if code == "RESOURCE_EXHAUSTED" else Verdict.FAILED


def http_verdict(status: int) -> Verdict:
    if status == 200:
        return Verdict.OK
    if status in _HTTP_RETRY:
        return Verdict.RETRY
    return Verdict.REJECTED if status == 429 else Verdict.FAILED


class GrpcTransport:
    """The real client with its own retries off: the driver retries, with the same request id.

    ``targets`` of more than one address are balanced by gRPC itself (``round_robin``)."""

    name = "grpc"

    def __init__(self, targets: Sequence[str], *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        from clients import AsyncRerankClient

        # reconnect soon after a server comes back (gRPC's default backoff grows to 120 s)
        options: list[tuple[str, Any]] = [("grpc.initial_reconnect_backoff_ms", 100),
                                          ("grpc.min_reconnect_backoff_ms", 100),
                                          ("grpc.max_reconnect_backoff_ms", 1000)]
        # several addresses: one channel, balanced by the client's default round_robin
        target = targets[0] if len(targets) == 1 else "ipv4:" + ",".join(targets)
        self.client = AsyncRerankClient(target, api_key=api_key, timeout_s=timeout_s, retries=0,
                                        options=options)

    async def send(self, request: LogicalRequest) -> Attempt:
        from clients import RerankError

        started = time.perf_counter()
        try:
            result = await self.client.rerank(request.query, list(request.documents), request_id=request.key)
        except RerankError as exc:
            return Attempt(grpc_verdict(exc.code.name), exc.code.name, time.perf_counter() - started,
                           retry_after_s=exc.retry_after_s, started=started)
        return Attempt(Verdict.OK, "OK", time.perf_counter() - started, result.usage.documents, result.replayed,
                       started=started)

    async def close(self) -> None:
        await self.client.close()


class HttpTransport:
    """POST /v1/rerank with ``Idempotency-Key``; several base URLs are used in turn."""

    name = "http"

    def __init__(self, base_urls: Sequence[str], *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        import httpx

        self._errors: tuple[type[Exception], ...] = (httpx.TransportError,)
        self.clients = [httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=None)) for url in base_urls]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._turn = 0

    async def send(self, request: LogicalRequest) -> Attempt:
        client = self.clients[self._turn % len(self.clients)]
        self._turn += 1
        body = {"query": request.query, "documents": list(request.documents)}
        started = time.perf_counter()
        try:
            response = await client.post("/v1/rerank", json=body,
                                         headers={**self.headers, "Idempotency-Key": request.key})
        except self._errors as exc:  # refused, reset, timed out: the outcome is unknown
            return Attempt(Verdict.RETRY, type(exc).__name__, time.perf_counter() - started, started=started)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            return Attempt(http_verdict(response.status_code), f"HTTP {response.status_code}", seconds,
                           retry_after_s=_retry_after(response.headers.get("Retry-After")), started=started)
        reply = response.json()
        return Attempt(Verdict.OK, "OK", seconds, int(reply["usage"]["documents"]), bool(reply["meta"]["replayed"]),
                       started=started)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: not sent by this server
        return None


class CohereTransport:
    """The Cohere SDK (``AsyncClientV2``) as an application would hold it: the SDK's own retries
    off and the ``Idempotency-Key`` header per request, so the driver's retries are the only
    ones and resend the same key. Several base URLs are used in turn."""

    name = "cohere"

    def __init__(self, base_urls: Sequence[str], model: str, *, api_key: str | None = None,
                 timeout_s: float = 30.0) -> None:
        import cohere
        import httpx

        self._errors: tuple[type[Exception], ...] = (httpx.TransportError,)
        from cohere.core.api_error import ApiError

        self._api_error = ApiError
        # the SDK's HTTP clients, made here only so that close() can close them
        self.http = [httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=None,
                                                                              max_keepalive_connections=None))
                     for _ in base_urls]
        self.clients = [cohere.AsyncClientV2(api_key=api_key or "none", base_url=url, httpx_client=http)
                        for url, http in zip(base_urls, self.http)]
        self.model = model
        self.timeout_s = timeout_s
        self._turn = 0

    async def send(self, request: LogicalRequest) -> Attempt:
        client = self.clients[self._turn % len(self.clients)]
        self._turn += 1
        options: Any = {"additional_headers": {"Idempotency-Key": request.key}, "max_retries": 0,
                        "timeout_in_seconds": self.timeout_s}
        started = time.perf_counter()
        try:
            reply = await client.rerank(model=self.model, query=request.query, documents=list(request.documents),
                                        request_options=options)
        except self._api_error as exc:
            status = exc.status_code or 0
            retry_after = _retry_after((exc.headers or {}).get("retry-after"))
            return Attempt(http_verdict(status), f"HTTP {status}", time.perf_counter() - started,
                           retry_after_s=retry_after, started=started)
        except self._errors as exc:  # refused, reset, timed out: the outcome is unknown
            return Attempt(Verdict.RETRY, type(exc).__name__, time.perf_counter() - started, started=started)
        # this service's own fields ride along in the SDK's models as extras
        body = reply.model_dump()
        return Attempt(Verdict.OK, "OK", time.perf_counter() - started, int(body["usage"]["documents"]),
                       bool(body["meta"]["replayed"]), started=started)

    async def close(self) -> None:
        for http in self.http:
            await http.aclose()
