"""deploy/grafana's dashboard and deploy/prometheus's alert rules, against the metrics the server
really exports.

Fast: both files parse, every rule carries what an on-call needs, and every metric name an
expression uses is one a ``Metrics`` registry exports. Slow: ``promtool check rules``, then a real
Prometheus (Debian's ``prometheus``, on a free loopback port, temporary storage, 1 s scrapes)
scrapes a real ``rerank serve`` after real calls and evaluates every panel and rule expression
through its HTTP API; every name they use must be one Prometheus scraped. A renamed metric
evaluates without error in PromQL (to nothing), which is why the names are checked, and the
tests show that a rename is reported.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from rerank.v1 import rerank_pb2 as pb
from rerank.v1 import rerank_pb2_grpc as pb_grpc

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "rerank-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "rerank-alerts.yml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
JOB = "rerank"  # the scrape job the rules name
# Grafana's variables, as one dashboard view would fill them in
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "job": JOB, "instance": ".*"}
PROMETHEUS_OWN = {"up"}  # what Prometheus writes itself for every target

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


# -- the expressions and the names in them ------------------------------------------------------
def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)  # label matchers, ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue  # a function, an aggregation, a keyword
        names.add(match.group())
    return names


def unknown_names(exprs: dict[str, str], known: set[str]) -> dict[str, set[str]]:
    """Expression -> the metric names it uses that are not in ``known``; empty: all known."""
    return {where: missing for where, expr in exprs.items() if (missing := metric_names(expr) - known)}


def dashboard_exprs() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {f"panel {p['title']!r} {t['refId']}": t["expr"] for p in dashboard["panels"]
            for t in p.get("targets", [])}


def rule_exprs() -> dict[str, str]:
    return {f"rule {r['alert']}": r["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
            for r in group["rules"]}


def concrete(expr: str) -> str:
    """``expr`` with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)


def exported(metrics_text: str) -> set[str]:
    """The sample names in a Prometheus text exposition."""
    return {re.split(r"[{\s]", line, maxsplit=1)[0] for line in metrics_text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (method, code) (rate(rerank_requests_total{job=~"$job", code=~"5..|INTERNAL"}[5m]))',
     {"rerank_requests_total"}),
    ("(a_x / b_y > 0.8) or (c:z / d > 1e3)", {"a_x", "b_y", "c:z", "d"}),
    ('up{job="rerank"} == 0', {"up"}),
    ("histogram_quantile(0.99, sum(rate(x_bucket[1m])) by (le)) offset 5m > bool 1", {"x_bucket"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)") unless on (instance) n', {"m", "n"}),
    ("sum(rate(a[5m:30s])) * Inf", {"a"}),
])
def test_metric_names_finds_each_selected_metric_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# -- fast: the files, and the names against an in-process registry ------------------------------
def registry_names() -> set[str]:
    metrics = Metrics()
    metrics.observe_request("Rerank", "OK", 0.1)  # labelled series exist once observed
    return exported(generate_latest(metrics.registry).decode())


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert graphs and all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in graphs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_rule_says_how_bad_for_how_long_and_where_the_runbook_is() -> None:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    operations = OPERATIONS.read_text()
    for rule in group["rules"]:
        assert re.fullmatch(r"\d+m", rule["for"]) and rule["labels"]["severity"] in {"page", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["annotations"]["runbook"].startswith("docs/OPERATIONS.md#dashboards-and-alerts")
        assert f"`{rule['alert']}`" in operations  # the runbook explains it


def test_every_expression_names_only_metrics_the_server_exports() -> None:
    exprs = {**dashboard_exprs(), **rule_exprs()}
    assert len(exprs) > 20
    assert unknown_names(exprs, registry_names() | PROMETHEUS_OWN) == {}


def test_a_renamed_metric_is_reported() -> None:
    exprs = {**dashboard_exprs(), **rule_exprs()}
    renamed = {k: v.replace("rerank_queue_tokens", "rerank_queued_tokens") for k, v in exprs.items()}
    reported = unknown_names(renamed, registry_names() | PROMETHEUS_OWN)
    assert reported and all(missing == {"rerank_queued_tokens"} for missing in reported.values())
    assert any(k.startswith("rule ") for k in reported) and any(k.startswith("panel ") for k in reported)


# -- slow: promtool, and a real Prometheus scraping a real server ------------------------------
def _needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian: apt-get install prometheus; .ci/run does it as root)")
    return path


@pytest.mark.slow
def test_promtool_accepts_the_rules() -> None:
    checked = subprocess.run([_needs("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in checked.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prometheus(scrape: str, tmp_path: Path) -> Iterator[httpx.Client]:
    """Prometheus scraping ``scrape`` (HOST:PORT) every second as job "rerank", with the rules
    loaded; an HTTP client on its API. Stopped (killed if need be) on the way out."""
    binary = _needs("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [scrape]}]}]}))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            _until(lambda: _answers(api, "/-/ready"), f"Prometheus ready (log: {tmp_path / 'prometheus.log'})")
            yield api
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()


def _answers(api: httpx.Client, path: str) -> bool:
    try:
        return api.get(path).status_code == 200
    except httpx.TransportError:
        return False


def _until(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def query(api: httpx.Client, expr: str) -> list[dict[str, Any]]:
    """Evaluate ``expr`` now; raises with Prometheus's error if it does not evaluate."""
    answer = api.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('errorType')}: {answer.get('error')}"
    return list(answer["data"]["result"])


def _calls(grpc_target: str, url: str) -> None:
    """Real calls of each kind: every HTTP rerank path, a refused one, and gRPC."""
    body = {"model": "tiny", "query": "capital of France", "documents": ["Paris", "Bananas are yellow"]}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        assert httpx.post(url + path, json=body, timeout=30).status_code == 200
    assert httpx.post(url + "/v1/rerank", json={**body, "documents": []}, timeout=30).status_code == 400
    with grpc.insecure_channel(grpc_target) as channel:
        pb_grpc.RerankServiceStub(channel).Rerank(pb.RerankRequest(model="tiny", query="q", documents=["a"]),
                                                  timeout=30)


@pytest.mark.slow
def test_prometheus_evaluates_every_panel_and_rule_on_a_real_scrape(tiny_model_dir: Path, tmp_path: Path) -> None:
    _needs("prometheus")
    from observe_support import serving

    with serving(tiny_model_dir, tmp_path, "--model-name", "tiny") as (_, grpc_target, url), \
            prometheus(url.removeprefix("http://"), tmp_path) as api:
        _calls(grpc_target, url)
        scraped_after_calls = f'rerank_requests_total{{job="{JOB}", method="Rerank", code="OK"}}'
        _until(lambda: bool(query(api, scraped_after_calls)), "a scrape after the calls")
        _until(lambda: bool(query(api, f'count_over_time(up{{job="{JOB}"}}[1m]) >= 5')), "five scrapes")
        scraped = set(api.get("/api/v1/label/__name__/values").json()["data"])
        served = exported(httpx.get(url + "/metrics", timeout=10).text)
        exprs = {**dashboard_exprs(), **rule_exprs()}
        for expr in exprs.values():
            query(api, concrete(expr))  # evaluates without error
        assert unknown_names(exprs, scraped) == {}
        assert unknown_names(exprs, served | PROMETHEUS_OWN) == {}
        # the data is there, not only the names
        assert query(api, concrete(exprs["panel 'Request rate by route and status' A"]))
        (ready,) = query(api, f'rerank_ready{{job="{JOB}"}}')
        assert ready["value"][1] == "1"
        # a rename evaluates quietly to nothing in PromQL: the name check is what catches it
        tokens = concrete(exprs["panel 'Queue depth: tokens' A"])
        renamed = tokens.replace("rerank_queue_tokens", "rerank_queued_tokens")
        assert query(api, renamed) == [] and unknown_names({"renamed": renamed}, scraped) == {
            "renamed": {"rerank_queued_tokens"}}
        # Prometheus loaded every rule and evaluates each without error
        _until(lambda: _rules_evaluated(api), "every rule evaluated")
        assert {r["name"] for r in _loaded_rules(api)} == {k.removeprefix("rule ") for k in rule_exprs()}
        assert [r["name"] for r in _loaded_rules(api) if r["health"] != "ok"] == []


def _loaded_rules(api: httpx.Client) -> list[dict[str, Any]]:
    return [r for g in api.get("/api/v1/rules").json()["data"]["groups"] for r in g["rules"]]


def _rules_evaluated(api: httpx.Client) -> bool:
    rules = _loaded_rules(api)
    return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
