"""One error type for both fronts, and the one table mapping it to gRPC and HTTP statuses.

The core raises ``ServiceError``; the gRPC servicer and the HTTP front translate it with
``grpc_status`` / ``http_status`` and nothing else, so a condition has the same meaning on
both fronts. Worker errors are mapped here too (``from_worker``).
"""

from __future__ import annotations

import enum

from worker.types import InvalidInput, ModelFailure, Overloaded, ShuttingDown, WorkerError


class Code(enum.Enum):
    """What went wrong, and its (gRPC status name, HTTP status).

    Several conditions share a status (RATE_LIMITED, OVERLOADED and QUOTA_EXCEEDED are all
    RESOURCE_EXHAUSTED / 429), so the statuses are attributes, not the members' values: with
    equal values Python would make them one member, and ``code is Code.OVERLOADED`` would hold
    for a rate limit too. Each value carries the member's position, so no two are equal."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 401)
    PERMISSION_DENIED = ("PERMISSION_DENIED", 403)
    NOT_FOUND = ("NOT_FOUND", 404)
    IDEMPOTENCY_CONFLICT = ("ALREADY_EXISTS", 422)  # same key, different body
    TOO_LARGE = ("RESOURCE_EXHAUSTED", 413)
    RATE_LIMITED = ("RESOURCE_EXHAUSTED", 429)
    OVERLOADED = ("RESOURCE_EXHAUSTED", 429)
    QUOTA_EXCEEDED = ("RESOURCE_EXHAUSTED", 429)
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504)
    UNAVAILABLE = ("UNAVAILABLE", 503)  # not ready, draining, ledger down: retry elsewhere/later
    INTERNAL = ("INTERNAL", 500)  # a bug or a model fault, never the caller's input

    grpc_status: str  # name of the ``grpc.StatusCode`` member (kept as text: no grpc import here)
    http_status: int

    def __new__(cls, grpc_status: str, http_status: int) -> Code:
        member = object.__new__(cls)
        member._value_ = (grpc_status, http_status, len(cls.__members__))  # unique: never an alias
        member.grpc_status = grpc_status
        member.http_status = http_status
        return member


class ServiceError(Exception):
    def __init__(self, code: Code, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


def from_worker(exc: WorkerError) -> ServiceError:
    if isinstance(exc, InvalidInput):
        return ServiceError(Code.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, Overloaded):
        return ServiceError(Code.OVERLOADED, str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, ShuttingDown):
        return ServiceError(Code.UNAVAILABLE, str(exc), retry_after_s=1.0)
    if isinstance(exc, ModelFailure):
        return ServiceError(Code.INTERNAL, str(exc))
    return ServiceError(Code.INTERNAL, f"unexpected worker error: {exc}")
