"""What the public edge enforces before a call reaches the core: the bearer rule both fronts
share, and the HTTP server's resource limits. Light imports only (``service.config`` reads
the limits' defaults); the HTTP machinery that applies them is in ``service.gateway``
(``EdgeGuard``) and ``service.http_server`` (``EdgeProtocol``). docs/SECURITY.md lists each
limit, its flag and the test that proves it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        for name in ("max_connections", "header_timeout_s", "body_timeout_s", "idle_timeout_s",
                     "max_header_bytes", "max_body_bytes_in_flight"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"--http-{name.replace('_', '-')} must be positive, got {value}")


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
