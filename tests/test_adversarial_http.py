"""The HTTP edge under hostile traffic, at the socket level: what an unauthenticated caller
and a key holder can send, and what it may cost the server.

Every test asserts the three promises of docs/SECURITY.md: no 5xx but a documented 503 with
Retry-After, nothing billed for refused calls, and no growth (of /metrics, of memory) that
depends on what clients send. The limits are set small here so each is reached in
milliseconds; each test names the flag it proves.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import socket
import string
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from gateway_support import LiveGateway, Options

from service.calls import Limits, RerankCall, RerankQuery
from service.edge import EdgeLimits
from service.http.app import create_app
from service.lograte import FloodFilter

LIMITS = Limits(max_documents=100, max_request_bytes=2**20)
EDGE = EdgeLimits(max_connections=40, header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=0.5,
                  max_header_bytes=8192, max_body_bytes_in_flight=3 * 2**19)  # 1.5 MiB: one full body and a half
BODY = json.dumps({"query": "q", "documents": ["a", "b"]}).encode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    options = Options(limits=LIMITS, edge=EDGE)
    with LiveGateway(str(tmp_path_factory.mktemp("adv") / "ledger.sqlite3"), options) as live:
        yield live


@pytest.fixture
def key(gw: LiveGateway) -> Iterator[str]:
    """A fresh key; the test must leave it unbilled unless it says otherwise."""
    key_id, secret = gw.create_key()
    yield secret
    assert gw.records(key_id) == [], "a refused call was billed"


# -- a raw HTTP/1.1 client -------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, str]:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return dict(json.loads(self.body))

    def assert_clean(self) -> None:
        """A 4xx with a JSON detail, or a 503 that says when to retry: never another 5xx."""
        assert self.status < 500 or (self.status == 503 and "retry-after" in self.headers), self
        if self.status >= 400:
            assert self.json()["detail"], self


def connect(gw: LiveGateway) -> socket.socket:
    port = int(gw.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_reply(sock: socket.socket, timeout_s: float = 5.0) -> Reply:
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a reply: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Reply(int(lines[0].split()[1]), headers, body[:length])


def request(method: str = "POST", path: str = "/v1/rerank", *, key: str | None = None, body: bytes = b"",
            headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    sent = {"Host": "test", "Content-Length": str(len(body) if length is None else length), **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in sent.items()) + "\r\n"
    return head.encode("latin-1") + body


def exchange(gw: LiveGateway, raw: bytes, timeout_s: float = 5.0) -> Reply:
    with connect(gw) as sock:
        sock.sendall(raw)
        return read_reply(sock, timeout_s)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def metrics(gw: LiveGateway) -> str:
    reply = exchange(gw, request("GET", "/metrics"))
    assert reply.status == 200
    return reply.body.decode()


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # the gateway runs in this process, on its own thread
        return int(f.read().split()[1]) * 4096


# -- /metrics ----------------------------------------------------------------------------------
def test_metrics_size_does_not_depend_on_what_clients_send(gw: LiveGateway) -> None:
    """Unknown methods and paths are one label, ``other``; known routes are labelled by template."""
    rng = random.Random(0)
    for path in ("/v1/rerank", "/health", "/nope"):  # every label a hostile call could reach, once
        exchange(gw, request("PATCH", path))
    metrics(gw)  # and the scrape's own
    before = metrics(gw)
    seen: list[str] = []
    for i in range(300):
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.choice([3, 20, 2000])))
        path = rng.choice(["/v1/rerank", "/health", "/metrics", f"/x{i}", f"/v1/{method[:30]}"])
        seen.append(method[:30])
        exchange(gw, request(method, path)).assert_clean()
    text = metrics(gw)
    assert series(text) == series(before), "hostile methods or paths made new series"
    assert len(text) - len(before) < 1000  # counters' digits only
    assert not any(m in text for m in seen[:50])
    assert 'method="GET /metrics"' in text and 'method="other"' in text


# -- authentication before the body ------------------------------------------------------------
@pytest.mark.parametrize(("authorization", "says"), [
    (None, "missing API key"),
    ("Basic dXNlcjpwYXNz", "'Basic' scheme"),
    ("rk_live_bare", "no scheme"),
    ("Bearer", "carries no key"),
    ("Bearer rk_live_" + "A" * 43, "unknown"),
])
def test_a_caller_without_a_valid_key_is_refused_before_its_body(gw: LiveGateway, authorization: str | None,
                                                                   says: str) -> None:
    """The head announces 1 MiB and no byte of it is sent: the 401 comes anyway."""
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = exchange(gw, request(headers=headers, length=2**20), timeout_s=2)
    assert reply.status == 401 and says.lower() in reply.json()["detail"].lower(), reply
    assert reply.headers["www-authenticate"].startswith("Bearer")


def test_a_flood_of_unauthenticated_large_bodies_costs_no_memory(gw: LiveGateway) -> None:
    """200 connections announcing 16 MiB each (past --http-max-connections for some): each
    answered at once, 401 or 503, and the server's memory does not grow by their bodies."""
    rss = rss_bytes()
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(gw)) for _ in range(200)]
        for sock in socks:
            sock.sendall(request(length=16 * 2**20) + b"x" * 65536)  # a first 64 KiB of each body
        statuses = [read_reply(sock, 10).status for sock in socks]
    assert set(statuses) <= {401, 503} and statuses.count(401) >= EDGE.max_connections - 5
    assert rss_bytes() - rss < 64 * 2**20  # 200 bodies of 16 MiB would be 3.2 GiB


def test_body_bytes_in_flight_are_capped_across_connections(gw: LiveGateway, key: str) -> None:
    """--http-max-body-bytes-in-flight: a body that would take it past the cap is 429, retry."""
    with connect(gw) as first, connect(gw) as second:
        first.sendall(request(key=key, length=2**20) + b"[")  # 1 MiB reserved, held open
        time.sleep(0.1)
        second.sendall(request(key=key, length=2**20))
        reply = read_reply(second)
        assert reply.status == 429 and reply.headers["retry-after"] == "1", reply
        assert "too many request bodies" in reply.json()["detail"]
        first.close()
    assert exchange(gw, request(key=key, body=b"{}")).status == 422  # the budget came back


# -- timeouts ------------------------------------------------------------------------------------
def test_a_connection_that_sends_nothing_is_closed(gw: LiveGateway) -> None:
    """--http-header-timeout-s, from the connection's start."""
    with connect(gw) as sock:
        reply = read_reply(sock, 3)
        assert reply.status == 408 and "request head" in reply.json()["detail"]
        assert closed_by_server(sock, 1)


def test_a_slow_header_sender_is_cut_at_the_header_timeout(gw: LiveGateway) -> None:
    """A byte every 50 ms never completes the head: 408 at --http-header-timeout-s, not never."""
    started = time.monotonic()
    with connect(gw) as sock:
        sock.sendall(b"POST /v1/rerank HTTP/1.1\r\n")
        with pytest.raises(OSError):
            for _ in range(200):  # 10 s of dribbling, if nobody stops it
                sock.sendall(b"X")
                time.sleep(0.05)
                if closed_by_server(sock, 0.001):
                    raise ConnectionError("closed")
    assert time.monotonic() - started < 3


def test_a_slow_body_is_cut_at_the_body_timeout(gw: LiveGateway, key: str) -> None:
    """--http-body-timeout-s: the head came, the body stalls: 408, the reservation returned."""
    with connect(gw) as sock:
        sock.sendall(request(key=key, length=len(BODY)) + BODY[:5])
        reply = read_reply(sock, 3)
    assert reply.status == 408 and "body did not arrive" in reply.json()["detail"]


def test_an_idle_keep_alive_connection_is_closed(gw: LiveGateway) -> None:
    """--http-idle-timeout-s."""
    with connect(gw) as sock:
        sock.sendall(request("GET", "/health"))
        assert read_reply(sock).status == 200
        assert closed_by_server(sock, 3)


# -- connections --------------------------------------------------------------------------------
def test_connections_past_the_cap_get_a_json_503_and_the_cap_frees(gw: LiveGateway) -> None:
    """--http-max-connections: the connections past it are answered 503 with Retry-After."""
    extra = 5
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(gw)) for _ in range(EDGE.max_connections + extra)]
        time.sleep(0.1)  # every connection accepted before any request
        for sock in socks:
            sock.sendall(request("GET", "/health"))
        replies = [read_reply(sock) for sock in socks]
    for reply in replies:
        reply.assert_clean()
    assert [r.status for r in replies].count(503) == extra
    assert exchange(gw, request("GET", "/health")).status == 200  # closed connections no longer count


# -- server-layer errors are JSON ------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    (b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
])
def test_errors_of_the_server_layer_are_json(gw: LiveGateway, raw: bytes, status: int) -> None:
    reply = exchange(gw, raw)
    assert reply.status == status
    reply.assert_clean()


def test_malformed_requests_do_not_flood_the_log(gw: LiveGateway, caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn logs a WARNING per malformed request: at most a burst of them per interval
    reaches the log (service.lograte), whatever a caller sends."""
    flood = gw.server.log_flood
    dropped_before = flood.dropped_total
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        for _ in range(40):
            assert exchange(gw, b"NOT HTTP AT ALL\r\n\r\n").status == 400
    logged = [r for r in caplog.records if r.name == "uvicorn.error" and "Invalid HTTP request" in r.getMessage()]
    assert len(logged) <= flood.burst < 40
    assert flood.dropped_total - dropped_before == 40 - len(logged)


def test_the_flood_filter_passes_a_burst_then_counts_then_reports() -> None:
    now = [0.0]
    flood = FloodFilter(burst=3, interval_s=60, clock=lambda: now[0])
    logger = logging.getLogger("test.lograte")
    logger.propagate = False
    seen = ListHandler()
    logger.addHandler(seen)
    logger.addFilter(flood)
    try:
        for i in range(10):
            logger.warning("bad request from %s", f"peer{i}")
        logger.error("an error is never dropped")
        logger.warning("another message has its own burst")
        assert [r.getMessage()[:22] for r in seen.records] == ["bad request from peer0", "bad request from peer1",
                                                               "bad request from peer2", "an error is never drop",
                                                               "another message has it"]
        assert "more are counted, not logged" in seen.records[2].getMessage()
        now[0] = 61.0
        logger.warning("bad request from %s", "late")
        assert seen.records[-1].getMessage().startswith("bad request from late [7 more like this were not logged")
        for _ in range(5):
            logger.warning("bad request from %s", "again")
        flood.flush(logger)  # at shutdown: what was dropped since the last report
        assert "3 more 'bad request from %s' were not logged" in seen.records[-1].getMessage()
        assert flood.dropped_total == 7 + 3
    finally:
        logger.removeFilter(flood)
        logger.removeHandler(seen)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- bodies and encodings ---------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "headers", "status", "says"), [
    (BODY.decode().encode("utf-16"), {}, 400, "byte-order mark"),
    (BODY.decode().encode("utf-16-le"), {}, 400, "nul byte"),
    (BODY.decode().encode("utf-32"), {}, 400, "byte-order mark"),
    (b"\xef\xbb\xbf" + BODY, {}, 400, "byte-order mark"),
    (b'{"query": "q\xff", "documents": ["a"]}', {}, 400, "utf-8"),
    (gzip.compress(BODY), {"Content-Encoding": "gzip"}, 415, "gzip"),
    (BODY, {"Content-Encoding": "br"}, 415, "not supported"),
    (b"{" * 100_000, {}, 400, "json"),
    (b"x" * (2**20 + 1), {}, 413, "larger than"),
])
def test_bodies_not_utf8_json_are_refused_unbilled(gw: LiveGateway, key: str, body: bytes,
                                                   headers: dict[str, str], status: int, says: str) -> None:
    reply = exchange(gw, request(key=key, body=body, headers=headers))
    assert reply.status == status and says in reply.json()["detail"].lower(), reply


@pytest.mark.parametrize("method", ["PUT", "DELETE", "TRACE", "CONNECT", "PROPFIND", "get", "P\u00d6ST"])
def test_hostile_methods_are_4xx(gw: LiveGateway, key: str, method: str) -> None:
    raw = request("X", key=key, body=BODY).replace(b"X", method.encode("utf-8"), 1)
    exchange(gw, raw).assert_clean()


# -- replays --------------------------------------------------------------------------------------
def test_replays_count_against_the_rate_limit(gw: LiveGateway) -> None:
    """An idempotent replay is free of charge, not of the request rate: it costs a lookup and
    a reply, so a key at 1 rps cannot replay one call a thousand times a second."""
    key_id, secret = gw.create_key(rate_limit_rps=1)
    first = exchange(gw, request(key=secret, body=BODY, headers={"Idempotency-Key": "once"}))
    assert first.status == 200
    replays = [exchange(gw, request(key=secret, body=BODY, headers={"Idempotency-Key": "once"}))
               for _ in range(5)]
    assert [r.status for r in replays].count(429) >= 4
    for reply in replays:
        reply.assert_clean()
    assert len(gw.records(key_id)) == 1  # billed once


# -- drains ---------------------------------------------------------------------------------------
async def test_a_call_cut_at_the_end_of_the_grace_period_gets_a_json_503(caplog: pytest.LogCaptureFixture) -> None:
    """On SIGTERM, calls still running after --grace-s are cut: 503 with Retry-After, no traceback."""
    import asyncio

    import httpx

    from service.app import App, CoreParts
    from service.config import ServeConfig
    from service.http.server import HttpServer
    from worker.fake import FakeRunner

    runner = FakeRunner()
    app = App(ServeConfig(model="fake", host="127.0.0.1", grpc_port=0, http_port=0, max_wait_ms=0.0),
              load_runner=lambda: runner, core_parts=CoreParts())
    await app.start()
    await app.wait_ready()
    runner.entered.clear()  # set by the warm-up's calibration batches
    port = next(c for c in app.components if isinstance(c, HttpServer)).port
    runner.gate.clear()  # the model holds the call
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            call = asyncio.create_task(http.post("/v1/rerank", json={"query": "q", "documents": ["a"]}))
            await asyncio.to_thread(runner.entered.wait, 5)
            with caplog.at_level(logging.INFO):
                stopping = asyncio.create_task(app.stop(grace_s=1))
                reply = await call
    finally:
        runner.gate.set()
    await stopping
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert "shutting down" in reply.json()["detail"]
    assert "Exception in ASGI application" not in caplog.text and "Traceback" not in caplog.text


def count_lookups(gw: LiveGateway, monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The keys the key table is asked for from now on, in order."""
    lookups: list[str | None] = []
    authenticate = gw.keys.authenticate

    async def counted(api_key: str | None) -> object:
        lookups.append(api_key)
        return await authenticate(api_key)

    monkeypatch.setattr(gw.keys, "authenticate", counted)
    return lookups


def test_the_key_is_looked_up_once_per_call(gw: LiveGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before the body, the key is not read from the key table a second time by the core."""
    key_id, secret = gw.create_key()
    lookups = count_lookups(gw, monkeypatch)
    for _ in range(3):
        assert exchange(gw, request(key=secret, body=BODY)).status == 200
    assert lookups == [secret] * 3
    assert len(gw.records(key_id)) == 3


def test_the_http_front_leaves_the_shared_core_unchanged(gw: LiveGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gRPC front shares the core: its authenticator stays the one it was built with, and
    a gRPC-style call through it asks the key table itself (no HTTP request's check to reuse)."""
    assert gw.core.auth is gw.keys
    create_app(gw.core)  # a second front on the same core changes nothing either
    assert gw.core.auth is gw.keys
    key_id, secret = gw.create_key()
    lookups = count_lookups(gw, monkeypatch)
    gw.call(gw.core.rerank(RerankCall([RerankQuery("q", ["a"])], api_key=secret)))
    assert exchange(gw, request(key=secret, body=BODY)).status == 200
    assert lookups == [secret, secret]  # once per call, on either front
    assert len(gw.records(key_id)) == 2


def test_an_unread_body_still_arriving_after_the_reply_ends_the_connection(gw: LiveGateway) -> None:
    """A GET's body is never read; dribbled after the reply, it must not hold the connection
    past the deadlines (the keep-alive timer restarts with every byte)."""
    with connect(gw) as sock:
        sock.sendall(request("GET", "/health", length=10**6))
        assert read_reply(sock).status == 200
        with pytest.raises(OSError):
            for _ in range(100):  # 5 s of dribbling, if nobody stops it
                sock.sendall(b"x" * 10)
                time.sleep(0.05)
                if closed_by_server(sock, 0.001):
                    raise ConnectionError("closed")
