"""Faults of whole processes, under load: kill -9 and restart, SIGTERM, PostgreSQL stopped.

Each test runs the real ``rerank serve`` (the tiny checkpoint, a SQLite or PostgreSQL ledger,
API keys) as a subprocess on loopback, drives it with the load tool's clients over gRPC and
HTTP at once, injects the fault mid-load, and then holds the ledger against what the clients
saw (``bench.load.reconcile``): every request that succeeded billed exactly once, none that
failed billed. Loads are bounded in requests and time and stop by themselves.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from postgres_support import ThrowawayPostgres, postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from postgres_support import _bin_dir as postgres_bin_dir
from sqlalchemy import select

from bench.load.driver import Attempt, Level, LevelRun, Outcome, RetryPolicy, Transport, Verdict, run_level
from bench.load.reconcile import read_records, reconcile
from bench.load.servers import ServeProcess, create_api_key
from bench.load.transports import GrpcTransport, HttpTransport
from bench.load.workload import Workload

pytestmark = pytest.mark.slow


@dataclass
class Deployment:
    """One `rerank serve` with its ledger and an API key."""

    server: ServeProcess
    db_url: str
    key: str

    def transports(self, timeout_s: float = 30.0) -> list[Transport]:
        return [GrpcTransport([self.server.grpc_target], api_key=self.key, timeout_s=timeout_s),
                HttpTransport([self.server.http_url], api_key=self.key, timeout_s=timeout_s)]


def start_deployment(model: Path, tmp_path: Path, *serve_args: str, db_url: str | None = None) -> Deployment:
    """A ready server with one key, on ``db_url`` or a fresh SQLite file; use its server as a
    context manager."""
    db_url = db_url or f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    key = create_api_key(db_url, "faults")
    # One torch thread: the load clients share this machine's cores, and torch's OpenMP threads
    # collapse when oversubscribed (docs/OPERATIONS.md, "CPU threads").
    server = ServeProcess(str(model), tmp_path / "serve.log", db_url=db_url, extra_args=["--auth", *serve_args],
                          env={"OMP_NUM_THREADS": "1"})
    try:
        server.start().wait_ready()
    except BaseException:
        server.__exit__()
        raise
    return Deployment(server, db_url, key)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


async def drive(transports: list[Transport], level: Level, workload: Workload, policy: RetryPolicy,
                stop: asyncio.Event | None = None,
                on_outcome: Callable[[Outcome], None] | None = None) -> list[LevelRun]:
    """The same level on every front at once; distinct request numbers per front."""
    try:
        return list(await asyncio.gather(*(
            run_level(t, level, workload, policy, first_n=i * 100_000, stop=stop, on_outcome=on_outcome)
            for i, t in enumerate(transports))))
    finally:
        for t in transports:
            await t.close()


def outcomes_of(runs: list[LevelRun]) -> list[Outcome]:
    return [o for r in runs for o in r.outcomes]


async def ledger_intact(db_url: str) -> bool:
    """Usage records and stored replies are written in one transaction: every keyed usage
    record has its idempotency record and the other way round, once each. SQLite's own
    integrity check too, for the file a killed writer could have torn."""
    from service.billing.db import idempotency_records, open_engine, usage_records

    engine = open_engine(db_url)
    try:
        async with engine.connect() as conn:
            billed = [k for (k,) in await conn.execute(select(usage_records.c.idempotency_key)) if k]
            stored = [k for (k,) in await conn.execute(select(idempotency_records.c.idempotency_key))]
    finally:
        await engine.dispose()
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            if conn.execute("PRAGMA integrity_check").fetchone() != ("ok",):
                return False
    return sorted(billed) == sorted(stored) and len(set(billed)) == len(billed)


# -- kill -9 ---------------------------------------------------------------------------------
def test_kill_9_mid_load_and_restart_bills_every_success_exactly_once(tiny_model_dir: Path, tmp_path: Path,
                                                                     ledger_url: str) -> None:
    deployment = start_deployment(tiny_model_dir, tmp_path, db_url=ledger_url)
    with deployment.server:
        outcomes = kill_9_mid_load(deployment)
    assert len(outcomes) == 2 * 4 * 30 and all(o.ok for o in outcomes), \
        {o.final.code for o in outcomes if not o.ok}
    crossed = [o for o in outcomes if len(o.attempts) > 1]
    assert crossed, "no request was caught by the crash: the test did not test it"
    assert all(a.verdict is not Verdict.FAILED for o in outcomes for a in o.attempts)
    rec = reconcile(outcomes, asyncio.run(read_records(deployment.db_url)))
    assert rec.ok, rec.describe()
    assert asyncio.run(ledger_intact(deployment.db_url))
    print(f"kill -9 ({ledger_url.split(':')[0]}): {len(outcomes)} requests, {len(crossed)} retried across "
          f"the crash ({sum(o.final.replayed for o in outcomes)} answered by replay); {rec.describe()}")


def kill_9_mid_load(deployment: Deployment) -> list[Outcome]:
    """4 clients per front, 30 requests each, retrying with their keys; SIGKILL once 20 have
    succeeded, restart on the same ports, and let the clients finish."""
    server = deployment.server
    workload = Workload(documents=16)
    policy = RetryPolicy(max_attempts=1000, give_up_s=120, backoff_s=0.05, max_backoff_s=0.5)
    succeeded = asyncio.Event()
    count = 0

    def on_outcome(outcome: Outcome) -> None:
        nonlocal count
        count += outcome.ok
        if count >= 20:
            succeeded.set()

    async def scenario() -> list[LevelRun]:
        load = asyncio.ensure_future(drive(deployment.transports(timeout_s=10), Level(4, 30, 150), workload,
                                           policy, on_outcome=on_outcome))
        await asyncio.wait_for(succeeded.wait(), 60)  # mid-load: some done, many in flight
        server.signal(signal.SIGKILL)
        assert server.wait(10) == -signal.SIGKILL
        await asyncio.sleep(0.5)  # clients meet a dead port and keep retrying
        await asyncio.to_thread(lambda: server.start().wait_ready())
        return await load

    return outcomes_of(asyncio.run(scenario()))


# -- SIGTERM ---------------------------------------------------------------------------------
DRAIN_S, GRACE_S = 0.5, 20.0
LINGER_S = 2.0  # --max-wait-ms: a batch that is not full waits this long for company
MARGIN_S = 0.25  # calls sent this close to a phase change could fall either side: not judged
_REFUSED = {"UNAVAILABLE", "HTTP 503", "ConnectError", "RemoteProtocolError", "ReadError"}


@dataclass
class Shutdown:
    busy: list[Outcome]  # the load before: all done before the wave
    wave: list[Outcome]  # sent 0.5 s before SIGTERM: in flight when refusal begins
    late: list[Outcome]  # sent after SIGTERM, until the process is gone
    signalled: float
    exit_code: int
    exit_s: float


def test_sigterm_mid_load_finishes_in_flight_refuses_new_and_exits_0(tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    """The documented shutdown, timed from the signal: for DRAIN_S health says NOT_SERVING while
    both fronts still take calls; then both refuse new calls; the calls in
    flight run to completion; exit 0 within GRACE_S.

    Which calls are in flight must not depend on this machine's speed, so the batcher lingers
    LINGER_S for more work (``--max-wait-ms``): a wave of calls sent 0.5 s before the signal is
    certainly still queued when refusal begins DRAIN_S after it, however fast the model is."""
    deployment = start_deployment(tiny_model_dir, tmp_path, "--grace-s", str(GRACE_S),
                                  "--drain-delay-s", str(DRAIN_S), "--max-wait-ms", str(1000 * LINGER_S))
    with deployment.server:
        run = asyncio.run(sigterm_mid_load(deployment))
    assert run.exit_code == 0, deployment.server.log_tail()
    assert run.exit_s < DRAIN_S + GRACE_S, f"exit took {run.exit_s:.1f}s"
    refusing = run.signalled + DRAIN_S
    busy, wave, late = ([o.final for o in outcomes] for outcomes in (run.busy, run.wave, run.late))
    assert {a.code for a in busy + wave} == {"OK"}, _codes(busy + wave)
    assert all(a.started + a.seconds > refusing for a in wave), "the wave ended before refusal began"
    assert {a.code for a in late} <= {"OK"} | _REFUSED, _codes(late)  # nothing cut short or broken
    assert all(a.started < refusing + MARGIN_S for a in late if a.code == "OK"), "a call got in after refusal"
    after = [a for a in late if a.started > refusing + MARGIN_S]
    assert after and all(a.code in _REFUSED for a in after), _codes(after)
    rec = reconcile(run.busy + run.wave + run.late, asyncio.run(read_records(deployment.db_url)))
    assert rec.ok, rec.describe()
    print(f"SIGTERM: exit 0 after {run.exit_s:.2f}s; {len(wave)} calls in flight at refusal, all OK; "
          f"calls sent after the signal: {_codes(late)}; {rec.describe()}")


async def sigterm_mid_load(deployment: Deployment) -> Shutdown:
    server, once = deployment.server, RetryPolicy(max_attempts=1)
    busy = await drive(deployment.transports(), Level(clients=3, requests_per_client=2), Workload(documents=4),
                       once)
    wave = asyncio.ensure_future(drive(deployment.transports(), Level(clients=2, requests_per_client=1),
                                       Workload(documents=8), once))
    await asyncio.sleep(0.5)  # the wave is queued; the batcher lingers for company
    signalled = time.perf_counter()
    server.signal(signal.SIGTERM)
    stop = asyncio.Event()
    late = asyncio.ensure_future(drive(deployment.transports(), Level(2, 10_000, 60, think_s=0.05),
                                       Workload(documents=2), once, stop=stop))
    code = await asyncio.to_thread(server.wait, DRAIN_S + GRACE_S + 20)
    exit_s = time.perf_counter() - signalled
    await asyncio.sleep(0.3)  # later calls meet a stopped server
    stop.set()
    return Shutdown(outcomes_of(busy), outcomes_of(await wave), outcomes_of(await late), signalled, code, exit_s)


def _codes(attempts: list[Attempt]) -> dict[str, int]:
    found: dict[str, int] = {}
    for a in attempts:
        found[a.code] = found.get(a.code, 0) + 1
    return found


# -- PostgreSQL stopped --------------------------------------------------------------------------
class PausablePostgres(ThrowawayPostgres):
    """A private PostgreSQL this test may stop and start (the shared one serves other tests)."""

    def pause(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")


@pytest.fixture
def private_postgres() -> Iterator[tuple[PausablePostgres, str]]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries to run a private server that this test can stop")
    server = PausablePostgres(bin_dir)
    try:
        url = server.start()
    except (OSError, subprocess.SubprocessError) as exc:
        server.stop()
        pytest.skip(f"could not start a private PostgreSQL: {exc}")
    yield server, url
    server.stop()


DB_LINGER_S = 3.0  # a batch waits this long: the database goes down while calls are being scored


@pytest.mark.postgres
def test_postgres_stopped_fails_calls_cleanly_unbilled_and_service_resumes(
        tiny_model_dir: Path, tmp_path: Path, private_postgres: tuple[PausablePostgres, str]) -> None:
    postgres, url = private_postgres
    deployment = start_deployment(tiny_model_dir, tmp_path, "--max-wait-ms", str(1000 * DB_LINGER_S), db_url=url)
    with deployment.server:
        before, cut, during, after = asyncio.run(postgres_outage(deployment, postgres))
        assert deployment.server.returncode is None, "the server died with its database"
    assert all(o.ok for o in before + after), _codes([o.final for o in before + after])
    for outcome in cut + during:  # scored but not billable, or refused before scoring
        assert outcome.final.code in {"UNAVAILABLE", "HTTP 503"}, outcome.final
        assert outcome.seconds < 15, f"a call took {outcome.seconds:.1f}s to fail"
    rec = reconcile(before + cut + during + after, asyncio.run(read_records(url)))
    assert rec.ok, rec.describe()
    assert asyncio.run(ledger_intact(url))
    print(f"PostgreSQL stopped: {len(cut)} calls being scored and {len(during)} new calls failed "
          f"({_codes([o.final for o in cut + during])}), slowest {max(o.seconds for o in cut + during):.1f}s; "
          f"{len(after)} after restart OK; {rec.describe()}")


async def postgres_outage(deployment: Deployment, postgres: PausablePostgres) -> list[list[Outcome]]:
    once, level = RetryPolicy(max_attempts=1), Level(clients=2, requests_per_client=1)
    before = await drive(deployment.transports(), level, Workload(documents=4), once)
    cut = asyncio.ensure_future(drive(deployment.transports(), level, Workload(documents=4), once))
    await asyncio.sleep(0.5)  # authenticated and queued: the batch waits DB_LINGER_S
    await asyncio.to_thread(postgres.pause)
    during = await drive(deployment.transports(), level, Workload(documents=4), once)
    cut_runs = await cut
    await asyncio.to_thread(postgres.resume)
    after = await drive(deployment.transports(), level, Workload(documents=4), RetryPolicy(max_attempts=3))
    return [outcomes_of(runs) for runs in (before, cut_runs, during, after)]


# -- departing callers and memory ----------------------------------------------------------------
def test_callers_that_keep_departing_do_not_grow_server_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rounds of calls abandoned mid-flight (gRPC deadlines, HTTP clients hanging up), each
    round carrying megabytes of documents: the server's resident memory levels off after the
    first round instead of growing with every round (tests/test_faults.py shows, object by
    object, that an abandoned call's work is dropped)."""
    deployment = start_deployment(tiny_model_dir, tmp_path)
    workload = Workload(documents=64, words_per_document=150)
    with deployment.server:
        rss = [deployment.server.rss_bytes()]
        for n in range(5):
            departed = asyncio.run(depart(deployment, workload, first_n=n * 1000))
            assert departed >= 60, f"round {n}: only {departed} of 100 calls were abandoned"
            rss.append(deployment.server.rss_bytes())
        assert deployment.server.returncode is None
    grown_mb = (rss[-1] - rss[1]) / 2**20
    assert grown_mb < 24, f"resident memory grew {grown_mb:.0f} MiB over rounds 2-5: {[r >> 20 for r in rss]} MiB"
    print(f"departing callers: RSS by round {[r >> 20 for r in rss]} MiB")


async def depart(deployment: Deployment, workload: Workload, first_n: int) -> int:
    """50 gRPC calls with a 20 ms deadline and 50 HTTP calls whose client gives up after
    20 ms, all at once; the number that were abandoned (not answered)."""
    transports = deployment.transports(timeout_s=0.02)
    try:
        attempts = await asyncio.gather(*(t.send(workload.make(first_n + i * 2 + j))
                                          for i in range(50) for j, t in enumerate(transports)))
    finally:
        for t in transports:
            await t.close()
    await asyncio.sleep(0.5)  # let the server finish cancelling
    return sum(a.code in {"DEADLINE_EXCEEDED", "ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout"}
               for a in attempts)
