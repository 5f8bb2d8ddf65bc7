"""The product as deployed: the image, two replicas on one PostgreSQL, driven under faults.

Two topologies, both from the built image (``deploy/build-image.sh``), on the host network
with loopback ports chosen free at run time, the tiny random-weight checkpoint mounted
read-only, and PostgreSQL on the host (``tests/postgres_support.py``):

1. replicated: two keyed ``rerank serve`` containers sharing one ledger. The Cohere SDK posts
   over HTTP to both in turn and ``AsyncRerankClient`` balances gRPC over both (its default
   round_robin). One replica is ``docker kill``ed mid-load and started again; then both are
   replaced one at a time under load (``docker stop``: SIGTERM, drain delay, grace; then a new
   container), the second one under ``--memory``/``--cpus`` limits. Callers retry with the
   same idempotency key; every logical call must succeed, and the ledger must equal what the
   clients saw.
2. scale-out, from ``deploy/docker-compose.yml`` itself (profile ``scaleout``): a keyed
   ``rerank gateway`` in front of two ``--no-auth`` scorers; the Cohere SDK through the
   gateway, both scorers used, the gateway's ledger equal to what the clients saw.

Every container the tests start is removed at the end, failed or not (``docker_support``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from docker_support import COMPOSE_FILE, Docker, Replica, compose_command, docker_engine, shared_model_dir  # noqa: F401
from docker_support import wait_ready as wait_url_ready
from postgres_support import postgres_admin_url, postgres_url  # noqa: F401 - fixtures
from prometheus_client.parser import text_string_to_metric_families
from test_faults_process import drive, outcomes_of

from bench.load.driver import Level, Outcome, RetryPolicy, Verdict
from bench.load.reconcile import read_records, reconcile
from bench.load.servers import free_port
from bench.load.transports import CohereTransport, GrpcTransport
from bench.load.workload import Workload
from clients import RerankClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.docker]

# docker stop waits STOP_S before its SIGKILL: past drain delay + grace, as docs/OPERATIONS.md
# asks of every orchestrator (compose's stop_grace_period, Kubernetes' grace period)
DRAIN_S, GRACE_S = 2.0, 10.0
STOP_S = int(DRAIN_S + GRACE_S) + 3
LIMITS = ["--memory", "1536m", "--cpus", "1"]
POLICY = RetryPolicy(max_attempts=1000, give_up_s=180, backoff_s=0.05, max_backoff_s=0.5)
CHECKPOINT = "/models/tiny"


def create_key(docker: Docker, db_url: str, name: str) -> str:
    """``docker run IMAGE keys create``: the key is the last line it prints."""
    return docker.run_once(["keys", "create", "--name", name, "--db", db_url]).strip().splitlines()[-1].strip()


def keyed_replica(docker: Docker, name: str, model: Path, db_url: str) -> Replica:
    return Replica(f"{name}-{docker.label.split('=')[1]}",
                   ["--model", CHECKPOINT, "--host", "127.0.0.1", "--auth", "--replicas", "2",
                    "--drain-delay-s", str(DRAIN_S), "--grace-s", str(GRACE_S),
                    # eager: five cold starts on two shared cores; the compiled start is measured
                    # on its own (docs/OPERATIONS.md)
                    "--no-compile"],
                   options=["-v", f"{model}:{CHECKPOINT}:ro", "-e", f"RERANK_DB_URL={db_url}",
                            # one torch thread: two replicas and the clients share two cores
                            "-e", "OMP_NUM_THREADS=1", "--stop-timeout", str(STOP_S)])


@dataclass
class Stack:
    docker: Docker
    replicas: list[Replica]
    key: str
    model: str

    def transports(self) -> list[CohereTransport | GrpcTransport]:
        return [CohereTransport([r.http_url for r in self.replicas], self.model, api_key=self.key, timeout_s=10),
                GrpcTransport([r.grpc_target for r in self.replicas], api_key=self.key, timeout_s=10)]


def served_model(target: str) -> str:
    with RerankClient(target, timeout_s=10) as client:
        return client.model_info().model


def successes(count: int, reached: asyncio.Event) -> Callable[[Outcome], None]:
    seen = 0

    def on_outcome(outcome: Outcome) -> None:
        nonlocal seen
        seen += outcome.ok
        if seen >= count:
            reached.set()

    return on_outcome


# -- topology 1: replicated -----------------------------------------------------------------
def test_replicas_survive_kill_and_rolling_replacement_and_the_ledger_reconciles(
        docker_engine: Docker, shared_model_dir: Path, postgres_url: str) -> None:  # noqa: F811
    docker = docker_engine
    key = create_key(docker, postgres_url, "deploy")
    replicas = [keyed_replica(docker, n, shared_model_dir, postgres_url) for n in ("rerank-a", "rerank-b")]
    for r in replicas:
        r.start(docker)
    cold_s = [r.wait_ready(docker) for r in replicas]
    stack = Stack(docker, replicas, key, served_model(replicas[0].grpc_target))

    killed = asyncio.run(kill_and_restart(stack))
    rolled = asyncio.run(rolling_replacement(stack))

    for phase, outcomes in (("kill", killed), ("rolling", rolled)):
        assert outcomes and all(o.ok for o in outcomes), (phase, {o.final.code for o in outcomes if not o.ok})
        assert all(a.verdict is not Verdict.FAILED for o in outcomes for a in o.attempts), phase
    retried = [o for o in killed if len(o.attempts) > 1]
    assert retried, "no call was caught by the kill: the test did not test it"
    limited = stack.replicas[1]
    assert healthy_under_limits(docker, limited), docker.logs(limited.name)
    assert all(served_ok(r) > 0 for r in stack.replicas), "a replacement replica took no calls"
    rec = reconcile(killed + rolled, asyncio.run(read_records(postgres_url)))
    assert rec.ok, rec.describe()
    print(f"deploy: ready after {', '.join(f'{s:.1f}s' for s in cold_s)}; kill: {len(killed)} calls, "
          f"{len(retried)} retried across it, {sum(not o.ok for o in killed)} failed; rolling: {len(rolled)} "
          f"calls, {sum(len(o.attempts) > 1 for o in rolled)} retried, {sum(not o.ok for o in rolled)} failed; "
          f"{rec.describe()}")


async def kill_and_restart(stack: Stack) -> list[Outcome]:
    """3 clients per SDK, 25 calls each; SIGKILL one replica once 20 have succeeded, start the
    same container again, and let the clients finish."""
    reached = asyncio.Event()
    load = asyncio.ensure_future(drive(stack.transports(), Level(3, 25, 240), Workload(documents=8), POLICY,
                                       on_outcome=successes(20, reached)))
    await asyncio.wait_for(reached.wait(), 120)
    victim = stack.replicas[0]
    await asyncio.to_thread(stack.docker, "kill", victim.name)
    await asyncio.sleep(1)  # callers meet a dead port and retry, on the other replica
    await asyncio.to_thread(stack.docker, "start", victim.name)
    await asyncio.to_thread(victim.wait_ready, stack.docker)
    return outcomes_of(await load)


async def rolling_replacement(stack: Stack) -> list[Outcome]:
    """Under steady load (request numbers per front stay below drive()'s 100_000 stride, so keys
    never collide), replace each replica in turn: docker stop (drain, grace, exit 0), a
    new container on the same ports, ready, then the next. The second runs under LIMITS."""
    stop = asyncio.Event()
    load = asyncio.ensure_future(drive(stack.transports(), Level(2, 10_000, 600, think_s=0.05),
                                       Workload(documents=8), POLICY, stop=stop))
    try:
        await asyncio.sleep(2)
        for i in range(len(stack.replicas)):
            await asyncio.to_thread(replace_replica, stack, i, LIMITS if i == 1 else [])
            await asyncio.sleep(2)  # the new pair under load before the next step
    finally:
        stop.set()
    return outcomes_of(await load)


def replace_replica(stack: Stack, i: int, options: list[str]) -> None:
    docker, old = stack.docker, stack.replicas[i]
    docker("stop", "-t", str(STOP_S), old.name, timeout_s=STOP_S + 30)
    state = docker.inspect(old.name)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, docker.logs(old.name))
    docker("rm", old.name)
    new = replace(old, name=f"{old.name}-next", options=[*old.options, *options])
    new.start(docker).wait_ready(docker)
    stack.replicas[i] = new


def healthy_under_limits(docker: Docker, replica: Replica, timeout_s: float = 60) -> bool:
    """The image's own HEALTHCHECK says healthy, the limits are in force, nothing was killed."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        info = docker.inspect(replica.name)
        state, host = info["State"], info["HostConfig"]
        assert (host["Memory"], host["NanoCpus"]) == (1536 * 2**20, 10**9), host
        assert state["Running"] and not state["OOMKilled"] and info["RestartCount"] == 0, state
        if state["Health"]["Status"] == "healthy":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1)


def served_ok(replica: Replica) -> float:
    """Successful calls this replica answered, from its /metrics."""
    text = httpx.get(f"{replica.http_url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) if family.name == "rerank_requests"
               for s in family.samples if s.name.endswith("_total") and s.labels.get("code") in {"OK", "200"})


# -- topology 2: scale-out, from the compose file ---------------------------------------------
def test_gateway_in_front_of_two_scorers_from_the_compose_file(
        docker_engine: Docker, shared_model_dir: Path, postgres_url: str) -> None:  # noqa: F811
    docker = docker_engine
    compose = compose_command()
    if compose is None:
        pytest.skip("no Compose (apt-get install docker-compose, or the docker compose plugin)")
    ports = {name: free_port() for name in ("SCORER_A_GRPC_PORT", "SCORER_A_HTTP_PORT", "SCORER_B_GRPC_PORT",
                                            "SCORER_B_HTTP_PORT", "GATEWAY_HTTP_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "RERANK_IMAGE": docker.image,
           "RERANK_CHECKPOINTS": str(shared_model_dir), "SCORER_MODEL": "/checkpoints",
           "GATEWAY_DB_URL": postgres_url, "POSTGRES_PASSWORD": "unused",
           "RERANK_COMPILE": "false",  # eager scorers: a shorter cold start, as in the other topology
           "COMPOSE_PROJECT_NAME": f"rerank-test-{docker.label.split('=')[1]}"}
    command = [*compose, "-f", str(COMPOSE_FILE), "--profile", "scaleout"]
    docker.projects.append((command, env))
    up = subprocess.run([*command, "up", "-d", "--no-build", "gateway"], capture_output=True, text=True,
                        timeout=600, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    gateway = f"http://127.0.0.1:{ports['GATEWAY_HTTP_PORT']}"
    wait_url_ready(gateway, 300)
    key = create_key(docker, postgres_url, "gateway")
    model = httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    transport = CohereTransport([gateway], model["data"][0]["id"], api_key=key, timeout_s=30)
    outcomes = outcomes_of(asyncio.run(drive([transport], Level(4, 15, 240), Workload(documents=8), POLICY)))
    assert outcomes and all(o.ok for o in outcomes), {o.final.code for o in outcomes if not o.ok}
    scorers = [Replica("scorer", [], ports[f"SCORER_{x}_GRPC_PORT"], ports[f"SCORER_{x}_HTTP_PORT"])
               for x in "AB"]
    calls = [served_ok(s) for s in scorers]
    assert all(c > 0 for c in calls), f"a scorer took no calls: {calls}"
    rec = reconcile(outcomes, asyncio.run(read_records(postgres_url)))
    assert rec.ok, rec.describe()
    print(f"scale-out (compose): {len(outcomes)} calls through the gateway, scorers answered {calls}; "
          f"{rec.describe()}")
