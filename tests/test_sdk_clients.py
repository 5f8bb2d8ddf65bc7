"""The rerank clients people use, unchanged, against a real ``rerank serve`` process.

Each client sends its normal calls, with every rerank option it has, and the scores it gets
back must equal the server's own ``/v1/rerank`` scores for the same (query, document) pairs:
one scoring path, whatever the convention on the wire. The packages are the real ones, pinned
in the ``test`` extra.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
import requests
from test_serve_cli import Server

from clients import Query, RerankClient
from service.http.compat import convention
from service.http.schema import RerankRequest

MODEL = "Qwen/Qwen3-Reranker-0.6B"  # the name the docs send; the tiny model stands in for it
QUERY = "which city is the capital of France?"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "France is a country in Europe.",
        "Berlin is in Germany.", "river " * 60]
CUT_TOKENS = 12  # over the longest short document's own tokens: only DOCS[4] is cut
CUT = " ".join(["river"] * CUT_TOKENS)  # DOCS[4] cut (tests/test_prompt.py: the same ids as sending this)
# One scoring path; a call batched with other shapes (rerank_batch) sums in another order, so
# fp32 rounding differs in the 7th digit: far inside the scoring contract's 1e-5.
TOL = 1e-6


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``rerank serve`` on the tiny model: (HTTP base URL, gRPC target)."""
    server = Server(["--model", str(tiny_model_dir), "--model-name", MODEL, "--host", "127.0.0.1",
                     "--grpc-port", "0", "--http-port", "0", "--no-auth",
                     "--data-dir", str(tmp_path_factory.mktemp("sdk")), "--max-length", "256", "--grace-s", "1"])
    try:
        grpc_port = server.wait_for(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        base = server.wait_for(r"HTTP gateway listening on (http://\S+)").group(1)
        server.wait_for(r"ready: ")
        yield base, f"127.0.0.1:{grpc_port}"
    finally:
        server.proc.kill()
        server.proc.wait()
        server.reader.join(5)
        assert server.proc.stderr is not None
        server.proc.stderr.close()


@pytest.fixture(scope="module")
def url(served: tuple[str, str]) -> str:
    return served[0]


def reference(url: str, documents: Sequence[str], query: str = QUERY) -> list[dict[str, float]]:
    """The server's own scores for ``documents``, by input index: its plain /v1/rerank call."""
    r = requests.post(url + "/v1/rerank", json={"query": query, "documents": list(documents)}, timeout=30)
    r.raise_for_status()
    by_index = {x["index"]: x for x in r.json()["results"]}
    return [by_index[i] for i in range(len(documents))]


def assert_same(got: Sequence[tuple[int, float]], want: Sequence[dict[str, float]], key: str = "relevance_score",
                top_n: int | None = None) -> None:
    """``got`` (index, score) pairs, best first, are the reference's best ``top_n``."""
    ranked = sorted(range(len(want)), key=lambda i: (-want[i]["logit"], i))[:top_n]
    assert [i for i, _ in got] == ranked
    for i, score in got:
        assert score == pytest.approx(want[i][key], abs=TOL)


# -- Cohere's SDK, both clients, every option ---------------------------------------------------
@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """The SDK's own HTTP client, passed in only so the test can close it."""
    with httpx.Client(timeout=30) as client:
        yield client


def test_cohere_v1_every_option(url: str, http: httpx.Client) -> None:
    co = cohere.Client(api_key="unused", base_url=url, httpx_client=http)
    objects = [{"title": "Capitals", "text": DOCS[0]}, {"title": "Fruit", "text": DOCS[1]}, {"text": DOCS[2]}]
    r = co.rerank(model=MODEL, query=QUERY, documents=objects, top_n=2, rank_fields=["title", "text"],
                  return_documents=True, max_chunks_per_doc=3)
    ranked_as = ["title: Capitals\ntext: " + DOCS[0], "title: Fruit\ntext: " + DOCS[1], "text: " + DOCS[2]]
    assert_same([(x.index, x.relevance_score) for x in r.results], reference(url, ranked_as), top_n=2)
    assert [x.document.text for x in r.results] == [objects[x.index]["text"] for x in r.results]
    assert r.meta.warnings is None  # max_chunks_per_doc is honoured (short documents: one chunk each)
    plain = co.rerank(query=QUERY, documents=DOCS[:4] + [{"text": DOCS[4]}])
    assert_same([(x.index, x.relevance_score) for x in plain.results], reference(url, DOCS))
    assert plain.meta.warnings is None


def test_cohere_v2_every_option(url: str, http: httpx.Client) -> None:
    co = cohere.ClientV2(api_key="unused", base_url=url, httpx_client=http)
    r = co.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=3, max_tokens_per_doc=CUT_TOKENS, priority=7)
    assert_same([(x.index, x.relevance_score) for x in r.results], reference(url, [*DOCS[:4], CUT]), top_n=3)
    whole = co.rerank(model=MODEL, query=QUERY, documents=DOCS)
    assert_same([(x.index, x.relevance_score) for x in whole.results], reference(url, DOCS))
    assert whole.meta.api_version.version == "2"


async def test_cohere_async_v2(url: str) -> None:
    async with cohere.AsyncClientV2(api_key="unused", base_url=url) as co:
        r = await co.rerank(model=MODEL, query=QUERY, documents=DOCS, max_tokens_per_doc=None, priority=None)
    assert_same([(x.index, x.relevance_score) for x in r.results], reference(url, DOCS))


def test_cohere_fields_reach_the_call() -> None:
    """priority goes to the scheduler (RerankCall.priority) and is not what a retry must
    repeat; max_tokens_per_doc is part of what was asked (the idempotency fingerprint)."""
    body = {"query": QUERY, "documents": DOCS, "priority": 3, "max_tokens_per_doc": None}
    call = RerankRequest.model_validate(body).to_call(None, "k")
    assert call.priority == 3 and call.queries[0].options.max_document_tokens is None
    assert RerankRequest.model_validate({**body, "priority": 9}).to_call(None, "k").fingerprint() == call.fingerprint()
    cut = RerankRequest.model_validate({**body, "max_tokens_per_doc": 12}).to_call(None, "k")
    assert cut.queries[0].options.max_document_tokens == 12 and cut.fingerprint() != call.fingerprint()


def test_grpc_max_tokens_per_doc_scores_as_http(served: tuple[str, str]) -> None:
    url, target = served
    with RerankClient(target) as client:
        one = client.rerank(QUERY, DOCS, max_tokens_per_doc=CUT_TOKENS)
        batch = client.rerank_batch([Query(QUERY, DOCS, max_tokens_per_doc=CUT_TOKENS), Query(QUERY, DOCS)])
    cut, whole = reference(url, [*DOCS[:4], CUT]), reference(url, DOCS)
    assert_same([(r.index, r.score) for r in one.results], cut)
    assert_same([(r.index, r.score) for r in batch[0].results], cut)
    assert_same([(r.index, r.score) for r in batch[1].results], whole)
    assert [r.truncated for r in sorted(one.results, key=lambda r: r.index)] == [False] * 4 + [True]


# -- frameworks ------------------------------------------------------------------------------
def close_sdk(client: Any) -> None:
    """Close the HTTP connection pool of a Cohere SDK client a framework made for itself."""
    client._client_wrapper.httpx_client.httpx_client.close()


def test_langchain_cohere_rerank(url: str, request: pytest.FixtureRequest) -> None:
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(model=MODEL, base_url=url, cohere_api_key="unused", top_n=3)
    request.addfinalizer(lambda: close_sdk(reranker.client))
    got = reranker.rerank(DOCS, QUERY)  # sends "max_tokens_per_doc": null on every call
    assert_same([(x["index"], x["relevance_score"]) for x in got], reference(url, DOCS), top_n=3)
    cut = reranker.rerank(DOCS, QUERY, max_tokens_per_doc=CUT_TOKENS, top_n=None)
    assert_same([(x["index"], x["relevance_score"]) for x in cut], reference(url, [*DOCS[:4], CUT]))
    kept = reranker.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    want = reference(url, DOCS)
    assert [d.metadata["relevance_score"] for d in kept] == pytest.approx(
        sorted((w["relevance_score"] for w in want), reverse=True)[:3], abs=TOL)


def test_llama_index_cohere_rerank(url: str, request: pytest.FixtureRequest) -> None:
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    reranker = CohereRerank(top_n=2, model=MODEL, api_key="unused", base_url=url)
    request.addfinalizer(lambda: close_sdk(reranker._client))
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(DOCS)]
    kept = reranker.postprocess_nodes(nodes, query_str=QUERY)
    assert_same([(int(n.node.node_id), n.score or 0.0) for n in kept], reference(url, DOCS), top_n=2)


def test_litellm_rerank(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    import litellm

    r = litellm.rerank(model=f"cohere/{MODEL}", query=QUERY, documents=DOCS, top_n=3, api_base=url,
                       api_key="unused", return_documents=True)
    assert_same([(x["index"], x["relevance_score"]) for x in r.results], reference(url, DOCS), top_n=3)


# -- plain HTTP conventions -------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_jina_and_vllm_shape(url: str, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "query": QUERY, "documents": [{"text": d} for d in DOCS],
                            "top_n": 2, "return_documents": True}
    r = requests.post(url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()
    assert_same([(x["index"], x["relevance_score"]) for x in got["results"]], reference(url, DOCS), top_n=2)
    assert [x["document"]["text"] for x in got["results"]] == [DOCS[x["index"]] for x in got["results"]]
    assert got["usage"]["total_tokens"] == got["meta"]["tokens"]["input_tokens"] > 0
    strings = requests.post(url + path, json={**body, "documents": DOCS}, timeout=30).json()
    assert strings["results"] == got["results"]


@pytest.mark.parametrize("raw_scores", [False, True])
def test_tei_shape(url: str, raw_scores: bool) -> None:
    r = requests.post(url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": raw_scores,
                                             "return_text": True, "truncate": True}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()
    assert isinstance(got, list) and set(got[0]) == {"index", "score", "text"}
    assert_same([(x["index"], x["score"]) for x in got], reference(url, DOCS), "logit" if raw_scores else
                "relevance_score")
    assert [x["text"] for x in got] == [DOCS[x["index"]] for x in got]


def test_tei_refuses_what_it_cannot_honour(url: str) -> None:
    long_text = "word " * 2400  # over 10 chunks (the server's default) of --max-length 256
    refused = requests.post(url + "/rerank", json={"query": QUERY, "texts": [long_text]}, timeout=30)
    assert refused.status_code == 400 and "allow truncation" in refused.json()["detail"]  # TEI's default
    left = requests.post(url + "/rerank", json={"query": QUERY, "texts": DOCS, "truncate": True,
                                                "truncation_direction": "Left"}, timeout=30)
    assert left.status_code == 400 and "Left" in left.json()["detail"]


def test_voyage_shape(url: str) -> None:
    r = requests.post(url + "/v1/rerank", json={"model": MODEL, "query": QUERY, "documents": DOCS, "top_k": 2,
                                                "return_documents": True, "truncation": True}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "list" and got["model"] == MODEL and got["usage"]["total_tokens"] > 0
    assert_same([(x["index"], x["relevance_score"]) for x in got["data"]], reference(url, DOCS), top_n=2)
    assert [x["document"] for x in got["data"]] == [DOCS[x["index"]] for x in got["data"]]


@pytest.mark.parametrize("body,shape", [
    ({"query": "q", "texts": ["a"]}, "tei"),
    ({"query": "q", "texts": ["a"], "truncation": True}, "tei"),  # texts decides first
    ({"query": "q", "documents": ["a"], "truncation": False}, "voyage"),
    ({"query": "q", "documents": ["a"], "truncation": "end"}, "cohere"),
    ({"query": "q", "documents": [{"text": "a"}], "top_n": 1}, "cohere"),  # Jina and vLLM
    ({"query": "q", "documents": ["a"], "top_k": 1}, "cohere"),  # and refused there: top_k needs truncation
    ([], "cohere"),
])
def test_the_convention_is_decided_by_the_body(body: Any, shape: str) -> None:
    assert convention(body) == shape


def test_a_body_of_two_conventions_is_refused(url: str) -> None:
    r = requests.post(url + "/rerank", json={"query": QUERY, "texts": DOCS, "documents": DOCS}, timeout=30)
    assert r.status_code == 422 and "documents" in r.json()["detail"]



LONG = " ".join(f"line {i} of a long page about rivers, capitals and France." for i in range(60))  # ~4 chunks


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_max_chunks_per_doc_on_every_cohere_shaped_path_scores_as_grpc(served: tuple[str, str], path: str) -> None:
    """Cohere v1 and v2 and Jina's shape carry max_chunks_per_doc; each result tells its chunks
    and best chunk; the scores are the gRPC client's for the same cap (one scoring path)."""
    url, grpc_target = served
    docs = [DOCS[0], LONG]
    with RerankClient(grpc_target) as client:
        want = {n: {r.index: r for r in client.rerank(QUERY, docs, max_chunks_per_doc=n).results} for n in (None, 1, 2)}
    assert want[None][1].chunks > 2 and want[1][1].chunks == 1 and want[1][1].truncated
    for n in (None, 1, 2):
        body = {"query": QUERY, "documents": docs} | ({} if n is None else {"max_chunks_per_doc": n})
        r = requests.post(url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["meta"]["billed_units"]["documents"] == 2 and not got["meta"].get("warnings")
        for x in got["results"]:
            w = want[n][x["index"]]
            assert (x["chunks"], x["best_chunk"], x["truncated"]) == (w.chunks, w.best_chunk, w.truncated)
            assert x["relevance_score"] == pytest.approx(w.score, abs=TOL)
    bad = requests.post(url + path, json={"query": QUERY, "documents": docs, "max_chunks_per_doc": 0}, timeout=30)
    assert bad.status_code == 400 and "max_chunks_per_doc" in bad.json()["detail"]


def test_shapes_without_the_field_get_the_servers_default_chunks(served: tuple[str, str]) -> None:
    url, grpc_target = served
    with RerankClient(grpc_target) as client:
        want = {r.index: r.score for r in client.rerank(QUERY, [DOCS[0], LONG]).results}
    tei = requests.post(url + "/rerank", json={"query": QUERY, "texts": [DOCS[0], LONG], "truncate": True}, timeout=30)
    voyage = requests.post(url + "/v1/rerank", json={"query": QUERY, "documents": [DOCS[0], LONG],
                                                     "truncation": True}, timeout=30)
    assert {x["index"]: x["score"] for x in tei.json()} == pytest.approx(want, abs=TOL)
    assert {x["index"]: x["relevance_score"] for x in voyage.json()["data"]} == pytest.approx(want, abs=TOL)


def test_cohere_sdk_sends_max_chunks_per_doc_and_parses_the_chunk_fields(url: str, http: httpx.Client) -> None:
    co = cohere.Client(api_key="unused", base_url=url, httpx_client=http)
    r = co.rerank(model=MODEL, query=QUERY, documents=[DOCS[0], LONG], max_chunks_per_doc=1)
    (long_,) = [x for x in r.results if x.index == 1]
    assert r.meta.warnings is None and long_.chunks == 1 and long_.truncated is True
