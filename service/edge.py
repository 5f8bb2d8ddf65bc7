"""What the public edge enforces before a call reaches the core: the bearer rule both fronts
share, and the HTTP and gRPC servers' resource limits. Light imports only (``service.config``
reads the limits' defaults); the HTTP machinery that applies them is in ``service.http.edge``
(``EdgeGuard``) and ``service.http.server`` (``EdgeProtocol``), gRPC's are grpcio's own
(``service.grpc_server``). docs/SECURITY.md lists each
limit, its flag and the test that proves it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from service.errors import Code, ServiceError

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
    (``--grpc-*``), applied as grpcio server arguments (``service.grpc_server.limit_options``).

    A request message is received whole before its handler runs, so ``max_concurrent_rpcs``
    times ``--max-request-bytes`` bounds the memory held by request messages."""

    max_concurrent_rpcs: int = 256  # RPCs being handled, all connections together; more: RESOURCE_EXHAUSTED
    max_concurrent_streams: int = 100  # RPCs open at once on one connection (HTTP/2 SETTINGS)
    max_connection_idle_s: float = 300.0  # a connection with no RPC this long is sent GOAWAY and closed
    max_metadata_bytes: int = 16_384  # a request's metadata (headers); more: RESOURCE_EXHAUSTED

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
