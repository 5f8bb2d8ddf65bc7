"""Admission arithmetic: token buckets on a fake clock, debt, replica share (quotas: test_quota.py)."""

from __future__ import annotations

import pytest

from service.billing.ratelimit import KeyRateLimiter, TokenBucket
from service.errors import Code, ServiceError
from service.seams import Principal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(rps: float | None = None, dps: float | None = None, quota: int | None = None) -> Principal:
    return Principal("key_1", "one", rps, dps, quota)


@pytest.mark.parametrize(("rate", "tokens", "cost", "wait"), [
    (10, 10, 1, 0.0),  # a full bucket pays
    (10, 0.5, 1, 0.05),  # half a token short at 10/s
    (2, 0, 1, 0.5),
    (10, 10, 500, 0.0),  # larger than the bucket: a full bucket admits it (into debt)
    (10, 9, 500, 0.1),  # ... but only a full one
    (10, -40, 1, 4.1),  # the debt of an earlier large call is paid first
    (0.5, 0, 1, 2.0),  # under one per second: the bucket still holds one call
])
def test_bucket_wait(rate: float, tokens: float, cost: float, wait: float) -> None:
    bucket = TokenBucket(rate, tokens, stamp=0.0)
    assert bucket.wait_s(cost, now=0.0) == pytest.approx(wait)


def test_bucket_refills_to_capacity_only() -> None:
    bucket = TokenBucket(5, 0, stamp=0.0)
    assert bucket.wait_s(5, now=100.0) == 0.0
    assert bucket.tokens == 5  # a long idle spell does not bank more than one second


async def test_requests_per_second_is_prompt_429_with_exact_retry() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(clock=clock)
    for _ in range(3):
        await limiter.admit(key(rps=3), 1)
    with pytest.raises(ServiceError) as err:
        await limiter.admit(key(rps=3), 1)
    assert err.value.code is Code.RATE_LIMITED
    assert err.value.retry_after_s == pytest.approx(1 / 3)
    clock.now += 1 / 3
    await limiter.admit(key(rps=3), 1)


async def test_documents_per_second_counts_documents_and_allows_debt() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(clock=clock)
    await limiter.admit(key(dps=100), 250)  # full bucket: admitted, 150 in debt
    with pytest.raises(ServiceError) as err:
        await limiter.admit(key(dps=100), 1)
    assert err.value.retry_after_s == pytest.approx(1.51)
    clock.now += 1.51
    await limiter.admit(key(dps=100), 1)


async def test_refused_call_takes_nothing() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(clock=clock)
    await limiter.admit(key(rps=100, dps=10), 10)
    with pytest.raises(ServiceError):
        await limiter.admit(key(rps=100, dps=10), 5)  # dps refuses; rps must not be charged
    clock.now += 1
    for _ in range(10):  # one second of dps refilled; rps bucket still has ~99
        await limiter.admit(key(rps=100, dps=10), 1)


async def test_defaults_apply_to_keys_without_limits_and_share_divides() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(default_rps=4, share=0.5, clock=clock)
    await limiter.admit(key(), 1)
    await limiter.admit(key(), 1)
    with pytest.raises(ServiceError):
        await limiter.admit(key(), 1)  # 4 rps across 2 replicas: 2 here


async def test_unlimited_key_is_never_limited() -> None:
    limiter = KeyRateLimiter(clock=Clock())
    for _ in range(1000):
        await limiter.admit(key(), 1000)


async def test_changed_limits_take_effect() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(clock=clock)
    await limiter.admit(key(rps=1), 1)
    with pytest.raises(ServiceError):
        await limiter.admit(key(rps=1), 1)
    await limiter.admit(key(rps=5), 1)  # a new limit starts a new, full bucket


def test_share_must_be_a_fraction() -> None:
    with pytest.raises(ValueError):
        KeyRateLimiter(share=0)


def tpm_key(tpm: float) -> Principal:
    return Principal("key_1", "one", rate_limit_tpm=tpm)


async def test_tokens_per_minute_hold_a_minute_and_say_when_to_retry() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(clock=clock)
    await limiter.admit(tpm_key(6000), 1, tokens=5000)  # the bucket holds a minute: 6000
    with pytest.raises(ServiceError) as err:
        await limiter.admit(tpm_key(6000), 1, tokens=1500)
    assert err.value.code is Code.RATE_LIMITED and "prompt tokens per minute" in err.value.message
    assert err.value.retry_after_s == pytest.approx(5.0)  # 500 short at 100 tokens/s
    clock.now += 5.0
    await limiter.admit(tpm_key(6000), 1, tokens=1500)


async def test_refund_gives_back_the_overestimate_up_to_a_full_bucket() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(clock=clock)
    await limiter.admit(tpm_key(6000), 1, tokens=6000)
    limiter.refund(tpm_key(6000), 4000)  # the call's real prompt had 2000 tokens
    await limiter.admit(tpm_key(6000), 1, tokens=4000)
    with pytest.raises(ServiceError):
        await limiter.admit(tpm_key(6000), 1, tokens=1)
    limiter.refund(tpm_key(6000), 10**9)
    await limiter.admit(tpm_key(6000), 1, tokens=6000)  # never more than a full bucket ...
    with pytest.raises(ServiceError):
        await limiter.admit(tpm_key(6000), 1, tokens=1)  # ... however much is refunded
    limiter.refund(key(rps=1), 100)  # a key without a token limit: nothing to give back


async def test_token_limit_is_shared_over_replicas() -> None:
    limiter = KeyRateLimiter(share=0.5, clock=Clock())
    await limiter.admit(tpm_key(6000), 1, tokens=3000)
    with pytest.raises(ServiceError) as err:
        await limiter.admit(tpm_key(6000), 1, tokens=1)
    assert err.value.retry_after_s == pytest.approx(1 / 50)  # 3000 a minute here: 50 tokens/s
