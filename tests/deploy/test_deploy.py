"""Deployment files, checked with the real tools: promtool, a real Prometheus scraping a real gateway,
a Kubernetes schema validator, hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import EMBEDDED_MODEL, free_port, running_server

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


def test_promtool_checks_and_unit_tests_the_alert_rules():
    out = run(tool("promtool"), "check", "rules", str(DEPLOY / "prometheus/rules.yml"))
    assert "SUCCESS: 7 rules found" in out
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", str(DEPLOY / "prometheus/rules_test.yml"))
    run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))


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


def test_dockerfile_lints_clean():
    run(tool("hadolint"), str(ROOT / "Dockerfile"))


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/safethink-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def readme_intervention_rate() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```promql\n(.+?)\n```", text, re.S).group(1).strip()


@pytest.fixture(scope="module")
def gateway():
    with running_server("--threshold", "0", "--max-step-tokens", "24", "--reasoning-budget", "64") as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(gateway, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/rules.yml")],
        "scrape_configs": [{"job_name": "safethink", "static_configs": [{"targets": [gateway.removeprefix("http://")]}]}],
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
    c = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=120)
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
    rules = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"][0]["rules"]
    assert {r["name"] for r in rules if r["type"] == "alerting"} == {
        "SafeThinkHighInterventionRate", "SafeThinkHighRefusalRate", "SafeThinkScorerErrors", "SafeThinkScorerSlow",
        "SafeThinkNoTraffic"}
