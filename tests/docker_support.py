"""Docker for the deploy tests: the engine, the image, and containers that never outlive a test.

The engine must already run (``.ci/run`` starts one: ``dockerd --bridge=none --iptables=false``)
and the image must already be built (``deploy/build-image.sh``); without either the tests are
skipped, with the reason. Every container runs on the host network, so every port is a
loopback port chosen free at run time, and carries the fixture's label: at the end the fixture
removes everything with that label (compose projects by theirs), failed tests included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.load.servers import free_port

IMAGE_ENV = "RERANK_TEST_IMAGE"
DEFAULT_IMAGE = "qwen3-rerank:cpu"
COMPOSE_FILE = Path(__file__).resolve().parents[1] / "deploy" / "docker-compose.yml"


def docker_unavailable(image: str) -> str | None:
    """Why the deploy tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker command (.ci/run installs Debian's docker.io)"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30)
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[-200:]}"
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=30).returncode != 0:
        return f"image {image} not built (deploy/build-image.sh {image}, or set {IMAGE_ENV})"
    return None


def compose_command() -> list[str] | None:
    """An installed Compose: the v2 plugin, or Debian's docker-compose (v1)."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


class Docker:
    """The docker CLI, with every container this test starts labelled for removal."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.label = f"rerank-test={uuid.uuid4().hex[:12]}"
        self.projects: list[tuple[list[str], dict[str, str]]] = []  # compose command, env

    def __call__(self, *args: str, timeout_s: float = 120, check: bool = True) -> str:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def run(self, name: str, args: Sequence[str], options: Sequence[str] = ()) -> str:
        """A detached container of the image on the host network; its id."""
        return self("run", "-d", "--name", name, "--label", self.label, "--network", "host", *options,
                    self.image, *args).strip()

    def run_once(self, args: Sequence[str], options: Sequence[str] = ()) -> str:
        """The image run to completion (``--rm``): its standard output."""
        return self("run", "--rm", "--label", self.label, "--network", "host", *options, self.image, *args)

    def inspect(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self("inspect", name))
        return found[0]

    def logs(self, name: str, lines: int = 40) -> str:
        done = subprocess.run(["docker", "logs", "--tail", str(lines), name], capture_output=True, text=True,
                              timeout=30)
        return done.stdout + done.stderr

    def remove_all(self) -> None:
        """Every container with this test's label, and every compose project it brought up."""
        for command, env in self.projects:
            subprocess.run([*command, "down", "--volumes", "--remove-orphans", "--timeout", "1"],
                           capture_output=True, timeout=120, env=env)
        ids = self("ps", "-aq", "--filter", f"label={self.label}", check=False).split()
        if ids:
            self("rm", "-f", "-v", *ids, timeout_s=120)


@pytest.fixture
def docker_engine() -> Iterator[Docker]:
    image = os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)
    if reason := docker_unavailable(image):
        pytest.skip(reason)
    engine = Docker(image)
    try:
        yield engine
    finally:
        engine.remove_all()


@pytest.fixture(scope="session")
def shared_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``rerank make-test-model`` into a directory the image's user (uid 10001) can read:
    pytest's own temp dirs are private to the user who runs it."""
    from bench.load.servers import rerank_command

    base = Path(tmp_path_factory.mktemp("image-model"))
    base.chmod(0o755)
    subprocess.run([*rerank_command(), "make-test-model", str(base / "tiny")], check=True, capture_output=True,
                   timeout=300)
    for path in base.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    # the temp root above is 0700: the bind mount is what the container sees, so only the
    # checkpoint itself must be readable
    return base / "tiny"


@dataclass
class Replica:
    """One `rerank serve` container; ports by environment, so the image's health check (which
    reads RERANK_HTTP_PORT) asks the port the server listens on."""

    name: str
    args: Sequence[str]
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    options: Sequence[str] = ()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, docker: Docker) -> Replica:
        docker.run(self.name, ["serve", *self.args],
                   ["-e", f"RERANK_GRPC_PORT={self.grpc_port}", "-e", f"RERANK_HTTP_PORT={self.http_port}",
                    *self.options])
        return self

    def wait_ready(self, docker: Docker, timeout_s: float = 300) -> float:
        """Seconds until /ready answers 200; raises with the log if the container stops."""
        return wait_ready(self.http_url, timeout_s, lambda: _running_or_raise(docker, self.name))


def wait_ready(url: str, timeout_s: float, alive: Any = None) -> float:
    started = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        if alive is not None:
            alive()
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")
        time.sleep(0.2)


def _running_or_raise(docker: Docker, name: str) -> None:
    state = docker.inspect(name)["State"]
    if not state["Running"] and not state["Restarting"]:
        raise RuntimeError(f"container {name} stopped ({state['ExitCode']}):\n{docker.logs(name)}")
