"""``rerank gateway`` alone in front of remote gRPC servers: it authenticates, limits and
bills; the backends (no auth, no ledger) only score; a backend that is down is skipped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import running_app, target

from service import cli
from service.app import App
from service.commands.gateway import start
from service.http.server import HttpServer
from worker.fake import FakeRunner

DEAD_BACKEND = "127.0.0.1:1"  # nothing listens there: UNAVAILABLE at once


def port(gateway: App) -> int:
    (server,) = [c for c in gateway.components if isinstance(c, HttpServer)]
    return server.port


def create_key(db: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["keys", "create", "--name", "edge", "--db", db]) == 0
    return capsys.readouterr().out.splitlines()[-1]


async def test_gateway_alone_forwards_scoring_and_keeps_billing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "edge.sqlite3")
    key = await asyncio.to_thread(create_key, db, capsys)
    runner = FakeRunner(max_length=512)
    async with running_app(runner, model="backend-model", max_documents=50) as backend:
        args = cli.build_parser().parse_args(
            ["gateway", "--backend", target(backend), "--backend", DEAD_BACKEND, "--host", "127.0.0.1",
             "--http-port", "0", "--db", db, "--connect-timeout-s", "10"])
        gateway = await start(args)
        try:
            await gateway.wait_ready()  # a gateway is ready once started: the not-ready alert reads this
            assert gateway.metrics.registry.get_sample_value("rerank_ready") == 1
            auth = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port(gateway)}", headers=auth,
                                         timeout=30) as http:
                replies = [await http.post("/v1/rerank", json={"query": "q", "documents": ["a", "b c", "d"][:n]})
                           for n in (1, 2, 3, 3)]
                assert [r.status_code for r in replies] == [200] * 4  # half went to the dead one first
                assert {r.json()["model"] for r in replies} == {"backend-model"}
                (card,) = (await http.get("/v1/models")).json()["data"]
                assert (card["id"], card["max_length"], card["limits"]["max_documents"]) == ("backend-model", 512, 50)
                assert (await http.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 51})).status_code == 400
                too_long = await http.post("/v1/rerank", json={"query": "word " * 600, "documents": ["d"]})
                assert too_long.status_code == 400 and "max_length" in too_long.json()["detail"]  # said by a backend
                assert (await http.post("/v1/rerank", json={"query": "q", "documents": ["d"]},
                                        headers={"Authorization": "Bearer nope"})).status_code == 401
            records = await gateway.core.ledger.records()
            assert [r.documents for r in records] == [1, 2, 3, 3]
            assert sum(len(b) for b in runner.batches) == 9  # the backend scored what was billed
        except BaseException:
            await gateway.stop(0)
            raise
    try:  # every backend gone: 503, retry later, nothing billed
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port(gateway)}", timeout=30) as http:
            down = await http.post("/v1/rerank", json={"query": "q", "documents": ["d"]},
                                   headers={"Authorization": f"Bearer {key}"})
        assert down.status_code == 503 and down.headers["retry-after"]
        assert len(await gateway.core.ledger.records()) == 4
    finally:
        await gateway.stop(0)


async def test_gateway_without_backends_refuses_to_start(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["gateway", "--backend", DEAD_BACKEND, "--http-port", "0",
                                          "--data-dir", str(tmp_path), "--connect-timeout-s", "0"])
    with pytest.raises(ConnectionError, match="no backend answered"):
        await start(args)


async def test_gateway_passes_the_chunk_cap_on_and_brings_each_documents_chunks_back(tmp_path: Path) -> None:
    """The gateway's cap is the backends' (GetModelInfo); a call's cap travels to the backend,
    and each document's chunks and best chunk come back; billing counts documents."""
    from worker.fake import fake_logit
    from worker.types import PromptOptions

    runner = FakeRunner(max_length=64)
    long_doc = " ".join(f"w{i}" for i in range(200))
    docs = ["short", long_doc]
    async with running_app(runner, model="backend-model", max_chunks_per_doc=4) as backend:
        args = cli.build_parser().parse_args(
            ["gateway", "--backend", target(backend), "--host", "127.0.0.1", "--http-port", "0", "--no-auth",
             "--data-dir", str(tmp_path), "--connect-timeout-s", "10"])
        gateway = await start(args)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port(gateway)}", timeout=30) as http:
                (card,) = (await http.get("/v1/models")).json()["data"]
                calls = {n: await http.post("/v1/rerank", json={"query": "q", "documents": docs,
                                                                "max_chunks_per_doc": n}) for n in (None, 2, 9, 0)}
            records = await gateway.core.ledger.records()
        finally:
            await gateway.stop(0)
    assert card["limits"]["max_chunks_per_doc"] == 4
    assert calls[0].status_code == 400 and "max_chunks_per_doc must be at least 1" in calls[0].json()["detail"]
    for n, want in ((None, 4), (2, 2), (9, 4)):
        body = calls[n].json()
        prompts = runner.builder.build("q", docs, None, PromptOptions(max_chunks=want))
        chunk_logits = [fake_logit(ids) for ids in prompts.sequences[1:]]
        (long_,) = [r for r in body["results"] if r["index"] == 1]
        assert (long_["chunks"], long_["best_chunk"], long_["truncated"]) == (
            want, chunk_logits.index(max(chunk_logits)), True)
        assert long_["logit"] == pytest.approx(max(chunk_logits), abs=1e-12)
        assert body["meta"]["billed_units"]["documents"] == 2
        assert body["usage"]["prompt_tokens"] == sum(map(len, prompts.sequences))
    assert calls[9].json()["meta"]["warnings"] == ["max_chunks_per_doc 9 is more than this server scores; "
                                                   "clamped to 4"]
    assert [r.documents for r in records] == [2, 2, 2]


async def test_gateway_names_each_calls_key_to_the_backend_as_its_tenant(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The scale-out topology: the backends have no keys, so the gateway names the caller's key
    in ``x-rerank-on-behalf-of`` and the backend's scheduler shares by it, as one server would
    (a backend that saw one tenant would let a flooding key stall every other)."""
    db = str(tmp_path / "edge.sqlite3")
    keys = [await asyncio.to_thread(create_key, db, capsys) for _ in range(2)]
    async with running_app(FakeRunner(max_length=512), model="backend-model") as backend:
        seen: list[str] = []
        scored = backend.engine.score

        async def recording(query: Any, tenant: str, priority: int) -> Any:
            seen.append(tenant)
            return await scored(query, tenant, priority)

        backend.engine.score = recording  # type: ignore[method-assign]
        args = cli.build_parser().parse_args(
            ["gateway", "--backend", target(backend), "--host", "127.0.0.1", "--http-port", "0", "--db", db,
             "--connect-timeout-s", "10"])
        gateway = await start(args)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port(gateway)}", timeout=30) as http:
                for key in (*keys, keys[0]):
                    reply = await http.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]},
                                            headers={"Authorization": f"Bearer {key}"})
                    assert reply.status_code == 200
            records = await gateway.core.ledger.records()
        finally:
            await gateway.stop(0)
    billed = [r.key_id for r in records]
    assert len(set(billed)) == 2 and "anonymous" not in billed
    assert seen == billed  # each call's tenant at the backend is the key it was billed to
