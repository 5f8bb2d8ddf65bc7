"""Fuzz the gateway from its own OpenAPI document (schemathesis), over real HTTP.

Every operation gets schema-valid and schema-violating requests, with a valid API key. The
checks: never a 5xx; status codes, content types and bodies as documented; schema-valid
requests accepted (the document is no looser than the server); and, at the end, billing:
the ledger holds exactly one record per 200 from a rerank route, with its documents.

The document is built at import by the same app factory with the same limits (schemathesis'
lazy ``from_fixture`` loader does not work with pytest 9), and a test proves it is the one
the live server publishes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from gateway_support import MODEL, LiveGateway, Options
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from service.calls import ID_PATTERN, Limits
from service.core import RerankCore
from service.http.app import create_app

LIMITS = Limits(max_documents=20, max_query_chars=200, max_instruction_chars=200, max_document_chars=500,
                max_request_bytes=64 * 1024)
BILLED: list[tuple[str, int]] = []  # (request id, documents) of every 200 on a rerank route


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveGateway, str]]:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "ledger.sqlite3"
    with LiveGateway(str(path), Options(limits=LIMITS)) as gw:
        yield gw, gw.create_key("fuzzer")[1]


DOCUMENT = create_app(RerankCore(engine=None, model_name=MODEL, limits=LIMITS)).openapi()  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_fuzzed_document_is_the_served_one(live: tuple[LiveGateway, str]) -> None:
    assert httpx.get(live[0].url + "/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_gateway_never_fails_on_what_clients_send(case: Any, live: tuple[LiveGateway, str]) -> None:
    gw, key = live
    if case.headers and ID_PATTERN.fullmatch(str(case.headers.get("Idempotency-Key", ""))):
        # a valid key, made unique: reusing one with another body is a (stateful) 422 that
        # positive_data_acceptance would misread as a valid request refused
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    response = case.call(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance, response_schema_conformance,
                                             positive_data_acceptance])
    if response.status_code == 200 and case.path.endswith("/rerank"):
        # every convention's reply says the id and whether it was a replay in its headers
        # (TEI's bare list and Voyage's shape carry no billing block)
        sent = case.body.get("documents", case.body.get("texts"))
        headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
        replayed = headers.get("idempotent-replayed") == "true"
        BILLED.append((headers["x-request-id"], 0 if replayed else len(sent)))


def test_fuzzing_billed_exactly_the_successful_calls(live: tuple[LiveGateway, str]) -> None:
    gw, _ = live
    records = gw.records()
    assert BILLED, "the fuzzer never got a call through: it tested nothing"
    assert sorted((r.request_id, r.documents) for r in records) == sorted(b for b in BILLED if b[1] > 0)
