"""Real ``rerank serve`` processes on loopback, for the load tool and the fault tests.

A ``ServeProcess`` runs the installed ``rerank`` command (the same entry point as the
container image) with the given model and database, waits until gRPC health says SERVING,
and can be stopped politely (SIGTERM), killed (SIGKILL) and started again on the same ports.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def require_loopback(address: str) -> None:
    """Refuse a target that is not on this machine: load and faults go to loopback only."""
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host.lower() in _LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{address!r} is not a loopback address; this tool only drives servers on "
                     "127.0.0.0/8, [::1] or localhost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rerank_command() -> list[str]:
    """The installed ``rerank`` entry point beside this interpreter (what the image runs)."""
    script = Path(sys.executable).with_name("rerank")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def create_api_key(db_url: str, name: str, *extra: str) -> str:
    """``rerank keys create``: the key is the last line it prints."""
    done = subprocess.run([*rerank_command(), "keys", "create", "--name", name, "--db", db_url, *extra],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1].strip()


@dataclass
class ServeProcess:
    model: str
    log_path: Path
    db_url: str | None = None
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def argv(self) -> list[str]:
        args = [*rerank_command(), "serve", "--model", self.model, "--host", "127.0.0.1",
                "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
        if self.db_url:
            args += ["--db", self.db_url]
        return args + list(self.extra_args)

    def start(self) -> ServeProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> ServeProcess:
        """Until gRPC health says SERVING (model loaded and warm); raises if the process dies."""
        deadline = time.monotonic() + timeout_s
        while not self._serving():
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"rerank serve exited with {self.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rerank serve not SERVING after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.grpc_target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it outlives ``timeout_s``; the exit code (None: never ran)."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (Linux)."""
        if self.proc is None:
            raise RuntimeError("not started")
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def replicas_sharing(db_url: str, model_dir: str, logs: Path, count: int = 2) -> Iterator[list[ServeProcess]]:
    """``count`` keyed ``rerank serve`` replicas on one ledger database, started and ready; on
    a clean exit each must stop with status 0. One torch thread each: the replicas and their
    clients share the machine's cores."""
    servers = [ServeProcess(model_dir, logs / f"replica-{i}.log", db_url=db_url,
                            extra_args=["--auth", "--replicas", str(count)], env={"OMP_NUM_THREADS": "1"})
               for i in range(count)]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server.start())
        for server in servers:
            server.wait_ready()
        yield servers
        for server in servers:
            assert server.stop() == 0, server.log_tail()
