"""API keys: the ``Authenticator`` both fronts share, and the admin side (create, list, update,
revoke).

A key is ``rk_live_`` + 32 random bytes, urlsafe-base64 (43 characters): the typed prefix
lets secret scanners and humans recognise it, the 256 random bits make guessing hopeless.
It is shown once, at creation; the table keeps only its SHA-256. A slow password hash
(bcrypt, argon2) exists to protect low-entropy secrets from offline guessing: with 256 bits
there is nothing to guess, so a fast hash is the right tool and keeps auth off the hot path.

Lookup is by hash (indexed), and the stored hash is then compared with
``hmac.compare_digest``: what an attacker can time is a comparison of hashes of their own
inputs, which reveals nothing about any key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.billing.db import api_keys, unavailable
from service.calls import MAX_PRIORITY, MIN_PRIORITY, PRIORITY_RULE
from service.errors import Code, ServiceError
from service.seams import Principal

KEY_PREFIX = "rk_live_"
_SECRET_BYTES = 32
_WELL_FORMED = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the key table says about a key; never the key itself."""

    key_id: str
    name: str
    display_prefix: str
    created_at: datetime
    revoked_at: datetime | None
    rate_limit_rps: float | None
    rate_limit_dps: float | None
    quota_documents: int | None
    models: frozenset[str] | None = None  # None: any served model
    rate_limit_tpm: float | None = None
    default_priority: int | None = None
    best_priority: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def principal(self) -> Principal:
        return Principal(self.key_id, self.name, self.rate_limit_rps, self.rate_limit_dps,
                         self.quota_documents, self.models, rate_limit_tpm=self.rate_limit_tpm,
                         default_priority=self.default_priority, best_priority=self.best_priority)


@dataclass(frozen=True, slots=True)
class NewKey:
    record: KeyRecord
    key: str  # the secret: shown once, stored nowhere


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Keys in the ledger database; an ``Authenticator`` for ``RerankCore``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def authenticate(self, api_key: str | None) -> Principal:
        if not api_key:
            raise ServiceError(Code.UNAUTHENTICATED,
                               "missing API key: send the header 'Authorization: Bearer <key>'")
        if not _WELL_FORMED.fullmatch(api_key):  # garbage never reaches the database
            raise _unknown()
        digest = hash_key(api_key)
        with unavailable("checking the API key"):
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(api_keys).where(api_keys.c.key_hash == digest))).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise _unknown()
        record = _record(row)
        if record.revoked:
            raise ServiceError(Code.PERMISSION_DENIED, f"API key {record.key_id} was revoked")
        return record.principal()

    async def create(self, name: str, *, rate_limit_rps: float | None = None,
                     rate_limit_dps: float | None = None, quota_documents: int | None = None,
                     models: Iterable[str] | None = None, rate_limit_tpm: float | None = None,
                     default_priority: int | None = None, best_priority: int | None = None) -> NewKey:
        settings = _checked({"rate_limit_rps": rate_limit_rps, "rate_limit_dps": rate_limit_dps,
                             "rate_limit_tpm": rate_limit_tpm, "quota_documents": quota_documents,
                             "default_priority": default_priority, "best_priority": best_priority})
        key = KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        record = KeyRecord(key_id="key_" + secrets.token_hex(8), name=name,
                           display_prefix=key[: len(KEY_PREFIX) + 4], created_at=datetime.now(UTC),
                           revoked_at=None, models=None if models is None else frozenset(models), **settings)
        with unavailable("creating a key"):
            async with self.engine.begin() as conn:
                await conn.execute(insert(api_keys).values(key_hash=hash_key(key), **_columns(record)))
        return NewKey(record, key)

    async def update(self, key_id: str, **changes: float | int | None) -> KeyRecord | None:
        """Change a key's limits and priorities (the ``UPDATABLE`` ones given; None clears
        one), at once on every replica sharing the database; None: no such key. The result
        is checked whole (a default priority never better than the best), under the row's lock."""
        unknown = sorted(set(changes) - set(UPDATABLE))
        if unknown:
            raise ValueError(f"not a key setting: {', '.join(unknown)}")
        where = api_keys.c.key_id == key_id
        with unavailable("updating a key"):
            async with self.engine.begin() as conn:
                row = (await conn.execute(select(api_keys).where(where).with_for_update())).first()
                if row is None:
                    return None
                _checked({name: getattr(row, name) for name in UPDATABLE} | changes)
                if changes:
                    await conn.execute(update(api_keys).where(where).values(**changes))
                row = (await conn.execute(select(api_keys).where(where))).first()
        return _record(row)

    async def list(self) -> list[KeyRecord]:
        with unavailable("listing keys"):
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(api_keys).order_by(api_keys.c.created_at))
                return [_record(r) for r in rows]

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoke at once (every replica checks the table on each call); None: no such key."""
        with unavailable("revoking a key"):
            async with self.engine.begin() as conn:
                await conn.execute(update(api_keys)
                                   .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                                   .values(revoked_at=datetime.now(UTC)))
                row = (await conn.execute(select(api_keys).where(api_keys.c.key_id == key_id))).first()
        return None if row is None else _record(row)


# what ``update`` may change, and the label errors name it by
UPDATABLE = {"rate_limit_rps": "rate limit (rps)", "rate_limit_dps": "rate limit (dps)",
             "rate_limit_tpm": "rate limit (tpm)", "quota_documents": "quota",
             "default_priority": "default priority", "best_priority": "best priority"}
_PRIORITIES = ("default_priority", "best_priority")


def _checked(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings``, or ValueError: limits positive, priorities in range, default not better than best."""
    for name, value in settings.items():
        if value is None:
            continue
        if name in _PRIORITIES:
            if not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
                raise ValueError(f"{UPDATABLE[name]}: {PRIORITY_RULE}, got {value}")
        elif not value > 0:  # NaN too
            raise ValueError(f"{UPDATABLE[name]} must be positive, got {value}")
    default, best = settings.get("default_priority"), settings.get("best_priority")
    if default is not None and best is not None and default < best:
        raise ValueError(f"the default priority {default} is better than the best priority {best} "
                         "the key may ask for")
    return settings


def _unknown() -> ServiceError:
    return ServiceError(Code.UNAUTHENTICATED, "unknown API key")


def _record(row: Any) -> KeyRecord:
    models = None if row.models is None else frozenset(json.loads(row.models))
    return KeyRecord(row.key_id, row.name, row.display_prefix, row.created_at, row.revoked_at,
                     row.rate_limit_rps, row.rate_limit_dps, row.quota_documents, models, row.rate_limit_tpm,
                     row.default_priority, row.best_priority)


def _columns(record: KeyRecord) -> dict[str, Any]:
    """The row of ``record``: every field is a column of the same name (``_record`` reads it back)."""
    models = None if record.models is None else json.dumps(sorted(record.models))
    return {**asdict(record), "models": models}
