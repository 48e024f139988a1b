"""Deployment files, checked with the real tools: promtool, a real Prometheus scraping a real gateway,
a Kubernetes schema validator, hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from safethink_server.config import ServerSettings
from tests.support.servers import EMBEDDED_MODEL, free_port, running_server, series

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(BIN))
    assert path, f"{name} is not installed (.ci/run installs it)"
    return path


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


ALERTS = {"SafeThinkHighInterventionRate", "SafeThinkHighRefusalRate", "SafeThinkKeyHighRefusalRate", "SafeThinkScorerErrors",
          "SafeThinkScorerSlow", "SafeThinkNoTraffic", "SafeThinkMemoryNearLimit"}


def rules() -> dict[str, dict]:
    """rules.yml's rules by name (a recording rule's name is the series it records)."""
    groups = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())["groups"]
    return {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}


def flat(expr: str) -> str:
    return " ".join(expr.split())


def test_promtool_checks_and_unit_tests_the_alert_rules():
    out = run(tool("promtool"), "check", "rules", str(DEPLOY / "prometheus/rules.yml"))
    assert "SUCCESS: 11 rules found" in out
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", str(DEPLOY / "prometheus/rules_test.yml"))
    run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))
    # Every alert has a unit test in which it fires (the rate alerts one in which they stay quiet too), and every
    # recorded series is tested or alerted on.
    tests = yaml.safe_load((DEPLOY / "prometheus/rules_test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == ALERTS
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} >= ALERTS - {"SafeThinkScorerErrors", "SafeThinkScorerSlow"}
    tested = " ".join(case["expr"] for t in tests for case in t.get("promql_expr_test", []))
    alerting = " ".join(r["expr"] for r in rules().values() if "alert" in r)
    assert all(name in tested or name in alerting for name, r in rules().items() if "record" in r)


def test_alerts_and_recording_rules_per_api_key():
    found = rules()
    assert {name for name, r in found.items() if "alert" in r} == ALERTS
    # Per key: the key's interventions over the key's requests, as the dashboard and docs/operations.md have it.
    assert flat(found["safethink:intervention_rate_by_key:5m"]["expr"]) == (
        "sum by (key) (rate(safethink_interventions_total[5m])) / sum by (key) (rate(safethink_requests_total[5m]))")
    assert flat(found["safethink:refusal_rate_by_key:10m"]["expr"]) == (
        "sum by (key) (rate(safethink_refusals_total[10m])) / sum by (key) (rate(safethink_requests_total[10m]))")
    refusals = found["SafeThinkKeyHighRefusalRate"]
    assert flat(refusals["expr"]).startswith("safethink:refusal_rate_by_key:10m > 0.2 ") and refusals["for"] == "10m"
    assert "{{ $labels.key }}" in refusals["annotations"]["summary"]


def test_kubernetes_manifests_validate():
    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    core = [str(m) for m in manifests if m.name != "servicemonitor.yaml"]
    run(tool("kubernetes-validate"), "--strict", *core)
    # The ServiceMonitor CRD has no schema in the validator: check that it selects the Service's port.
    monitor = yaml.safe_load((DEPLOY / "k8s/servicemonitor.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "k8s/service.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


VLLM_LABELS = {"app.kubernetes.io/name": "vllm"}


def manifests(kind: str) -> list[dict]:
    docs = [doc for m in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(m.read_text())]
    return [doc for doc in docs if doc["kind"] == kind]


def manifest(kind: str) -> dict:
    found = manifests(kind)
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def network_policies(pod_labels: dict[str, str]) -> list[dict]:
    """The specs of the NetworkPolicies that apply to pods with these labels (an empty selector selects every pod)."""
    found = [p["spec"] for p in manifests("NetworkPolicy")]
    assert all(set(spec["podSelector"]) <= {"matchLabels"} for spec in found), "selected by labels only"
    return [spec for spec in found if spec["podSelector"].get("matchLabels", {}).items() <= pod_labels.items()]


PROMETHEUS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def gateway_container() -> dict:
    (container,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def container_env(name: str) -> str | None:
    return next((e.get("value") for e in gateway_container()["env"] if e["name"] == name), None)


def test_network_policy_lets_only_the_gateway_pods_reach_vllm():
    (policy,) = network_policies(VLLM_LABELS)
    pod_labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    upstream = urlsplit(container_env("SAFETHINK_UPSTREAM_URL"))
    # It selects the vLLM pods (by the label docs/operations.md and the manifest's comment ask for), not the gateway's.
    assert policy["podSelector"] == {"matchLabels": VLLM_LABELS} and upstream.hostname == "vllm"
    label = "app.kubernetes.io/name: vllm"
    assert label in (ROOT / "docs" / "operations.md").read_text()
    assert any(label in line for line in (DEPLOY / "k8s/networkpolicy.yaml").read_text().splitlines() if line.startswith("#"))
    assert not VLLM_LABELS.items() <= pod_labels.items()
    # Ingress is governed: whatever no rule allows is denied. Each rule names its peers (a rule without `from`
    # allows every source) and opens the serving port only.
    assert "Ingress" in policy["policyTypes"]
    assert policy["ingress"]
    for rule in policy["ingress"]:
        assert rule.get("from") and rule["ports"] == [{"protocol": "TCP", "port": upstream.port}]
    peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert all(set(peer) <= {"podSelector", "namespaceSelector"} for peer in peers), "no ipBlock"
    # In this namespace: the gateway's pods, by its pod template's labels.
    local = [peer["podSelector"] for peer in peers if "namespaceSelector" not in peer]
    assert len(local) == 1 and list(local[0]) == ["matchLabels"], local
    assert local[0]["matchLabels"] and local[0]["matchLabels"].items() <= pod_labels.items()
    # Elsewhere: Prometheus pods of the monitoring namespace, both selectors set (an empty one selects everything).
    remote = [peer for peer in peers if "namespaceSelector" in peer]
    assert remote == [PROMETHEUS_PEER]


def flag(args: list[str], name: str) -> int:
    assert args.count(name) == 1, (name, args)
    return int(args[args.index(name) + 1])


def test_metrics_port_is_declared_scraped_and_open_to_prometheus_only():
    """--metrics-port: every API key's series leave the API port; the pod declares the metrics port, every scrape
    config targets it, and of all the NetworkPolicies that apply to the gateway's pods only the rule for Prometheus
    opens it, while the API port stays reachable."""
    container = gateway_container()
    api_port, metrics_port = flag(container["args"], "--port"), flag(container["args"], "--metrics-port")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": api_port, "metrics": metrics_port}
    template = manifest("Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                                                   "prometheus.io/path": "/metrics"}
    service = {p["name"]: p for p in manifest("Service")["spec"]["ports"]}
    assert service["metrics"]["targetPort"] in ("metrics", metrics_port)
    (endpoint,) = manifest("ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    # The policies that select the gateway's pods: ingress governed, and whatever no rule allows is denied. Policies
    # add up, so every rule of every one of them counts. A rule without `ports` opens them all; without `from`, to all.
    pod_labels = template["metadata"]["labels"]
    policies = network_policies(pod_labels)
    assert policies and all("Ingress" in p["policyTypes"] for p in policies)
    rules = [rule for p in policies for rule in p["ingress"]]
    assert all(rule.get("ports") for rule in rules), "each rule names its ports"

    def opens(rule: dict, port: int, name: str) -> bool:
        return any(p.get("protocol", "TCP") == "TCP" and p["port"] in (port, name) for p in rule["ports"])

    to_metrics = [rule for rule in rules if opens(rule, metrics_port, "metrics")]
    assert to_metrics and all(rule.get("from") == [PROMETHEUS_PEER] for rule in to_metrics), to_metrics
    assert any(opens(rule, api_port, "http") and not rule.get("from") for rule in rules), "clients reach the API port"
    assert all(opens(rule, api_port, "http") for rule in rules if not rule.get("from")), "only the API port is open to all"
    # compose and its Prometheus: the gateway's metrics port, on the compose network only (not published).
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["safethink"]
    compose_metrics = flag(compose["command"], "--metrics-port")
    assert not any(str(compose_metrics) in str(published) for published in compose["ports"])
    scrape_configs = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"]
    scrapes = {job["job_name"]: job for job in scrape_configs}
    assert scrapes["safethink"]["static_configs"] == [{"targets": [f"safethink:{compose_metrics}"]}]
    assert scrapes["safethink"].get("metrics_path", "/metrics") == "/metrics"


def drain_timeout_s() -> float:
    """The drain the gateway pods run with: the Deployment's SAFETHINK_DRAIN_TIMEOUT_S, else the server's default."""
    field = ServerSettings.model_fields.get("drain_timeout_s")
    default = field.default if field is not None else 30.0
    assert default >= 30.0
    return float(container_env("SAFETHINK_DRAIN_TIMEOUT_S") or default)


def test_gateway_probes_and_graceful_shutdown():
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = gateway_container()
    ports = {p["name"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/health/live", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
    assert all(probe["port"] in ports for probe in probes.values())
    # The grace period counts from the preStop hook on: it must cover the hook's sleep and the drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) <= 10
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_timeout_s() >= 30
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["safethink"]
    assert int(compose["stop_grace_period"].removesuffix("s")) > drain_timeout_s()


def test_dockerfile_lints_clean():
    run(tool("hadolint"), str(ROOT / "Dockerfile"))


def dashboard_panels() -> list[dict]:
    return json.loads((DEPLOY / "grafana/safethink-dashboard.json").read_text())["panels"]


def dashboard_expressions() -> list[str]:
    return [t["expr"] for panel in dashboard_panels() for t in panel["targets"]]


def test_dashboard_has_the_refusal_and_per_key_panels():
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    taken = set()
    for p in panels:  # on the 24-column grid, no two panels overlap
        x, y, w, h = (p["gridPos"][k] for k in "xywh")
        cells = {(x + dx, y + dy) for dx in range(w) for dy in range(h)}
        assert x + w <= 24 and not cells & taken, p["title"]
        taken |= cells
    by_title = {p["title"]: p for p in panels}
    found = rules()
    # Refusals: their rate, and their share of requests (the fleet's refusal rate, as the alert reads it).
    refusals = {t["refId"]: t for t in by_title["Refusals"]["targets"]}
    assert flat(refusals["A"]["expr"]) == "sum(rate(safethink_refusals_total[5m]))"
    assert flat(refusals["B"]["expr"]) == flat(found["safethink:refusal_rate:5m"]["expr"])
    share = by_title["Refusals"]["fieldConfig"]["overrides"]
    assert {"id": "unit", "value": "percentunit"} in next(o for o in share if o["matcher"]["options"] == "B")["properties"]
    # Interventions per request of each API key: the recorded per-key rate, one series per key.
    (per_key,) = by_title["Intervention rate by API key"]["targets"]
    assert flat(per_key["expr"]) == flat(found["safethink:intervention_rate_by_key:5m"]["expr"])
    assert per_key["legendFormat"] == "{{key}}"
    # Panels over labelled counters aggregate: each one shows a fleet-wide series, or one per label it groups by.
    for expr in dashboard_expressions():
        for call in re.findall(r"rate\((safethink_\w+)\[", expr):
            assert re.search(rf"sum(?: by \(\w+\) )?\(rate\({call}\[", expr), expr


def readme_intervention_rate() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    return re.search(r"```promql\n(.+?)\n```", text, re.S).group(1).strip()


API_KEY = "deploy-test-key"  # --api-key: its id is `default`


@dataclass
class Gateway:
    url: str  # the API
    metrics: str  # the listener of --metrics-port

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway():
    """A real gateway as the Deployment runs it: an API key, and /metrics on a metrics port of its own."""
    metrics_port = free_port()
    with running_server("--threshold", "0", "--max-step-tokens", "24", "--reasoning-budget", "64", "--api-key", API_KEY,
                        "--metrics-port", str(metrics_port)) as url:
        yield Gateway(url, f"http://127.0.0.1:{metrics_port}")


@pytest.fixture(scope="module")
def prometheus(gateway, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/rules.yml")],
        "scrape_configs": [{"job_name": "safethink", "static_configs": [{"targets": [gateway.metrics.removeprefix("http://")]}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (folder / "log").open("w")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (folder / "log").read_text()[-2000:]
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    body = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_gateway_and_every_dashboard_query_returns_data(gateway, prometheus):
    deadline = time.monotonic() + 60
    while not query(prometheus, 'up{job="safethink"} == 1'):  # scrapes begin a few seconds after start
        assert time.monotonic() < deadline, "prometheus never scraped the gateway"
        time.sleep(0.5)
    c = gateway.client()
    for _ in range(2):
        c.chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=48, temperature=0)
    rate = readme_intervention_rate()
    deadline = time.monotonic() + 60
    while True:  # the scrapes after the traffic must land before rates see it
        result = query(prometheus, rate)
        if result and float(result[0]["value"][1]) > 0:
            break
        assert time.monotonic() < deadline, f"no intervention rate in Prometheus: {result}"
        time.sleep(1)
    assert float(result[0]["value"][1]) > 0
    empty = [expr for expr in dashboard_expressions() if not query(prometheus, expr)]
    assert not empty, f"dashboard queries without data: {empty}"
    loaded = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"][0]["rules"]
    assert {r["name"] for r in loaded if r["type"] == "alerting"} == ALERTS


def exposed_names(gateway: Gateway) -> set[str]:
    """The series names the gateway's /metrics declares, labelled families without children included."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    families = text_string_to_metric_families(httpx.get(gateway.metrics + "/metrics", timeout=10).text)
    return {f.name + suffix for f in families for suffix in suffixes.get(f.type, [""])}


def test_dashboard_and_rules_read_only_metrics_the_gateway_exposes(gateway):
    exprs = dashboard_expressions() + [r["expr"] for r in rules().values()] + [readme_intervention_rate()]
    used = {name for expr in exprs for name in re.findall(r"\bsafethink_\w+", expr)}
    assert {"safethink_refusals_total", "safethink_interventions_total", "safethink_requests_total"} <= used
    assert used <= exposed_names(gateway), used - exposed_names(gateway)


def test_the_gateway_answers_the_deployments_probes(gateway):
    container = gateway_container()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        response = httpx.get(gateway.url + container[kind]["httpGet"]["path"], timeout=10)
        assert response.status_code == 200, (kind, response.status_code, response.text)
    assert httpx.get(gateway.url + "/health", timeout=10).status_code == 200


def not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, (response.status_code, response.text)
    assert response.json() == {"error": {"message": "not found", "type": "not_found_error", "param": None, "code": None}}


def test_metrics_are_served_on_the_metrics_port_only(gateway):
    """The API port's /metrics is an unknown path (an OpenAI-shaped 404, with the key or without, and out of the
    OpenAPI schema); the metrics port serves the series, and requests and refused keys are still counted there."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for headers in ({}, auth):
        not_found(httpx.get(gateway.url + "/metrics", headers=headers, timeout=10))
    not_found(httpx.get(gateway.url + "/no-such-path", headers=auth, timeout=10))
    assert "/metrics" not in httpx.get(gateway.url + "/openapi.json", timeout=10).json()["paths"]
    scraped = httpx.get(gateway.metrics + "/metrics", timeout=10)
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert 'safethink_requests_total{engine="hf",key="default",status="success"}' in scraped.text
    served, refused = series(gateway.metrics, "safethink_requests_total", key="default", status="success"), \
        series(gateway.metrics, "safethink_unauthorized_requests_total")
    gateway.client().chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert httpx.get(gateway.url + "/v1/models", timeout=10).status_code == 401
    assert series(gateway.metrics, "safethink_requests_total", key="default", status="success") == served + 1
    assert series(gateway.metrics, "safethink_unauthorized_requests_total") == refused + 1


def test_request_metrics_carry_the_api_key_id(gateway, prometheus):
    # This gateway's one key is --api-key: its traffic is counted under the key id `default`.
    c = gateway.client()
    c.chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=48,
                              temperature=0)
    deadline = time.monotonic() + 60
    while not query(prometheus, 'safethink_requests_total{status="success", key="default"} > 0'):
        assert time.monotonic() < deadline, f"no requests under key=default: {query(prometheus, 'safethink_requests_total')}"
        time.sleep(1)
    for metric in ("safethink_requests_total", "safethink_interventions_total", "safethink_refusals_total"):
        assert {r["metric"].get("key") for r in query(prometheus, metric)} <= {"default"}, metric
    (per_key,) = by_key = query(prometheus, rules()["safethink:intervention_rate_by_key:5m"]["expr"])
    assert per_key["metric"] == {"key": "default"} and float(per_key["value"][1]) > 0, by_key
