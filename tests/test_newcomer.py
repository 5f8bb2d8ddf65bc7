"""A newcomer's first ten minutes, as written in the README: each step works, or fails at once
saying what to do."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from gateway_support import LiveGateway, Options

from service import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent  # where `rerank` is installed (console script of this venv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readme_block(starts: str) -> str:
    """The README's indented command block whose first command starts with ``starts``."""
    for block in re.split(r"\n\s*\n", README):
        lines = [line[4:] for line in block.splitlines() if line.startswith("    ")]
        if lines and lines[0].startswith(starts):
            return "\n".join(lines)
    raise AssertionError(f"the README has no command block starting {starts!r}")


def shell_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": f"{ROOT}{os.pathsep}"
            f"{ROOT / 'clients'}", "RERANK_DATA_DIR": str(tmp / "data"), "PYTHONUNBUFFERED": "1", **extra}


# -- the offline flow, typed as written -------------------------------------------------------
@pytest.fixture
def offline_server(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The README's two offline commands, as written, in a fresh directory; only the ports
    are the environment's (RERANK_*_PORT), so parallel test runs do not collide."""
    http, grpc = free_port(), free_port()
    env = shell_env(tmp_path, RERANK_HTTP_PORT=str(http), RERANK_GRPC_PORT=str(grpc))
    make, serve = readme_block("rerank make-test-model").splitlines()
    assert "--model-name Qwen/Qwen3-Reranker-0.6B" in serve and "--host 127.0.0.1" in serve
    subprocess.run(make, shell=True, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(serve, shell=True, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "ready: " in line:
                break
        else:
            raise AssertionError("rerank serve stopped before it was ready")
        yield http, grpc
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.slow
def test_readme_offline_flow_answers(offline_server: tuple[int, int], tmp_path: Path) -> None:
    http, grpc = offline_server
    env = shell_env(tmp_path)
    call = readme_block("export KEY=").replace(":8080", f":{http}")
    out = subprocess.run(call + " -w '\\n%{http_code}'", shell=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "200", out.stdout + out.stderr
    assert sorted(r["index"] for r in json.loads(body)["results"]) == [0, 1]
    snippet = re.search(r"```python\n(.*?)```", README, re.S)
    assert snippet is not None and "KEY = " in snippet.group(1)  # the snippet defines what it uses
    ran = subprocess.run([sys.executable, "-c", snippet.group(1).replace(":50051", f":{grpc}")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and len(ran.stdout.splitlines()) == 2, ran.stderr


# -- /docs without internet --------------------------------------------------------------------
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no CDN, whatever the network
           "--virtual-time-budget=15000"]


def browse(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    return subprocess.run([BROWSER, *OFFLINE, f"--user-data-dir={tmp / 'profile'}", *args, url],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no headless browser (CI installs chromium)")
def test_docs_render_offline(tmp_path: Path) -> None:
    from PIL import Image

    with LiveGateway(str(tmp_path / "ledger.sqlite3"), Options()) as gw:
        swagger = browse(gw.url + "/docs", tmp_path, "--dump-dom").stdout
        redoc = browse(gw.url + "/redoc", tmp_path, "--dump-dom").stdout
        shot = tmp_path / "docs.png"
        browse(gw.url + "/docs", tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    # rendered by the scripts, not just the HTML shell: the operations are on the page
    assert 'class="opblock-summary-path"' in swagger and "/v1/rerank" in swagger, swagger[-2000:]
    assert "/v2/rerank" in redoc and redoc.count("Qwen3-Reranker API") >= 2, redoc[-2000:]
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # a blank page has one or two colours


# -- the hub id that cannot be fetched ---------------------------------------------------------
@pytest.mark.parametrize("argv,env", [
    (["--model", "no-such-org/no-such-reranker"], {}),
    ([], {"HF_HUB_OFFLINE": "1"}),  # the default hub id, offline, not in the (empty) cache
    (["--model", "/nonexistent/checkpoint"], {}),
])
def test_unfetchable_model_fails_in_seconds_before_binding(argv: list[str], env: dict[str, str],
                                                          tmp_path: Path) -> None:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "service.cli", "serve", *argv, "--no-auth", "--grpc-port", "0",
                          "--http-port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=shell_env(tmp_path, HF_HOME=str(tmp_path / "hf"), **env))
    assert run.returncode == 2
    assert time.monotonic() - started < 30  # seconds, where from_pretrained's retries took ~52 s
    assert "listening" not in run.stderr  # nothing bound
    (error,) = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert "cannot load --model" in error and "--model takes a Hugging Face hub id" in error
    assert "make-test-model" in error and "Traceback" not in run.stderr


# -- the client-only install ---------------------------------------------------------------------
def serve_extra_modules() -> set[str]:
    """Import names of the serve extra's distributions, to hide them as a client-only install would."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    wanted = {re.split(r"[\[<>=!~ ;]", req)[0].lower().replace("_", "-") for req in extra}
    return {name for name, dists in packages_distributions().items()
            if any(d.lower().replace("_", "-") in wanted for d in dists) and not name.startswith("_")}


HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv.pop(1).split(","))
class ClientOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, ClientOnly())
from service import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["serve", "--model", "x"], ["keys", "list"], ["keys", "create", "--name", "a"],
                                  ["usage"], ["gateway", "--backend", "127.0.0.1:1"], ["make-test-model", "d"]])
def test_client_only_install_says_which_extra_serve_side_commands_need(argv: list[str], tmp_path: Path) -> None:
    hidden = serve_extra_modules()
    assert {"torch", "sqlalchemy", "fastapi"} <= hidden
    run = subprocess.run([sys.executable, "-c", HIDE, ",".join(sorted(hidden)), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=shell_env(tmp_path))
    assert run.returncode == 2, run.stderr
    assert f"rerank {argv[0]} needs the serve extra: pip install 'qwen3-rerank[serve]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_help_says_each_default_once() -> None:
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    pages = {name: sub.format_help() for name, sub in subs.items()}
    keys = subs["keys"]._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    pages.update({f"keys {name}": sub.format_help() for name, sub in keys.items()})
    for name, page in pages.items():
        flat = " ".join(page.split())
        assert "(default: None)" not in flat, name
        assert not re.search(r"\(default: [^)]*\) \(default:", flat), name
