"""What the public edge enforces before a call reaches the core: the bearer rule both fronts
share, the key checked once before a body or message is read (``CheckedOnce``), the budget
for request bytes in flight (``BodyBudget``), and the HTTP and gRPC servers' resource limits.
Light imports only (``service.config`` reads the limits' defaults); the HTTP machinery that
applies them is in ``service.http.edge`` (``EdgeGuard``) and ``service.http.server``
(``EdgeProtocol``), gRPC's in ``service.grpc.edge`` (``KeyGuard``) and grpcio's own options
(``service.grpc.servicer``). docs/SECURITY.md lists each limit, its flag and the test that
proves it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, fields

from service.errors import Code, ServiceError
from service.seams import Authenticator, Principal

_SHOWN_SCHEME_CHARS = 20


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """The HTTP server's limits on what callers may hold open; each is a ``rerank serve`` flag."""

    max_connections: int = 512  # open HTTP connections; more are answered 503 and closed
    header_timeout_s: float = 10.0  # from connection (or the end of the last reply) to a complete request head
    body_timeout_s: float = 30.0  # from the request head to the end of its body
    idle_timeout_s: float = 5.0  # keep-alive: an idle connection is closed after this long
    max_header_bytes: int = 16_384  # request line and headers together
    max_body_bytes_in_flight: int = 256 * 2**20  # request bodies being received or held, all connections together

    def __post_init__(self) -> None:
        _require_positive(self, "http")


@dataclass(frozen=True, slots=True)
class GrpcLimits:
    """The gRPC server's limits on what callers may hold open; each a ``rerank serve`` flag
    (``--grpc-*``), applied as grpcio server arguments (``service.grpc.servicer.limit_options``)
    and by ``service.grpc.edge.KeyGuard`` (the key before the message; the message budget)."""

    max_concurrent_rpcs: int = 256  # RPCs being handled, all connections together; more: RESOURCE_EXHAUSTED
    max_concurrent_streams: int = 100  # RPCs open at once on one connection (HTTP/2 SETTINGS)
    max_connection_idle_s: float = 300.0  # a connection with no RPC this long is sent GOAWAY and closed
    max_metadata_bytes: int = 16_384  # a request's metadata (headers); more: RESOURCE_EXHAUSTED
    max_connections: int = 512  # open connections, all peers together; more are closed at accept
    max_message_bytes_in_flight: int = 256 * 2**20  # request messages being received or held, all calls together

    def __post_init__(self) -> None:
        _require_positive(self, "grpc")


def _require_positive(limits: EdgeLimits | GrpcLimits, prefix: str) -> None:
    for f in fields(limits):
        value = getattr(limits, f.name)
        if not value > 0:
            raise ValueError(f"--{prefix}-{f.name.replace('_', '-')} must be positive, got {value}")


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, for gRPC metadata and HTTP alike.

    No header: None (the authenticator decides whether a key is needed). A header that is there
    but is not ``Bearer <key>`` is UNAUTHENTICATED with what was wrong, whether or not keys are
    required: a bare key, another scheme (``Basic``), or ``Bearer`` with no key."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer":
        if not token:
            raise _refused("the Authorization header says 'Bearer' but carries no key: send 'Bearer <key>'")
        if " " in token:
            raise _refused("the Authorization header carries more than one value after 'Bearer': send 'Bearer <key>'")
        return token
    if not token:
        raise _refused("the Authorization header has no scheme: send 'Bearer <key>', not the bare key")
    shown = scheme if len(scheme) <= _SHOWN_SCHEME_CHARS and scheme.isascii() and scheme.isprintable() else "another"
    raise _refused(f"the Authorization header uses the {shown!r} scheme; this API takes 'Bearer <key>'")


def _refused(message: str) -> ServiceError:
    return ServiceError(Code.UNAUTHENTICATED, message)


class BodyBudget:
    """The request bytes (HTTP bodies, gRPC messages) being received or held, all connections
    together, under a cap: one caller's large requests cannot take the memory another's need."""

    def __init__(self, max_bytes: int, on_drained: Callable[[int], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.peak = 0  # the most held since the budget was last empty
        self.on_drained = on_drained  # called with ``peak`` each time the budget empties
        self._freed = asyncio.Event()

    def take(self, size: int) -> bool:
        if self.held + size > self.max_bytes:
            return False
        self.held += size
        self.peak = max(self.peak, self.held)
        return True

    async def take_within(self, size: int, wait_s: float) -> bool:
        """``take``, waiting up to ``wait_s`` for others to give bytes back: for a reservation
        made before the size is known (gRPC's), which most calls soon trim to their real size."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not self.take(size):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                return self.take(size)
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
        if size > 0:
            self._freed.set()
        if self.held == 0 and self.peak > 0:
            peak, self.peak = self.peak, 0
            if self.on_drained is not None:
                self.on_drained(peak)  # a burst is over: service.memory.Trimmer returns its memory


_CHECKED: contextvars.ContextVar[tuple[str | None, Principal] | None] = contextvars.ContextVar(
    "rerank_checked_key", default=None)


class CheckedOnce:
    """An ``Authenticator`` that answers the core's check of a call from the edge's, made
    moments before, before the body or message was read (HTTP: ``EdgeGuard``; gRPC:
    ``KeyGuard``), in the same task's context, for the same key: one lookup per call, and
    revocation still takes effect at the next call. Anything else is the wrapped
    authenticator's to decide."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def authenticate(self, api_key: str | None) -> Principal:
        checked = _CHECKED.get()
        if checked is not None and checked[0] == api_key:
            return checked[1]
        return await self.auth.authenticate(api_key)

    async def check_request(self, api_key: str | None) -> None:
        """The edge's check; remembered for the rest of this request."""
        self.vouch(api_key, await self.auth.authenticate(api_key))

    @staticmethod
    def vouch(api_key: str | None, principal: Principal) -> None:
        """Remember a check made elsewhere for this task's context (gRPC's interceptor runs
        before the handler, which is where the core's check happens)."""
        _CHECKED.set((api_key, principal))
