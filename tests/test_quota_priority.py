"""A key's priority policy: the default for calls that name none, and the best one it may ask
for (``effective_priority``, a pure function: a table); and the key settings that hold it."""

from __future__ import annotations

import pytest
from postgres_support import db_url, postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from serving import schema_engine
from test_core import SpyEngine

from service.billing.keys import KeyStore
from service.calls import DEFAULT_PRIORITY, MAX_PRIORITY, RerankCall, RerankQuery
from service.core import RerankCore, effective_priority
from service.seams import ANONYMOUS, Principal


def key(default: int | None = None, best: int | None = None) -> Principal:
    return Principal("key_p", "p", default_priority=default, best_priority=best)


def clamped(requested: int, best: int) -> list[str]:
    return [f"priority {requested} is better than this key allows; clamped to {best}"]


@pytest.mark.parametrize(("principal", "requested", "runs_at", "warnings"), [
    # --no-auth: the request's value, or the default
    (ANONYMOUS, None, DEFAULT_PRIORITY, []),
    (ANONYMOUS, 0, 0, []),
    (ANONYMOUS, 7, 7, []),
    (ANONYMOUS, MAX_PRIORITY, MAX_PRIORITY, []),
    # a key without a policy is the same
    (key(), None, DEFAULT_PRIORITY, []),
    (key(), 3, 3, []),
    # the key's default when the call names none
    (key(default=5), None, 5, []),
    (key(default=5), 2, 2, []),  # a default is not a limit
    # the key's best: asking for better is clamped, and said so
    (key(best=3), 0, 3, clamped(0, 3)),
    (key(best=3), 2, 3, clamped(2, 3)),
    (key(best=3), 3, 3, []),
    (key(best=3), 9, 9, []),
    (key(best=3), None, 3, []),  # no default: the global one, but never better than best, silently
    (key(default=6, best=3), None, 6, []),
    (key(default=6, best=3), 1, 3, clamped(1, 3)),
    (key(default=6, best=3), 4, 4, []),
    (key(default=3, best=3), None, 3, []),
])
def test_effective_priority(principal: Principal, requested: int | None, runs_at: int, warnings: list[str]) -> None:
    assert effective_priority(principal, requested) == (runs_at, warnings)


async def test_key_priorities_are_checked_and_stored(db_url: str) -> None:  # noqa: F811
    async with schema_engine(db_url) as engine:
        store = KeyStore(engine)
        new = await store.create("batch-job", default_priority=10, best_priority=5)
        principal = await store.authenticate(new.key)
        assert (principal.default_priority, principal.best_priority) == (10, 5)
        for bad in ({"default_priority": -1}, {"best_priority": MAX_PRIORITY + 1},
                    {"default_priority": 1, "best_priority": 2}):  # a default better than the best
            with pytest.raises(ValueError):
                await store.create("x", **bad)
        key_id = new.record.key_id
        with pytest.raises(ValueError, match="default priority 10 is better than the best priority 20"):
            await store.update(key_id, best_priority=20)  # checked against the stored default
        updated = await store.update(key_id, best_priority=20, default_priority=None)
        assert updated is not None and (updated.default_priority, updated.best_priority) == (None, 20)
        assert effective_priority((await store.authenticate(new.key)), 0) == (20, clamped(0, 20))
        assert [k.name for k in await store.list()] == ["batch-job"]  # the refused ones wrote nothing


class PolicyKey:
    """A key whose calls default to priority 8 and may ask for 5 at best."""

    async def authenticate(self, api_key: str | None) -> Principal:
        return Principal("key_p", "p", default_priority=8, best_priority=5)


@pytest.mark.parametrize(("requested", "runs_at", "warned"), [(None, 8, False), (1, 5, True), (6, 6, False)])
async def test_the_key_policy_reaches_the_worker_and_the_reply(requested: int | None, runs_at: int,
                                                               warned: bool) -> None:
    engine = SpyEngine()
    core = RerankCore(engine, model_name="spy", auth=PolicyKey())
    reply = await core.rerank(RerankCall([RerankQuery("q", ["a"]), RerankQuery("r", ["b"])], priority=requested))
    assert [(r.tenant, r.priority) for r in engine.requests] == [("key_p", runs_at)] * 2
    assert reply.warnings == (clamped(requested or 0, 5) if warned else [])


async def test_the_python_client_shows_the_clamp_warning() -> None:
    """gRPC carries the warning in RerankResponse.warnings; the Python client must not drop it."""
    from serving import running_app, target

    from clients import AsyncRerankClient
    from service.app import CoreParts

    async with running_app(parts=CoreParts(auth=PolicyKey())) as app, AsyncRerankClient(target(app)) as client:
        asked = await client.rerank("q", ["a", "b"], priority=1)
        default = await client.rerank("q", ["a", "b"])
    assert asked.warnings == clamped(1, 5) and default.warnings == []
