"""Load and fault driver for the Rerank service: closed-loop asyncio clients over gRPC and HTTP.

Theory of operation
-------------------
A *logical request* is one thing a user wants scored: a query, its documents and an
idempotency key drawn once (``workload``). A client sends it through a ``Transport`` (gRPC:
the key is ``request_id``; HTTP: the ``Idempotency-Key`` header) and, on an answer that
leaves the outcome unknown or says "try again" (connection lost, UNAVAILABLE/503, deadline),
sends the *same* request with the *same* key again, until it succeeds, fails for good, or the
retry budget runs out (``driver``). Each level of the sweep runs N such clients for a bounded
number of requests and a bounded time, then stops by itself.

Afterwards ``reconcile`` compares what the clients saw with what the usage ledger billed:
every logical request that succeeded is billed exactly once, none that failed is billed, and
the billed documents add up. ``report`` turns outcomes into throughput and latency figures.

Invariants
----------
* A logical request keeps one key and one body for all its attempts: a retry is never a new
  request, so the server's replay (or its unique constraint) is what prevents double billing.
* Every loop is bounded in count and in time; targets must be loopback addresses unless the
  caller says otherwise (``servers.require_loopback``).
"""
