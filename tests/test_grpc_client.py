"""The friendly clients: retries by service config, TLS with call credentials, compression."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from rerank.v1 import rerank_pb2 as pb
from rerank.v1 import rerank_pb2_grpc as pb_grpc
from serving import running_app, target

from clients import AsyncRerankClient, RerankClient, RerankError
from service.app import CoreParts
from service.seams import Principal


class Flaky(pb_grpc.RerankServiceServicer):
    """Fails the first ``failures`` calls with ``code``, then answers; records request ids."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures = failures
        self.code = code
        self.request_ids: list[str] = []

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= self.failures:
            await context.abort(self.code, "not now")
        return pb.RerankResponse(request_id=request.request_id, model="m",
                                 results=[pb.RankedDocument(index=0, score=0.5)])


async def flaky_server(servicer: Flaky) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_RerankServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(("failures", "code", "retries", "ok", "attempts"), [
    (2, grpc.StatusCode.UNAVAILABLE, 3, True, 3),  # retried, within the policy
    (2, grpc.StatusCode.UNAVAILABLE, 0, False, 1),  # retries off
    (5, grpc.StatusCode.UNAVAILABLE, 2, False, 3),  # gives up after the policy's attempts
    (1, grpc.StatusCode.INVALID_ARGUMENT, 3, False, 1),  # never retried: the same call fails again
    (1, grpc.StatusCode.RESOURCE_EXHAUSTED, 3, False, 1),  # the caller decides, with the hint
])
async def test_only_unavailable_is_retried_by_the_channel(
        failures: int, code: grpc.StatusCode, retries: int, ok: bool, attempts: int) -> None:
    servicer = Flaky(failures, code)
    server, address = await flaky_server(servicer)
    try:
        async with AsyncRerankClient(address, retries=retries, timeout_s=10) as client:
            if ok:
                assert (await client.rerank("q", ["d"])).indices == [0]
            else:
                with pytest.raises(RerankError) as err:
                    await client.rerank("q", ["d"])
                assert err.value.code == code and str(err.value) == f"{code.name}: not now"
    finally:
        await server.stop(0)
    assert len(servicer.request_ids) == attempts
    assert len(set(servicer.request_ids)) == 1  # a retry is the same call: billed once


@pytest.mark.parametrize(("options", "spread"), [
    ((), True),  # the client's default: round_robin
    ((("grpc.lb_policy_name", "pick_first"),), False),  # gRPC's own default, still the caller's to choose
])
async def test_a_target_of_several_addresses_spreads_calls_by_default(
        options: tuple[tuple[str, str], ...], spread: bool) -> None:
    """A target that resolves to several addresses, as ``dns:///rerank-grpc:50051`` does for a
    headless Service, must not pin every call to the first address that answers. The test
    names its two servers with ``ipv4:127.0.0.1:p1,127.0.0.1:p2``: a dns target carries one
    port, and both servers here share 127.0.0.1, so only their ports tell them apart. The
    resolver differs from DNS; the balancing policy this is about does not."""
    servicers = [Flaky(0), Flaky(0)]
    servers = [await flaky_server(s) for s in servicers]
    try:
        async with AsyncRerankClient("ipv4:" + ",".join(a for _, a in servers), options=options) as client:
            for _ in range(20):
                await client.rerank("q", ["d"])
    finally:
        for server, _ in servers:
            await server.stop(0)
    counts = sorted(len(s.request_ids) for s in servicers)
    assert sum(counts) == 20
    assert (counts[0] > 0) is spread, counts


async def test_the_caller_request_id_is_sent_as_given() -> None:
    servicer = Flaky(0)
    server, address = await flaky_server(servicer)
    try:
        async with AsyncRerankClient(address) as client:
            assert (await client.rerank("q", ["d"], request_id="mine-1")).request_id == "mine-1"
    finally:
        await server.stop(0)


async def test_gzip_compression_round_trips() -> None:
    async with running_app() as app:
        async with AsyncRerankClient(target(app), compression="gzip") as client:
            plain = await client.rerank("pandas", ["bamboo " * 200, "bears"])
        async with AsyncRerankClient(target(app)) as client:
            assert (await client.rerank("pandas", ["bamboo " * 200, "bears"])).results == plain.results


# -- TLS ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    out = tmp_path_factory.mktemp("tls")
    cert, key = out / "cert.pem", out / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class Keys:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def authenticate(self, api_key: str | None) -> Principal:
        self.seen.append(api_key)
        return Principal("k", "tester")


@pytest.fixture()
async def tls_app(certificate: tuple[Path, Path]) -> AsyncIterator[tuple[str, Keys]]:
    cert, key = certificate
    keys = Keys()
    async with running_app(parts=CoreParts(auth=keys), tls_cert=cert, tls_key=key) as app:
        yield f"localhost:{app.grpc.port}", keys


async def test_tls_with_the_key_as_call_credentials(tls_app: tuple[str, Keys], certificate: tuple[Path, Path]) -> None:
    address, keys = tls_app
    async with AsyncRerankClient(address, tls=True, root_certificates=certificate[0].read_bytes(),
                                 api_key="sk-over-tls") as client:
        assert len((await client.rerank("q", ["a", "b"])).results) == 2
    assert keys.seen == ["sk-over-tls"]


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_app: tuple[str, Keys]) -> None:
    address, keys = tls_app
    async with AsyncRerankClient(address, retries=0, timeout_s=5) as client:
        with pytest.raises(RerankError) as err:
            await client.rerank("q", ["a"])
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and keys.seen == []


async def test_blocking_client_over_tls(tls_app: tuple[str, Keys], certificate: tuple[Path, Path]) -> None:
    import asyncio

    address, keys = tls_app

    def call() -> int:
        with RerankClient(address, tls=True, root_certificates=certificate[0].read_bytes(), api_key="sk-2") as c:
            return len(c.rerank("q", ["a"]).results)

    assert await asyncio.to_thread(call) == 1
    assert keys.seen == ["sk-2"]
