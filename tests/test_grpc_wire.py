"""``service.grpc.wire``: the pure mapping between rerank.v1 messages and the core's values."""

from __future__ import annotations

import pytest
from rerank.v1 import rerank_pb2 as pb

from clients import client
from service.calls import PromptOptions, QueryOutcome, RankedDoc, RerankQuery, RerankReply, Timings
from service.errors import Code, ServiceError
from service.grpc import wire
from worker.types import Truncation


@pytest.mark.parametrize(("metadata", "key"), [
    (None, None),
    ([], None),
    ([("x-other", "1")], None),
    ([("authorization", "Bearer sk-1")], "sk-1"),
    ([("authorization", "bearer   sk-2  ")], "sk-2"),
    ([("Authorization", "Bearer sk-3")], "sk-3"),
    ([("authorization-bin", b"\x00")], None),
])
def test_bearer_key(metadata: list[tuple[str, str | bytes]] | None, key: str | None) -> None:
    assert wire.bearer_key(metadata) == key


@pytest.mark.parametrize(("header", "says"), [
    ("Basic dXNlcg==", "'Basic' scheme"),
    ("rk_live_barekey", "no scheme"),
    ("Bearer", "carries no key"),
    ("Bearer   ", "carries no key"),
    ("Bearer a b", "more than one value"),
    ("\u00e9t\u00e9 x", "'another' scheme"),  # never echoes non-ASCII or long text
])
def test_anything_but_bearer_is_refused_saying_why(header: str, says: str) -> None:
    with pytest.raises(ServiceError) as err:
        wire.bearer_key([("authorization", header)])
    assert err.value.code is Code.UNAUTHENTICATED
    assert says in err.value.message


@pytest.mark.parametrize(("truncation", "expected"), [
    (pb.TRUNCATION_UNSPECIFIED, Truncation.END), (pb.TRUNCATION_END, Truncation.END),
    (pb.TRUNCATION_NONE, Truncation.NONE),
])
def test_truncation(truncation: pb.Truncation.ValueType, expected: Truncation) -> None:
    call = wire.call_from_request(pb.RerankRequest(query="q", documents=["d"], truncation=truncation), None)
    assert call.queries[0].options.truncation is expected


def test_empty_fields_mean_absent_and_the_request_id_is_the_idempotency_key() -> None:
    bare = wire.call_from_request(pb.RerankRequest(query="q", documents=["a", "b"]), None)
    assert (bare.model, bare.request_id, bare.idempotency_key) == (None, None, None)
    assert (bare.queries[0].instruction, bare.queries[0].top_n) == (None, None)
    full = wire.call_from_request(pb.RerankRequest(model="m", query="q", documents=["a"], instruction="",
                                                   top_n=3, return_documents=True, request_id="r1"),
                                  [("authorization", "Bearer sk"), ("x-rerank-on-behalf-of", "key_a")])
    assert (full.model, full.request_id, full.idempotency_key, full.api_key) == ("m", "r1", "r1", "sk")
    assert (bare.on_behalf_of, full.on_behalf_of) == (None, "key_a")
    assert full.queries[0].instruction == ""  # set but empty is not the default instruction
    assert (full.queries[0].top_n, full.queries[0].return_documents) == (3, True)


@pytest.mark.parametrize("options", [PromptOptions(), PromptOptions(max_chunks=2),
                                     PromptOptions(Truncation.NONE, max_document_tokens=7, max_chunks=3)])
def test_a_query_goes_to_a_backend_as_the_client_sent_it_and_comes_back_whole(options: PromptOptions) -> None:
    """The gateway's engine asks a backend with ``wire.request_to_score``: the message the
    client's ``rerank`` built for it before (no top_n, no text, no request id), and read back
    by the backend as the same query's scoring part, its prompt options unchanged."""
    query = RerankQuery("q", ["a", "b"], instruction="i", options=options, top_n=1, return_documents=True)
    sent = wire.request_to_score(query, 7)
    assert sent.SerializeToString() == client._rerank_request(
        "q", ["a", "b"], instruction="i", top_n=None, return_documents=False,
        truncate=options.truncation is Truncation.END, model=None, request_id=None,
        max_tokens_per_doc=options.max_document_tokens, priority=7, idempotent=False,
        max_chunks_per_doc=options.max_chunks).SerializeToString()
    back = wire.call_from_request(pb.RerankRequest.FromString(sent.SerializeToString()), None)
    assert back.queries == [RerankQuery("q", ["a", "b"], instruction="i", options=options)]
    assert back.priority == 7 and back.request_id is None


def test_an_unknown_truncation_number_is_refused() -> None:
    with pytest.raises(ServiceError) as err:
        wire.call_from_request(pb.RerankRequest(query="q", documents=["d"], truncation=9), None)  # type: ignore[arg-type]
    assert err.value.code.grpc_status == "INVALID_ARGUMENT"


def test_batch_reply_keeps_query_order_and_sums_usage() -> None:
    outcomes = [QueryOutcome([RankedDoc(1, 0.9, 2.2, False, "b"), RankedDoc(0, 0.1, -2.2, True)], 2, 40, 30),
                QueryOutcome([RankedDoc(0, 0.5, 0.0, False)], 1, 20, 20)]
    reply = RerankReply("r", "m", outcomes, Timings(total=5.0, engine=4.0), replayed=True)
    msg = wire.batch_response_from_reply(reply)
    assert [[r.index for r in q.results] for q in msg.queries] == [[1, 0], [0]]
    assert msg.queries[0].results[0].document == "b" and not msg.queries[0].results[1].HasField("document")
    assert (msg.usage.documents, msg.usage.prompt_tokens, msg.usage.computed_tokens) == (3, 60, 50)
    assert (msg.timing.total_ms, msg.timing.engine_ms, msg.replayed) == (5.0, 4.0, True)


def test_priority_absent_is_none_and_zero_is_a_value() -> None:
    assert wire.call_from_request(pb.RerankRequest(query="q", documents=["d"]), None).priority is None
    assert wire.call_from_request(pb.RerankRequest(query="q", documents=["d"], priority=0), None).priority == 0
    batch = pb.RerankBatchRequest(queries=[pb.BatchQuery(query="q", documents=["d"])], priority=7)
    assert wire.call_from_batch(batch, None).priority == 7
    assert wire.call_from_batch(pb.RerankBatchRequest(), None).priority is None


def test_warnings_reach_both_responses() -> None:
    reply = RerankReply("r", "m", [QueryOutcome([], 1, 2, 2)], warnings=["priority clamped to 5"])
    assert list(wire.response_from_reply(reply).warnings) == ["priority clamped to 5"]
    assert list(wire.batch_response_from_reply(reply).warnings) == ["priority clamped to 5"]
