"""Prometheus metrics: what the fronts and the batcher did, on one registry per server.

Each ``Metrics`` owns its own ``CollectorRegistry`` rather than the process-global one, so
several servers (tests, or the HTTP API beside the gRPC server) never collide on names. The
batcher reports through its ``on_batch`` hook; the fronts call ``observe_request``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from service.billing.tally import ledger_errors, throttled
from worker.batcher import BatchStats

log = logging.getLogger(__name__)

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_RATIO = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("rerank_requests", "Calls by front method and status code.",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("rerank_request_seconds", "Call latency, by front method.",
                                         ["method"], buckets=_LATENCY_S, registry=r)
        self.queue_documents = Gauge("rerank_queue_documents", "Documents waiting in the batcher's queue.",
                                     registry=r)
        self.queue_tokens = Gauge("rerank_queue_tokens", "Tokens of the documents waiting in the batcher's "
                                  "queue (its cost: row tokens, prefixes cached).", registry=r)
        self.queue_max_documents = Gauge("rerank_queue_max_documents", "--max-queued-docs: more queued is "
                                         "refused as overloaded.", registry=r)
        self.queue_max_tokens = Gauge("rerank_queue_max_tokens", "--max-queued-tokens: more queued is "
                                      "refused as overloaded.", registry=r)
        self.batch_rows = Histogram("rerank_batch_rows", "Documents per model batch.", buckets=_ROWS,
                                    registry=r)
        self.batch_tokens = Histogram("rerank_batch_tokens", "Tokens the model computed per batch.",
                                      buckets=_TOKENS, registry=r)
        self.batch_seconds = Histogram("rerank_batch_seconds", "Model time per batch.", buckets=_LATENCY_S,
                                       registry=r)
        self.padding_ratio = Histogram(
            "rerank_batch_padding_ratio", "1 - rows' own tokens / padded tokens per batch: the "
            "share of the batch's padded attention size that was padding.", buckets=_RATIO, registry=r)
        self.documents_scored = Counter("rerank_documents_scored", "Documents the model scored.", registry=r)
        self.batches_failed = Counter("rerank_batches_failed", "Batches the model failed on.", registry=r)
        self.ready = Gauge("rerank_ready", "1 when the model is loaded and warm.", registry=r)
        self.queue_documents.set_function(lambda: 0)
        self.queue_tokens.set_function(lambda: 0)
        r.register(BillingTally())

    def watch_queue(self, documents: Callable[[], int], tokens: Callable[[], int],
                    max_documents: int, max_tokens: int) -> None:
        """Sample queue depth at scrape time, from the batcher once it exists, beside its limits."""
        self.queue_documents.set_function(documents)
        self.queue_tokens.set_function(tokens)
        self.queue_max_documents.set(max_documents)
        self.queue_max_tokens.set(max_tokens)

    def on_batch(self, stats: BatchStats) -> None:
        """The batcher's ``on_batch`` hook; runs on the event loop after every batch."""
        self.batch_seconds.observe(stats.seconds)
        if stats.failed:
            self.batches_failed.inc()
            return
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.computed_tokens)
        self.documents_scored.inc(stats.rows)
        if stats.padded_tokens:
            # rows' own tokens against their padded size; a prefix prefilled for the batch is
            # computed unpadded, apart from the rows, and so is left out of both
            own = stats.computed_tokens - stats.prefill_tokens
            self.padding_ratio.observe(1 - own / stats.padded_tokens)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)


class BillingTally(Collector):
    """``service.billing.tally``'s process-wide counts as counters, every series exported from
    the start (at 0), so rates and alerts over them are defined before the first refusal."""

    LIMITS = ("rps", "dps", "tpm", "quota")

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("rerank_throttled", "Calls refused by a per-key limit (rate limits: "
                                     "rps, dps, tpm; the document quota: quota).", labels=["limit"])
        for limit in self.LIMITS:
            family.add_metric([limit], throttled[limit])
        yield family
        # one series (the log line of each failure says what the ledger was doing)
        yield CounterMetricFamily("rerank_ledger_errors", "Usage-ledger (database) failures; each refuses its "
                                  "call UNAVAILABLE (nothing billed).", value=sum(ledger_errors.values()))


class MetricsServer:
    """``/metrics`` on its own HTTP port (prometheus_client's server, on a daemon thread)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: Any = None

    async def start(self) -> None:
        self._server, _ = start_http_server(self.port, self.host, registry=self.metrics.registry)
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self, grace_s: float) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)  # blocks up to its 0.5 s poll interval
            server.server_close()
