"""``--log-format json``: one JSON object per line, the access log's fields as keys, the current
trace's ids; the text format's access line unchanged."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from rerank.v1 import rerank_pb2 as pb
from rerank.v1 import rerank_pb2_grpc as pb_grpc

from service import cli
from service.logs import ACCESS, JsonFormatter, LogFormat, key_values, use, write_access


@pytest.fixture()
def json_access() -> Iterator[io.StringIO]:
    """What ``rerank.access`` writes, formatted as ``--log-format json`` writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rerank.access")
    logger.addHandler(handler)
    # an earlier test's dictConfig (uvicorn's) may have disabled the loggers that existed then
    level, disabled, logger.disabled = logger.level, logger.disabled, False
    logger.setLevel(logging.INFO)  # (setLevel, not an assignment: it clears the level cache)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize(("fields", "text"), [
    # the text access lines as they were before the fields were built at their source
    ({"rpc": "Rerank", "code": "OK", "ms": 12.345, "peer": "ipv4:127.0.0.1:5", "request_id": "r-1", "queries": 1,
      "documents": 2, "prompt_tokens": 30, "computed_tokens": 28, "replayed": False},
     "rpc=Rerank code=OK ms=12.3 peer=ipv4:127.0.0.1:5 request_id=r-1 queries=1 documents=2 prompt_tokens=30 "
     "computed_tokens=28 replayed=False"),
    ({"rpc": "Rerank", "code": "INVALID_ARGUMENT", "peer": "p", "error": "no queries: send one"},
     "rpc=Rerank code=INVALID_ARGUMENT peer=p message='no queries: send one'"),
    ({"http": "POST /rerank", "status": 200, "ms": 3.0, "peer": "127.0.0.1:9", "replayed": True},
     "http=POST /rerank status=200 ms=3.0 peer=127.0.0.1:9 replayed=True"),
])
def test_the_text_access_line_is_made_from_the_fields(fields: dict[str, str | int | float | bool], text: str) -> None:
    assert key_values(fields) == text


def test_an_access_line_in_json_carries_its_fields_as_keys(json_access: io.StringIO) -> None:
    write_access({"http": "POST /v1/rerank", "status": 200, "ms": 4.2, "peer": "127.0.0.1:1", "documents": 3,
                  "replayed": False, "error": "x"})
    (line,) = lines(json_access)
    assert {k: line[k] for k in ("level", "logger", "http", "status", "ms", "documents", "replayed", "error")} == {
        "level": "INFO", "logger": "rerank.access", "http": "POST /v1/rerank", "status": 200, "ms": 4.2,
        "documents": 3, "replayed": False, "error": "x"}
    assert line["message"] == "http=POST /v1/rerank status=200 ms=4.2 peer=127.0.0.1:1 documents=3 replayed=False " \
                              "message='x'"
    assert str(line["timestamp"]).endswith("+00:00") and "trace_id" not in line and "span_id" not in line


def test_a_field_never_overwrites_the_lines_own_keys() -> None:
    record = logging.LogRecord("rerank.access", logging.INFO, __file__, 1, "hello", None, None)
    setattr(record, ACCESS, {"message": "forged", "level": "DEBUG", "documents": 1})
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["level"], line["documents"]) == ("hello", "INFO", 1)


def test_lines_written_inside_a_span_carry_its_ids(json_access: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        write_access({"rpc": "Rerank", "code": "OK"})
        with tracer.start_as_current_span("child") as child:
            logging.getLogger("rerank.access").warning("inside the child")
    write_access({"rpc": "Rerank", "code": "OK"})  # no span current any more
    inside, in_child, outside = lines(json_access)
    context, child_context = span.get_span_context(), child.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert (in_child["trace_id"], in_child["span_id"]) == (f"{context.trace_id:032x}",
                                                           f"{child_context.span_id:016x}")
    assert "trace_id" not in outside and "span_id" not in outside


def test_an_exception_is_one_json_line_with_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("rerank", logging.ERROR, __file__, 1, "failed", None, None)
        import sys
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exception"]


def test_use_switches_the_root_handlers_and_text_leaves_them_alone() -> None:
    handler = logging.StreamHandler(io.StringIO())
    original = logging.Formatter("%(message)s")
    handler.setFormatter(original)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        use(LogFormat.TEXT)
        assert handler.formatter is original
        use(LogFormat.JSON)
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_both_servers_take_the_log_format_from_the_flag_or_the_environment(command: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.build_parser().parse_args([command]).log_format is LogFormat.TEXT
    assert cli.build_parser().parse_args([command, "--log-format", "json"]).log_format is LogFormat.JSON
    monkeypatch.setenv("RERANK_LOG_FORMAT", "json")
    assert cli.build_parser().parse_args([command]).log_format is LogFormat.JSON
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--log-format", "xml"])


@pytest.mark.slow
def test_rerank_serve_writes_only_json_lines_with_an_access_line_per_call(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    from observe_support import serving

    body = {"model": "tiny", "query": "capital of France", "documents": ["Paris", "Bananas"]}
    with serving(tiny_model_dir, tmp_path, "--log-format", "json", "--model-name", "tiny") as (server, target, url):
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            assert httpx.post(url + path, json=body, timeout=30).status_code == 200
        with grpc.insecure_channel(target) as channel:
            request = pb.RerankRequest(model="tiny", query="q", documents=["a"], request_id="r-json")
            pb_grpc.RerankServiceStub(channel).Rerank(request, timeout=30)
        server.wait_for(r'"rpc": "Rerank"')
        written = [json.loads(line) for line in server.drain()]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in written)
    access = [line for line in written if line["logger"] == "rerank.access"]
    assert [line.get("http") for line in access[:3]] == ["POST /v1/rerank", "POST /rerank", "POST /v2/rerank"]
    assert all(line["status"] == 200 and line["documents"] == 2 and "request_id" in line for line in access[:3])
    (rpc,) = [line for line in access if "rpc" in line]
    assert (rpc["code"], rpc["request_id"], rpc["documents"], rpc["replayed"]) == ("OK", "r-json", 1, False)
