"""``rerank serve`` and ``rerank score`` as operators and scripts run them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observe_support import ServeProcess as Server

from service import cli
from service import config as serve_config
from service.config import ServeConfig
from worker.types import Device

RERANK = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser()
    serve_config.add_arguments(parser, env=env or {})
    return serve_config.from_args(parser.parse_args(argv))


def parse_gateway(argv: list[str], env: dict[str, str]) -> serve_config.GatewayConfig:
    parser = argparse.ArgumentParser()
    serve_config.add_arguments(parser, env=env, config=serve_config.GatewayConfig)
    return serve_config.config_from_args(parser.parse_args(argv), serve_config.GatewayConfig)


def test_gateway_shares_the_front_knobs_and_reads_the_environment_too() -> None:
    env = {"RERANK_BACKEND": "a:1, b:2", "RERANK_RATE_LIMIT_RPS": "5", "RERANK_AUTH": "off"}
    config = parse_gateway([], env)
    assert (config.backend, config.rate_limit_rps, config.auth) == (("a:1", "b:2"), 5.0, False)
    flagged = parse_gateway(["--backend", "c:3", "--backend", "d:4", "--auth"], env)
    assert (flagged.backend, flagged.auth) == (("c:3", "d:4"), True)  # a flag beats the environment
    shared = {f.name for f in dataclasses.fields(serve_config.FrontConfig)}
    assert shared <= {f.name for f in dataclasses.fields(ServeConfig)}


def test_help_lists_every_knob_with_its_default() -> None:
    out = subprocess.run([*RERANK, "serve", "--help"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    text = " ".join(out.split())
    for f in dataclasses.fields(ServeConfig):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.metadata["bench"]:  # a benchmark's switch: it parses (below), it is not listed
            assert flag not in text, flag
            continue
        assert flag in text, flag
        assert f"RERANK_{f.name.upper()}" in text
    for spelled in ("--model PATH_OR_HUB_ID", "--host H", "--grpc-port N", "--http-port N", "--db URL",
                    "(default: 50051)", "(default: 0.0.0.0)", "(default: 4096)", "(default: per device)"):
        assert spelled in text, spelled


def test_flags_beat_the_environment_which_beats_defaults() -> None:
    env = {"RERANK_MODEL": "/models/x", "RERANK_GRPC_PORT": "7001", "RERANK_PREFIX_REUSE": "false",
           "RERANK_MAX_WAIT_MS": "1.5", "RERANK_DB_URL": "sqlite:///u.db"}
    config = parse(["--grpc-port", "7002"], env)
    assert (config.model, config.grpc_port, config.prefix_reuse, config.max_wait_ms) == ("/models/x", 7002, False, 1.5)
    assert config.db_url == "sqlite:///u.db" and config.host == "0.0.0.0"
    assert parse(["--db", "postgresql://h/db", "--no-prefix-reuse"]).db_url == "postgresql://h/db"
    assert parse([]).max_batch_tokens is None  # the device's default, chosen once the model is loaded


def test_a_bad_environment_value_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="RERANK_GRPC_PORT='http'"):
        parse([], {"RERANK_GRPC_PORT": "http"})


def test_batching_knobs_override_the_device_defaults() -> None:
    config = parse(["--max-batch-tokens", "1234", "--max-queued-docs", "9"])
    batching = config.batcher_config(Device.CUDA)
    assert (batching.max_batch_tokens, batching.max_queued_docs) == (1234, 9)
    assert batching.max_batch_size == config.batcher_config(Device.CUDA).max_batch_size != \
        config.batcher_config(Device.CPU).max_batch_size


@pytest.mark.parametrize("argv", [["--tls-cert", "c.pem"], ["--db", "/nonexistent/dir/ledger.sqlite3"],
                                  ["--replicas", "0"], ["--attention", "flash"], ["--idempotency-ttl-h", "0"]])
def test_what_cannot_work_is_refused_at_start(argv: list[str], tmp_path: Path) -> None:
    try:
        code = cli.main(["serve", "--model", "unused", "--grpc-port", "0", "--http-port", "0",
                         "--data-dir", str(tmp_path), *argv])
    except SystemExit as exc:  # refused by the flag parser itself (an unknown --attention)
        code = exc.code
    assert code == 2


def test_serve_without_a_model_serves_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RERANK_MODEL", raising=False)
    args = cli.build_parser().parse_args(["serve"])
    assert serve_config.from_args(args).model == "Qwen/Qwen3-Reranker-0.6B"


# -- the real thing, in a subprocess ---------------------------------------------------------
@pytest.fixture()
def served(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    server = Server(["--model", str(tiny_model_dir), "--host", "127.0.0.1", "--grpc-port", "0",
                     "--http-port", "0", "--no-auth", "--data-dir", str(tmp_path),
                     "--max-length", "256", "--grace-s", "5"])
    try:
        port = server.wait_for(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        server.wait_for(r"ready: ")
        yield server, f"127.0.0.1:{port}"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.reader.join(5)
        assert server.proc.stderr is not None
        server.proc.stderr.close()


def score(address: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # run `rerank score` and report whether anything heavier than the client was imported
    code = ("import sys; from service import cli; rc = cli.main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'prometheus_client', 'service.app') if m in sys.modules];"
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "score", "--target", address, *args], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_serve_score_and_sigterm(served: tuple[Server, str]) -> None:
    server, address = served
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING

    ranked = score(address, "capital of France", "Bananas are yellow.", "Paris is the capital of France.")
    assert ranked.returncode == 0, ranked.stderr
    lines = ranked.stdout.splitlines()
    assert len(lines) == 2 and all(re.match(r"\s+\d+\s+0\.\d{4}\s+\[[01]\]\s+\S", line) for line in lines)
    assert "HEAVY []" in ranked.stderr  # the client path needs no torch, no server extras

    as_json = score(address, "capital of France", "--json", "--documents-file", "-", stdin="one\ntwo\n\nthree\n")
    assert [r["index"] for r in json.loads(as_json.stdout)["results"]] != []
    assert json.loads(as_json.stdout)["usage"]["documents"] == 3

    refused = score(address, "capital of France")  # no documents
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr

    server.wait_for(r"rpc=Rerank code=OK .*documents=2")  # one access line per call
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    server.wait_for(r"stopped")


@pytest.mark.parametrize("argv,says,hint", [
    # a --model that is no checkpoint at all fails before this, in seconds: tests/test_newcomer.py
    (["--attention", "varlen", "--device", "cpu"], "needs a CUDA device", False),
])
def test_a_model_that_cannot_load_stops_the_server_saying_why(
    argv: list[str], says: str, hint: bool, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Exit 1 with the reason; the --model advice only where the checkpoint was not found."""
    assert cli.main(["serve", "--model", str(tiny_model_dir), "--grpc-port", "0", "--http-port", "0",
                     "--data-dir", str(tmp_path), "--no-auth", *argv]) == 1
    (failed,) = [r.getMessage() for r in caplog.records if "model failed to load" in r.getMessage()]
    assert says in failed
    assert ("--model takes a Hugging Face hub id" in failed) is hint


def test_http_edge_flags_reach_the_limits_of_serve_and_gateway() -> None:
    from service.commands import gateway
    from service.edge import EdgeLimits

    parser = argparse.ArgumentParser()
    serve_config.add_arguments(parser, env={"RERANK_HTTP_HEADER_TIMEOUT_S": "3"})
    args = parser.parse_args(["--http-max-connections", "7", "--http-body-timeout-s", "2.5"])
    limits = serve_config.from_args(args).edge_limits()
    assert (limits.max_connections, limits.body_timeout_s, limits.header_timeout_s) == (7, 2.5, 3.0)
    parser = argparse.ArgumentParser()
    gateway.add_arguments(parser)
    args = parser.parse_args(["--backend", "h:1", "--http-max-body-bytes-in-flight", "1000"])
    config = serve_config.config_from_args(args, serve_config.GatewayConfig)
    assert config.edge_limits() == EdgeLimits(max_body_bytes_in_flight=1000)
    with pytest.raises(ValueError, match="--http-max-connections must be positive"):
        EdgeLimits(max_connections=0)
