"""The HTTP gateway over real HTTP: a uvicorn server on a free port, a SQLite ledger file,
the real Cohere SDK as one client, and every error a client can cause."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
from gateway_support import MODEL, LiveGateway, Options

from service.calls import Limits

LIMITS = Limits(max_documents=100, max_query_chars=2000, max_document_chars=10_000, max_request_bytes=2**20)
QUERY = "what is the capital of France?"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "France is in Europe.", "Berlin."]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(str(tmp_path_factory.mktemp("gw") / "ledger.sqlite3"), Options(limits=LIMITS)) as live:
        yield live


@pytest.fixture
def key(gw: LiveGateway) -> tuple[str, str]:
    """A fresh key per test, so each test reads only its own records."""
    return gw.create_key()


def post(gw: LiveGateway, body: Any, key: str | None = None, *, path: str = "/v1/rerank",
         headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
    sent = dict(headers or {})
    if key is not None:
        sent.setdefault("Authorization", f"Bearer {key}")
    if content is None:
        content = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    return httpx.post(gw.url + path, content=content, headers=sent, timeout=30)


# -- the Cohere SDK, unchanged ---------------------------------------------------------------
@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """The SDK's own HTTP client, passed in only so the test can close it."""
    with httpx.Client(timeout=30) as client:
        yield client


def test_cohere_v2_client(gw: LiveGateway, key: tuple[str, str], http: httpx.Client) -> None:
    client = cohere.ClientV2(api_key=key[1], base_url=gw.url, httpx_client=http)
    reply = client.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=3)
    assert len(reply.results) == 3
    scores = [r.relevance_score for r in reply.results]
    assert scores == sorted(scores, reverse=True)
    assert {r.index for r in reply.results} <= set(range(len(DOCS)))
    assert reply.meta.billed_units.search_units == 1
    assert reply.meta.billed_units.documents == len(DOCS)  # an extra field, kept by the SDK
    assert reply.meta.api_version.version == "2"
    assert reply.id and reply.meta.tokens.input_tokens > 0
    (record,) = gw.records(key[0])
    assert (record.documents, record.request_id, record.model) == (len(DOCS), reply.id, MODEL)


def test_cohere_v1_client_with_documents_and_idempotency(gw: LiveGateway, key: tuple[str, str],
                                                         http: httpx.Client) -> None:
    client = cohere.Client(api_key=key[1], base_url=gw.url, httpx_client=http)
    options = {"additional_headers": {"Idempotency-Key": "sdk-retry-1"}}
    first = client.rerank(query=QUERY, documents=DOCS, return_documents=True, request_options=options)
    again = client.rerank(query=QUERY, documents=DOCS, return_documents=True, request_options=options)
    assert [r.document.text for r in first.results] == [DOCS[r.index] for r in first.results]
    assert len(first.results) == len(DOCS) and first.meta.api_version.version == "1"
    assert again.id == first.id and again.meta.billed_units.documents == 0
    assert [r.relevance_score for r in again.results] == [r.relevance_score for r in first.results]
    assert len(gw.records(key[0])) == 1


def test_cohere_sdk_sees_http_errors(gw: LiveGateway, http: httpx.Client) -> None:
    client = cohere.ClientV2(api_key="rk_live_" + "x" * 43, base_url=gw.url, httpx_client=http)
    with pytest.raises(cohere.UnauthorizedError):
        client.rerank(model=MODEL, query="q", documents=["d"])


# -- the response --------------------------------------------------------------------------
def test_response_shape_and_ranking(gw: LiveGateway, key: tuple[str, str]) -> None:
    r = post(gw, {"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 2, "instruction": "Find capitals",
                  "truncation": "none"}, key[1])
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "results", "meta", "usage", "timings_ms"}
    assert r.headers["x-request-id"] == body["id"] and body["model"] == MODEL
    assert len(body["results"]) == 2 and all("document" not in x for x in body["results"])
    assert body["results"][0]["relevance_score"] >= body["results"][1]["relevance_score"]
    assert body["meta"]["billed_units"] == {"documents": 4, "search_units": 1}
    assert body["usage"]["documents"] == 4 and body["usage"]["prompt_tokens"] == body["meta"]["tokens"]["input_tokens"]
    assert not body["meta"]["replayed"]


@pytest.mark.parametrize("priority", [0, 999, 5.0, None])
def test_a_priority_in_range_is_taken(gw: LiveGateway, key: tuple[str, str], priority: float | None) -> None:
    r = post(gw, {"query": QUERY, "documents": DOCS, "priority": priority}, key[1], path="/v2/rerank")
    assert r.status_code == 200, r.text
    schema = httpx.get(gw.url + "/openapi.json", timeout=30).json()["components"]["schemas"]["RerankRequest"]
    assert {"type": "integer", "minimum": 0, "maximum": 999}.items() <= schema["properties"]["priority"][
        "anyOf"][0].items()


def test_same_call_on_both_routes_scores_the_same(gw: LiveGateway, key: tuple[str, str]) -> None:
    v1 = post(gw, {"query": QUERY, "documents": DOCS}, key[1]).json()
    v2 = post(gw, {"query": QUERY, "documents": DOCS}, key[1], path="/v2/rerank").json()
    assert v1["results"] == v2["results"]
    assert len(gw.records(key[0])) == 2


# -- errors: what a client can send ends as a 4xx with a detail, billed nothing ---------------
NASTY: list[tuple[str, bytes, int]] = [
    ("invalid JSON", b'{"query": "q", "documents": [', 400),
    ("invalid UTF-8", b'{"query": "q\xff", "documents": ["d"]}', 400),
    ("lone surrogate escape in query", b'{"query": "\\ud800", "documents": ["d"]}', 400),
    ("lone surrogate escape in a document", b'{"query": "q", "documents": ["ok", "x\\udfffy"]}', 400),
    ("lone surrogate escape in instruction", b'{"query": "q", "documents": ["d"], "instruction": "\\udbff"}', 400),
    ("lone surrogate escape in a key", b'{"query": "q", "documents": ["d"], "\\ud800": 1}', 422),
    ("surrogate as raw bytes (CESU-8)", b'{"query": "\xed\xa0\x80", "documents": ["d"]}', 400),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400),
    ("documents is a string", b'{"query": "q", "documents": "d"}', 422),
    ("a document is a number", b'{"query": "q", "documents": ["d", 1]}', 422),
    ("an object document without text", b'{"query": "q", "documents": [{"title": "d"}]}', 422),
    ("an object document of a number", b'{"query": "q", "documents": [{"text": 1}]}', 422),
    ("max_tokens_per_doc is 0", b'{"query": "q", "documents": ["d"], "max_tokens_per_doc": 0}', 400),
    ("max_tokens_per_doc over int32", b'{"query": "q", "documents": ["d"], "max_tokens_per_doc": 2147483648}', 400),
    ("max_chunks_per_doc is 0", b'{"query": "q", "documents": ["d"], "max_chunks_per_doc": 0}', 400),
    ("max_chunks_per_doc is negative", b'{"query": "q", "documents": ["d"], "max_chunks_per_doc": -1}', 400),
    ("max_chunks_per_doc is a string", b'{"query": "q", "documents": ["d"], "max_chunks_per_doc": "2"}', 422),
    ("max_chunks_per_doc is a bool", b'{"query": "q", "documents": ["d"], "max_chunks_per_doc": true}', 422),
    ("top_n is a string", b'{"query": "q", "documents": ["d"], "top_n": "1"}', 422),
    ("top_n is a bool", b'{"query": "q", "documents": ["d"], "top_n": true}', 422),
    ("top_n is a float", b'{"query": "q", "documents": ["d"], "top_n": 1.5}', 422),
    ("top_n is huge", b'{"query": "q", "documents": ["d"], "top_n": 1e400}', 422),
    ("return_documents is a string", b'{"query": "q", "documents": ["d"], "return_documents": "yes"}', 422),
    ("query is null", b'{"query": null, "documents": ["d"]}', 422),
    ("query is missing", b'{"documents": ["d"]}', 422),
    ("unknown truncation", b'{"query": "q", "documents": ["d"], "truncation": "START"}', 422),
    ("unknown field", b'{"query": "q", "documents": ["d"], "max_chunks": 3}', 422),
    ("body is a list", b'[]', 422),
    ("body is a string", b'"q"', 422),
    ("body is null", b"null", 422),
    ("body is empty", b"", 422),
    ("no documents", b'{"query": "q", "documents": []}', 400),
    ("blank query", b'{"query": " \\t\\u3000", "documents": ["d"]}', 400),
    ("negative top_n", b'{"query": "q", "documents": ["d"], "top_n": -1}', 400),
    ("query over the limit", json.dumps({"query": "q" * 2001, "documents": ["d"]}).encode(), 400),
    ("10k documents", json.dumps({"query": "q", "documents": ["d"] * 10_000}).encode(), 400),
    ("unknown model", b'{"model": "rerank-v3.5", "query": "q", "documents": ["d"]}', 404),
    ("priority is a string", b'{"query": "q", "documents": ["d"], "priority": "1"}', 400),
    ("priority is a float", b'{"query": "q", "documents": ["d"], "priority": 1.5}', 400),
    ("priority is a bool", b'{"query": "q", "documents": ["d"], "priority": true}', 400),
    ("priority is huge", b'{"query": "q", "documents": ["d"], "priority": 1e400}', 400),
    ("priority over the range", b'{"query": "q", "documents": ["d"], "priority": 1000}', 400),
    ("priority negative", b'{"query": "q", "documents": ["d"], "priority": -1}', 400),
    ("body over the byte limit", b'{"query": "' + b"q" * (2**20 + 10) + b'", "documents": ["d"]}', 413),
]


@pytest.mark.parametrize(("content", "status"), [pytest.param(c, s, id=n) for n, c, s in NASTY])
def test_nasty_bodies_are_4xx_with_detail_and_unbilled(gw: LiveGateway, key: tuple[str, str], content: bytes,
                                                       status: int) -> None:
    r = post(gw, None, key[1], content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    if b'"priority"' in content:
        assert "priority must be an integer from 0 to 999" in r.json()["detail"]  # names the field
    assert gw.records(key[0]) == []


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None, "text/plain"])
def test_the_documented_curl_call_works_whatever_its_content_type(
        gw: LiveGateway, key: tuple[str, str], content_type: str | None) -> None:
    """DEVELOPERS.md's call is `curl URL -H "Authorization: Bearer $KEY" -d '{...}'`, and
    `curl -d` sends application/x-www-form-urlencoded: the body is JSON all the same."""
    body = b'{"model":"tiny-reranker","query":"capital of France","documents":["Paris is the capital of France.",' \
           b'"Bananas are yellow."]}'
    headers = {"Authorization": f"Bearer {key[1]}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = httpx.post(gw.url + "/v1/rerank", content=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1]
    assert len(gw.records(key[0])) == 1


def test_form_body_that_is_not_json_is_a_clear_400(gw: LiveGateway, key: tuple[str, str]) -> None:
    r = httpx.post(gw.url + "/v1/rerank", content=b"query=q&documents=d", timeout=30,
                   headers={"Authorization": f"Bearer {key[1]}",
                            "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    assert gw.records(key[0]) == []


def test_chunked_body_over_the_limit_is_413(gw: LiveGateway, key: tuple[str, str]) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"query": "q", "documents": ["'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"]}'

    r = httpx.post(gw.url + "/v1/rerank", content=chunks(), timeout=30,
                   headers={"Authorization": f"Bearer {key[1]}", "Content-Type": "application/json"})
    assert r.status_code == 413 and gw.records(key[0]) == []


def test_unknown_route_and_method_are_json_errors(gw: LiveGateway) -> None:
    assert httpx.get(gw.url + "/v1/nothing").json() == {"detail": "Not Found"}
    r = httpx.get(gw.url + "/v1/rerank")
    assert r.status_code == 405 and "detail" in r.json()


# -- auth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer nope",
                                           "Bearer rk_live_" + "A" * 43])
def test_missing_or_unknown_key_is_401_with_www_authenticate(gw: LiveGateway, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = post(gw, {"query": "q", "documents": ["d"]}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["detail"]


def test_revoked_key_is_403_and_unbilled(gw: LiveGateway, key: tuple[str, str]) -> None:
    assert post(gw, {"query": "q", "documents": ["d"]}, key[1]).status_code == 200
    gw.call(gw.keys.revoke(key[0]))
    r = post(gw, {"query": "q", "documents": ["d"]}, key[1])
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    assert len(gw.records(key[0])) == 1


def test_key_scoped_to_another_model_is_403(gw: LiveGateway) -> None:
    key_id, key = gw.create_key(models=["some-other-model"])
    r = post(gw, {"query": "q", "documents": ["d"]}, key)
    assert r.status_code == 403 and "may not call" in r.json()["detail"]
    assert gw.records(key_id) == []


# -- idempotency -------------------------------------------------------------------------------
def test_idempotency_key_replays_unbilled_and_refuses_another_body(gw: LiveGateway, key: tuple[str, str]) -> None:
    headers = {"Idempotency-Key": "invoice-7"}
    first = post(gw, {"query": QUERY, "documents": DOCS}, key[1], headers=headers)
    again = post(gw, {"query": QUERY, "documents": DOCS}, key[1], headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.json()["results"] == first.json()["results"] and again.json()["id"] == first.json()["id"]
    assert again.json()["meta"]["billed_units"] == {"documents": 0, "search_units": 0}
    other = post(gw, {"query": QUERY, "documents": DOCS[:2]}, key[1], headers=headers)
    assert other.status_code == 422 and "idempotency key" in other.json()["detail"]
    bad = post(gw, {"query": QUERY, "documents": DOCS}, key[1], headers={"Idempotency-Key": "x" * 256})
    assert bad.status_code == 400
    assert [r.documents for r in gw.records(key[0])] == [len(DOCS)]


async def test_concurrent_http_calls_bill_exactly_once_each(gw: LiveGateway, key: tuple[str, str]) -> None:
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2
    gw.runner.entered.clear()
    gw.runner.gate.clear()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key[1]}"}) as client:
        calls = [asyncio.ensure_future(client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:1] * n}))
                 for n in sizes]
        dups = [asyncio.ensure_future(client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS},
                                                  headers={"Idempotency-Key": "dup"})) for _ in range(5)]
        await asyncio.to_thread(gw.runner.entered.wait, 10)
        gw.runner.gate.set()
        replies = await asyncio.gather(*calls, *dups)
    assert [r.status_code for r in replies] == [200] * len(replies)
    records = gw.records(key[0])
    assert len(records) == len(sizes) + 1
    assert sum(r.documents for r in records) == sum(sizes) + len(DOCS)
    assert len({r.json()["id"] for r in replies[len(sizes):]}) == 1


# -- limits ------------------------------------------------------------------------------------
def test_rate_limited_is_prompt_429_with_retry_after(gw: LiveGateway) -> None:
    key_id, key = gw.create_key(rate_limit_rps=1)
    assert post(gw, {"query": "q", "documents": ["d"]}, key).status_code == 200
    r = post(gw, {"query": "q", "documents": ["d"]}, key)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.elapsed.total_seconds() < 1  # refused at once, not queued
    assert len(gw.records(key_id)) == 1


def test_over_quota_is_429(gw: LiveGateway) -> None:
    key_id, key = gw.create_key(quota_documents=5)
    assert post(gw, {"query": "q", "documents": ["d"] * 4}, key).status_code == 200
    r = post(gw, {"query": "q", "documents": ["d"] * 2}, key)
    assert r.status_code == 429 and "quota" in r.json()["detail"]
    assert [x.documents for x in gw.records(key_id)] == [4]


def test_overload_is_429_with_retry_after(tmp_path: Path) -> None:
    with LiveGateway(str(tmp_path / "l.sqlite3"), Options(auth=False, max_queued_docs=4)) as gw:
        gw.runner.gate.clear()
        held = gw.submit(asyncio.to_thread(post, gw, {"query": "q", "documents": ["a", "b", "c"]}))
        gw.runner.entered.wait(10)
        busy = post(gw, {"query": "q", "documents": ["a", "b", "c", "d", "e"]})
        gw.runner.gate.set()
        assert held.result(30).status_code == 200
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        assert len(gw.records()) == 1


def test_not_ready_is_503_on_ready_and_rerank(gw: LiveGateway, key: tuple[str, str]) -> None:
    assert httpx.get(gw.url + "/ready").status_code == 200
    gw.ready = False
    try:
        assert httpx.get(gw.url + "/ready").status_code == 503
        r = post(gw, {"query": "q", "documents": ["d"]}, key[1])
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    finally:
        gw.ready = True
    assert gw.records(key[0]) == []


def test_ledger_down_is_503_and_unbilled(tmp_path: Path) -> None:
    from sqlalchemy import text

    async def drop() -> None:
        async with gw.engine.begin() as conn:
            await conn.execute(text("DROP TABLE usage_records"))

    with LiveGateway(str(tmp_path / "l.sqlite3")) as gw:
        _, key = gw.create_key()
        gw.call(drop())
        r = post(gw, {"query": "q", "documents": ["d"]}, key)
        assert r.status_code == 503 and "nothing was billed" in r.json()["detail"]


def test_auth_off_serves_and_bills_anonymous(tmp_path: Path) -> None:
    with LiveGateway(str(tmp_path / "l.sqlite3"), Options(auth=False)) as gw:
        assert post(gw, {"query": "q", "documents": ["d", "e"]}).status_code == 200
        assert post(gw, {"query": "q", "documents": ["d"]}, "anything").status_code == 200
        assert [(r.key_id, r.documents) for r in gw.records()] == [("anonymous", 2), ("anonymous", 1)]


# -- usage, models, health, metrics, OpenAPI ---------------------------------------------------
def test_usage_is_the_callers_own(gw: LiveGateway, key: tuple[str, str]) -> None:
    _, other = gw.create_key("other")
    for n in (2, 3):
        post(gw, {"query": "q", "documents": ["d"] * n}, key[1])
    post(gw, {"query": "q", "documents": ["d"] * 7}, other)
    body = httpx.get(gw.url + "/v1/usage", headers={"Authorization": f"Bearer {key[1]}"}).json()
    today = datetime.now(UTC).date().isoformat()
    assert body["key_id"] == key[0] and body["total"]["requests"] == 2 and body["total"]["documents"] == 5
    assert [(d["date"], d["documents"]) for d in body["days"]] == [(today, 5)]
    later = httpx.get(gw.url + "/v1/usage", params={"since": "2999-01-01"},
                      headers={"Authorization": f"Bearer {key[1]}"}).json()
    assert later["days"] == [] and later["total"]["documents"] == 0
    assert httpx.get(gw.url + "/v1/usage").status_code == 401
    assert httpx.get(gw.url + "/v1/usage", params={"since": "yesterday"},
                     headers={"Authorization": f"Bearer {key[1]}"}).status_code == 422


def test_models_health_metrics(gw: LiveGateway) -> None:
    (card,) = httpx.get(gw.url + "/v1/models").json()["data"]
    assert card["id"] == MODEL and card["limits"]["max_documents"] == LIMITS.max_documents
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'rerank_requests_total{code="200",method="POST /v1/rerank"}' in metrics


def test_openapi_publishes_what_is_accepted(gw: LiveGateway) -> None:
    from service.http.schema import RerankRequest

    doc = httpx.get(gw.url + "/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank", "/v1/models", "/v1/usage", "/health", "/ready", "/metrics"} <= set(doc["paths"])
    schema = doc["components"]["schemas"]["RerankRequest"]
    assert set(schema["properties"]) == set(RerankRequest.model_fields) and schema["additionalProperties"] is False
    assert schema["required"] == ["query", "documents"]
    assert schema["properties"]["documents"]["maxItems"] == LIMITS.max_documents
    assert schema["properties"]["query"]["maxLength"] == LIMITS.max_query_chars
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    params = {p["name"] for p in doc["paths"]["/v1/rerank"]["post"]["parameters"]}
    assert params == {"Idempotency-Key"}


async def test_client_that_goes_away_mid_scoring_is_not_billed(gw: LiveGateway, key: tuple[str, str]) -> None:
    def dropped() -> float:
        metrics = httpx.get(gw.url + "/metrics").text
        line = [x for x in metrics.splitlines() if x.startswith('rerank_requests_total{code="499"')]
        return float(line[0].split()[-1]) if line else 0.0

    before = dropped()
    gw.runner.entered.clear()
    gw.runner.gate.clear()
    async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key[1]}"}) as client:
        call = asyncio.ensure_future(client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}))
        await asyncio.to_thread(gw.runner.entered.wait, 10)  # in the model, held there
        call.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await call
    for _ in range(500):  # until the server has seen the disconnect and cancelled the call
        if dropped() > before:
            break
        await asyncio.sleep(0.01)
    gw.runner.gate.set()
    assert dropped() == before + 1
    assert post(gw, {"query": "q", "documents": ["c"]}, key[1]).status_code == 200
    assert [r.documents for r in gw.records(key[0])] == [1]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_every_rerank_path_writes_an_access_line(gw: LiveGateway, key: tuple[str, str], path: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rerank.access"):
        reply = post(gw, {"model": MODEL, "query": QUERY, "documents": DOCS}, key[1], path=path)
        assert reply.status_code == 200
        wanted = f"http=POST {path} status=200"
        for _ in range(200):  # the line is written as the reply's last byte leaves: wait for it, briefly
            lines = [r.getMessage() for r in caplog.records if r.name == "rerank.access"]
            if any(wanted in line for line in lines):
                break
            time.sleep(0.01)
    (line,) = [line for line in lines if wanted in line]
    assert f"request_id={reply.headers['X-Request-Id']} documents={len(DOCS)}" in line
