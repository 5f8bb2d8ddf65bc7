"""A real ``rerank serve`` in a subprocess for the observability tests: its stderr read line by
line on a thread, its ports found in its log, and the process killed on the way out, also when
a test fails."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RERANK = [sys.executable, "-m", "service.cli"]


class ServeProcess:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([*RERANK, "serve", *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout_s: float = 90) -> re.Match[str]:
        """The first line from here on that matches ``pattern``; every line read is kept in ``log``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no {pattern!r} in the log:\n{''.join(self.log)}")

    def found(self, pattern: str) -> re.Match[str]:
        """The first line read so far that matches ``pattern``."""
        for line in self.log:
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no {pattern!r} in the log:\n{''.join(self.log)}")

    def drain(self) -> list[str]:
        """The lines written so far and not yet read, added to ``log``."""
        while True:
            try:
                self.log.append(self.lines.get_nowait())
            except queue.Empty:
                return self.log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextmanager
def serving(model_dir: Path, data_dir: Path, *extra: str) -> Iterator[tuple[ServeProcess, str, str]]:
    """``rerank serve --no-auth`` on the tiny model, ready: the process, its gRPC target and its HTTP URL."""
    server = ServeProcess(["--model", str(model_dir), "--host", "127.0.0.1", "--grpc-port", "0",
                           "--http-port", "0", "--no-auth", "--data-dir", str(data_dir), "--max-length", "256",
                           "--grace-s", "1", *extra])
    try:
        server.wait_for(r"ready: ", 240)  # after every port is bound and logged (minutes on a loaded host)
        grpc_port = server.found(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        http_url = server.found(r"HTTP gateway listening on (http://127\.0\.0\.1:\d+)").group(1)
        yield server, f"127.0.0.1:{grpc_port}", http_url
    finally:
        server.stop()
