"""OpenTelemetry tracing (service/tracing.py; docs/OPERATIONS.md, "Tracing"): the real OTLP
exporter against an OTLP receiver started here (tests/otlp_support.py). A served call's
spans, their parents from a W3C ``traceparent`` on HTTP and gRPC, the batch span linked to
the calls it served, the attributes, the access line written inside the call's span, no key
material in the exported bytes; and with tracing off, nothing set up."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients import AsyncRerankClient, RerankError
from service import cli, tracing
from service.app import App
from service.config import ServeConfig
from service.http.server import HttpServer
from tests.otlp_support import ExportedSpan, Receiver
from worker.fake import FakeRunner

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
HTTP_PARENT, GRPC_PARENT = "00f067aa0ba902b7", "00f067aa0ba902b8"
SERVER, CLIENT = 2, 3  # OTLP span kinds
CALL_SPANS = {"rerank.auth", "rerank.admission", "rerank.score", "rerank.bill"}


def traceparent(parent: str) -> str:
    return f"00-{TRACE_ID}-{parent}-01"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


class SpanAtLog(logging.Handler):
    """What a JSON log formatter would see: the current span's ids as each access line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, str]] = []  # (line, trace id, span id)

    def emit(self, record: logging.LogRecord) -> None:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        self.seen.append((record.getMessage(), f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"))


@pytest.fixture
def access_lines() -> Iterator[SpanAtLog]:
    handler, access = SpanAtLog(), logging.getLogger("rerank.access")
    access.addHandler(handler)
    # (an earlier test's dictConfig, uvicorn's, may have disabled the existing loggers)
    level, disabled, access.disabled = access.level, access.disabled, False
    access.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
        access.disabled = disabled


def create_key(db: str) -> tuple[str, str]:
    """(key id, key) from ``rerank keys create`` and ``list``, the way an operator makes one."""
    from bench.load.servers import create_api_key

    key = create_api_key(db, "traced")
    listing = subprocess.run([sys.executable, "-m", "service.cli", "keys", "list", "--db", db], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    return listing[1].split()[0], key


def by_name(spans: list[ExportedSpan], name: str) -> list[ExportedSpan]:
    return [s for s in spans if s.name == name]


def children(spans: list[ExportedSpan], parent: ExportedSpan) -> list[ExportedSpan]:
    return [s for s in spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id]


async def served_calls(app: App, key: str) -> None:
    (server,) = [c for c in app.components if isinstance(c, HttpServer)]
    assert app.grpc is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        r = await http.post("/v1/rerank", json={"query": "capital of France", "documents": ["Paris", "Bananas"]},
                            headers={"Authorization": f"Bearer {key}", "traceparent": traceparent(HTTP_PARENT)})
        assert r.status_code == 200, r.text
        wrong = await http.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                                headers={"Authorization": f"Bearer {key[:-4]}AAAA"})
        assert wrong.status_code == 401
    async with AsyncRerankClient(f"127.0.0.1:{app.grpc.port}", api_key=f"{key[:-4]}AAAA") as refused:
        with pytest.raises(RerankError, match="UNAUTHENTICATED"):  # refused before the message is read
            await refused.rerank("q", ["a"])
    async with AsyncRerankClient(f"127.0.0.1:{app.grpc.port}", api_key=key) as client:
        for parent in (GRPC_PARENT, None):  # the same request id again: replayed, free
            await client.rerank("capital of Spain", ["Madrid", "Lisbon", "Rome"], priority=7, request_id="call-1",
                                metadata=(("traceparent", traceparent(parent)),) if parent else ())


async def test_a_served_call_is_traced_from_each_front_to_the_batch(
        tmp_path: Path, receiver: Receiver, access_lines: SpanAtLog) -> None:
    db = str(tmp_path / "ledger.sqlite3")
    key_id, key = await asyncio.to_thread(create_key, db)
    app = App(ServeConfig(model="fake", host="127.0.0.1", grpc_port=0, http_port=0, db_url=db, max_wait_ms=0.0,
                          otlp_endpoint=receiver.endpoint), load_runner=FakeRunner)
    await app.start()
    try:
        await app.wait_ready()
        await served_calls(app, key)
    finally:
        await app.stop(grace_s=0)  # flushes the batch processor: every span is exported by now
    assert not tracing.enabled()
    spans = receiver.spans()
    assert {s.service for s in spans} == {"rerank-serve"}

    (http,) = [s for s in by_name(spans, "POST /v1/rerank") if s.parent_id == HTTP_PARENT]
    refused_rpc, grpc_call, replayed = sorted(by_name(spans, "rerank.v1.RerankService/Rerank"),
                                              key=lambda s: s.start_ns)
    assert refused_rpc.attributes["rpc.grpc.status_code"] == 16 and children(spans, refused_rpc) == []
    assert (http.trace_id, http.kind, grpc_call.trace_id, grpc_call.parent_id, grpc_call.kind) == (
        TRACE_ID, SERVER, TRACE_ID, GRPC_PARENT, SERVER)
    assert http.attributes["http.response.status_code"] == 200 and http.attributes["http.route"] == "/v1/rerank"
    assert grpc_call.attributes["rpc.grpc.status_code"] == 0 and grpc_call.attributes["rpc.method"] == "Rerank"
    for call, documents, priority, keyed in ((http, 2, 0, set()), (grpc_call, 3, 7, {"rerank.replay"})):
        assert {k: call.attributes[k] for k in ("rerank.key_id", "rerank.documents", "rerank.priority",
                                                "rerank.replayed", "rerank.queries")} == {
            "rerank.key_id": key_id, "rerank.documents": documents, "rerank.priority": priority,
            "rerank.replayed": False, "rerank.queries": 1}
        assert call.attributes["rerank.prompt_tokens"] > 0 and call.attributes["rerank.computed_tokens"] > 0
        steps = children(spans, call)
        assert {s.name for s in steps} == CALL_SPANS | keyed  # a keyed call looks for its stored reply first
        (score,) = by_name(steps, "rerank.score")
        assert score.attributes == {"rerank.documents": documents}  # no text unless the operator asks
        tokenize, queue = (by_name(children(spans, score), n)[0] for n in ("rerank.tokenize", "rerank.queue"))
        assert score.start_ns <= tokenize.start_ns <= tokenize.end_ns <= queue.start_ns <= queue.end_ns <= score.end_ns
        batches = [b for b in by_name(spans, "rerank.batch") if (score.trace_id, score.span_id) in b.links]
        assert len(batches) == 1 and batches[0].parent_id == "" and batches[0].trace_id != TRACE_ID
        assert score.links == [(batches[0].trace_id, batches[0].span_id)]  # and back, from the call's side
        assert batches[0].attributes["rerank.batch.rows"] == documents
        assert batches[0].attributes["rerank.batch.padded_tokens"] >= batches[0].attributes[
            "rerank.batch.computed_tokens"] - batches[0].attributes["rerank.batch.prefill_tokens"] > 0
        assert queue.end_ns <= batches[0].start_ns + 1_000_000  # the queue wait ends as the batch starts

    assert replayed.attributes["rerank.replayed"] is True and replayed.trace_id != TRACE_ID
    assert {s.name for s in children(spans, replayed)} == {"rerank.auth", "rerank.replay"}
    refused = [s for s in by_name(spans, "POST /v1/rerank") if s.attributes["http.response.status_code"] == 401]
    assert len(refused) == 1 and "rerank.key_id" not in refused[0].attributes
    # every access line was written with its call's span current (trace and span ids for JSON logs)
    calls = {s.span_id: s.trace_id for s in spans if s.kind == SERVER}
    assert len(access_lines.seen) == 5 and all(calls.get(span) == trace for _, trace, span in access_lines.seen)
    exported = b"".join(receiver.raw)
    for secret in (key, key.removeprefix("rk_live_"), f"{key[:-4]}AAAA".removeprefix("rk_live_")):
        assert secret.encode() not in exported
    assert b"Paris" not in exported and b"capital of" not in exported  # and no text


async def test_trace_text_is_the_operators_opt_in_and_the_service_name_its_choice(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "search-reranker")
    app = App(ServeConfig(model="fake", host="127.0.0.1", grpc_port=0, http_port=None, auth=False,
                          data_dir=tmp_path, max_wait_ms=0.0, otlp_endpoint=receiver.endpoint, trace_text=True),
              load_runner=FakeRunner)
    await app.start()
    try:
        await app.wait_ready()
        assert app.grpc is not None
        async with AsyncRerankClient(f"127.0.0.1:{app.grpc.port}") as client:
            await client.rerank("capital of France", ["Paris", "Bananas"], instruction="Find the city")
    finally:
        await app.stop(grace_s=0)
    (score,) = by_name(receiver.spans(), "rerank.score")
    assert score.service == "search-reranker"  # not rerank-serve: the operator named it
    assert score.attributes["rerank.documents.text"] == ["Paris", "Bananas"]
    assert (score.attributes["rerank.query.text"], score.attributes["rerank.instruction.text"]) == (
        "capital of France", "Find the city")


async def test_a_batch_of_several_calls_is_one_span_linked_to_each(receiver: Receiver) -> None:
    from tests.serving import eventually, running_app, target

    runner = FakeRunner()
    async with running_app(runner, otlp_endpoint=receiver.endpoint) as app, \
            AsyncRerankClient(target(app)) as client:
        runner.gate.clear()  # the model holds the first call's batch while two more calls queue
        first = asyncio.create_task(client.rerank("first", ["a"]))
        await asyncio.to_thread(runner.entered.wait, 5)
        queued = [asyncio.create_task(client.rerank(f"query {n}", ["b", "c"])) for n in range(2)]
        await eventually(lambda: app.batcher is not None and app.batcher.queued_docs == 4)
        runner.gate.set()
        await asyncio.gather(first, *queued)
    spans = receiver.spans()
    scores = {s.span_id: s for s in by_name(spans, "rerank.score")}
    batches = sorted(by_name(spans, "rerank.batch"), key=lambda b: b.start_ns)
    assert [(b.attributes["rerank.batch.rows"], b.attributes["rerank.batch.requests"]) for b in batches] == [
        (1, 1), (4, 2)]
    together = [scores[span] for _, span in batches[1].links]
    assert sorted(s.attributes["rerank.documents"] for s in together) == [2, 2]
    assert len({s.trace_id for s in together}) == 2  # two calls, two traces, one batch span


@pytest.mark.parametrize(("flag", "env", "on"), [
    (None, {}, False),  # off by default
    ("http://c:4317", {}, True),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
    (None, {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
    ("http://c:4317", {"OTEL_TRACES_EXPORTER": "none"}, True),  # the flag is the operator's explicit ask
    ("http://c:4317", {"OTEL_SDK_DISABLED": "true"}, False),  # but the SDK, disabled, would record nothing
    (None, {"OTEL_SERVICE_NAME": "x"}, False),  # naming the service asks for nothing
])
def test_what_turns_tracing_on(flag: str | None, env: dict[str, str], on: bool) -> None:
    assert (tracing.Settings.read(flag, env=env) is not None) is on


@pytest.mark.parametrize("env", [{"OTEL_TRACES_EXPORTER": "zipkin"}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
                                 {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}])
def test_what_it_cannot_do_stops_the_start_saying_so(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match="not supported"):
        App(ServeConfig(model="fake", otlp_endpoint="http://127.0.0.1:1"), load_runner=FakeRunner)


def test_the_gateway_refuses_them_before_waiting_for_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    started = time.monotonic()
    assert cli.main(["gateway", "--backend", "127.0.0.1:1", "--http-port", "0", "--connect-timeout-s", "30",
                     "--db", str(tmp_path / "ledger.sqlite3")]) == 2
    assert time.monotonic() - started < 10 and "OTEL_TRACES_EXPORTER='zipkin' is not supported" in caplog.text


def test_the_flags_are_in_both_commands_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "gateway"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--otlp-endpoint URL" in text and "--trace-text" in text and "OTEL_EXPORTER_OTLP_ENDPOINT" in text


OFF_PROBE = """
import asyncio, sys
from service import tracing
from tests.serving import running_app
from clients import AsyncRerankClient

async def main():
    async with running_app() as app:
        async with AsyncRerankClient(f"127.0.0.1:{app.grpc.port}") as client:
            await client.rerank("q", ["a", "b"])
        assert app.batcher is not None and app.batcher.on_batch == app.metrics.on_batch
        assert tracing.span("x") is tracing.span("y") and tracing.current() is None and tracing.watch() is None
    from opentelemetry import trace  # (FastAPI imports the API: its own telemetry, off without a provider)
    print(tracing.enabled(), type(trace.get_tracer_provider()).__name__,
          sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))

asyncio.run(main())
"""


@pytest.mark.slow  # a fresh interpreter: what a server without tracing imports
def test_with_tracing_off_nothing_is_set_up() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RERANK_"))}
    done = subprocess.run([sys.executable, "-c", OFF_PROBE], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    # off, no provider set anywhere, and neither the SDK nor an exporter imported
    assert done.stdout.split() == ["False", "ProxyTracerProvider", "[]"]


def wait_http_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text())


@pytest.mark.slow  # two real processes: rerank serve (the tiny checkpoint) behind rerank gateway
def test_one_trace_spans_gateway_backend_and_batch(tmp_path: Path, tiny_model_dir: Path, receiver: Receiver) -> None:
    from bench.load.servers import ServeProcess, create_api_key, free_port, rerank_command

    db = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    key = create_api_key(db, "traced")
    env = {"OMP_NUM_THREADS": "1", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    backend = ServeProcess(str(tiny_model_dir), tmp_path / "backend.log", env=env, extra_args=[
        "--no-auth", "--data-dir", str(tmp_path), "--otlp-endpoint", receiver.endpoint])
    port, log = free_port(), tmp_path / "gateway.log"
    with backend.start():
        backend.wait_ready()
        with log.open("ab") as out:  # the flag's environment twin, RERANK_OTLP_ENDPOINT
            gateway = subprocess.Popen([*rerank_command(), "gateway", "--backend", backend.grpc_target, "--host",
                                        "127.0.0.1", "--http-port", str(port), "--db", db], stdout=out,
                                       stderr=subprocess.STDOUT, env={**os.environ, **env,
                                                                      "RERANK_OTLP_ENDPOINT": receiver.endpoint})
        try:
            wait_http_ready(f"http://127.0.0.1:{port}", gateway, log)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/rerank", timeout=60, json={
                "query": "capital of France", "documents": ["Paris", "Bananas"]},
                headers={"Authorization": f"Bearer {key}", "traceparent": traceparent(HTTP_PARENT)})
            assert r.status_code == 200, r.text
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(60) == 0, log.read_text()
        assert backend.stop() == 0, backend.log_tail()  # SIGTERM: the server flushes its spans as it stops
    spans = receiver.spans()
    gateway_spans = [s for s in spans if s.service == "rerank-gateway"]
    (call,) = [s for s in by_name(gateway_spans, "POST /v1/rerank") if s.parent_id == HTTP_PARENT]
    assert call.trace_id == TRACE_ID and call.attributes["rerank.key_id"].startswith("key_")
    (score,) = by_name(children(spans, call), "rerank.score")
    (hop,) = children(spans, score)  # the gateway's call to its backend, carried on by its traceparent
    assert (hop.name, hop.kind, hop.attributes["server.address"]) == (
        "rerank.v1.RerankService/Rerank", CLIENT, backend.grpc_target)
    (served,) = children(spans, hop)
    assert (served.service, served.name, served.kind, served.trace_id) == (
        "rerank-serve", "rerank.v1.RerankService/Rerank", SERVER, TRACE_ID)
    (backend_score,) = by_name(children(spans, served), "rerank.score")
    assert {s.name for s in children(spans, backend_score)} == {"rerank.tokenize", "rerank.queue"}
    (batch,) = [b for b in by_name(spans, "rerank.batch") if (TRACE_ID, backend_score.span_id) in b.links]
    assert batch.service == "rerank-serve" and batch.attributes["rerank.batch.rows"] == 2
    exported = b"".join(receiver.raw)
    assert key.encode() not in exported and key.removeprefix("rk_live_").encode() not in exported


@pytest.mark.slow  # the overhead benchmark still runs (seconds, not a benchmark)
def test_the_overhead_bench_runs_both_modes() -> None:
    done = subprocess.run([sys.executable, "bench/tracing.py", "--in-process", "--requests", "16", "--concurrency",
                           "2", "--rounds", "2"], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("tracing off" in line for line in lines) == 2 and sum("tracing on" in line for line in lines) == 2
    assert lines[-1].startswith("median: off") and " 0 OTLP exports" not in lines[-1]  # on did export
