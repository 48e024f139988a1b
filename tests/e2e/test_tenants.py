"""API keys with their own policies, per-key metrics, and the audit log: the keyring as properties,
the rest on real server processes."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from safethink_server.config import ServerSettings
from safethink_server.schema import PolicyConfig
from safethink_server.tenants import ANONYMOUS, KeyConfig, Keyring
from tests.support.servers import EMBEDDED_MODEL, LOG_DIR, free_port, running_server, series

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

TOKEN = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)


@given(st.lists(st.tuples(IDS, TOKEN), min_size=1, max_size=6, unique_by=(lambda k: k[0], lambda k: k[1])), TOKEN,
       st.sampled_from(["Bearer", "bearer", "BEARER"]), st.sampled_from(["", " ", "\t", "  "]))
def test_each_key_opens_its_own_tenant_and_nothing_else_opens_any(keys, other, scheme, pad):
    keys = [(i, v) for i, v in keys if i != ANONYMOUS]
    keyring = Keyring([KeyConfig(id=i, key=v) for i, v in keys], PolicyConfig(), False, False)
    for key_id, value in keys:
        tenant = keyring.tenant(f"{scheme} {pad}{value}{pad}")
        assert tenant is not None and tenant.id == key_id
        assert keyring.tenant(f"Basic {value}") is None
        assert keyring.tenant(value) is None
    if other not in {v for _, v in keys}:
        assert keyring.tenant(f"Bearer {other}") is None
    assert keyring.tenant("") is None


PERMISSION = st.none() | st.booleans()


@given(st.floats(0, 1), st.integers(0, 20), st.booleans(), PERMISSION, st.booleans(), PERMISSION, st.booleans())
def test_a_key_policy_replaces_only_the_fields_it_sets(threshold, early_steps, sets_threshold, overrides, server_overrides,
                                                       prefill, server_prefill):
    server = PolicyConfig(threshold=0.5, early_steps=3, prefix="Server prefix.")
    policy = {"threshold": threshold} if sets_threshold else {}
    key = KeyConfig(id="k", key="secret", policy={**policy, "early_steps": early_steps}, allow_client_overrides=overrides,
                    allow_assistant_prefill=prefill)
    tenant = Keyring([key], server, server_overrides, server_prefill).tenant("Bearer secret")
    assert tenant is not None
    assert tenant.policy.threshold == (threshold if sets_threshold else 0.5)
    assert (tenant.policy.early_steps, tenant.policy.prefix) == (early_steps, "Server prefix.")
    assert tenant.allow_client_overrides == (server_overrides if overrides is None else overrides)
    assert tenant.allow_assistant_prefill == (server_prefill if prefill is None else prefill)


def test_a_server_without_keys_serves_everyone_as_anonymous():
    keyring = Keyring([], PolicyConfig(), True, False)
    assert keyring.tenant("").id == ANONYMOUS and keyring.tenant("Bearer anything").id == ANONYMOUS


@pytest.mark.parametrize("keys", [
    [{"id": "a", "key": "x"}, {"id": "a", "key": "y"}],
    [{"id": "a", "key": "x"}, {"id": "b", "key": "x"}],
    [{"id": "a", "key": "  "}],
    [{"id": "has space", "key": "x"}],
    [{"id": ANONYMOUS, "key": "x"}],
    [{"id": "a", "key": "x", "policy": {"threshold": 2}}],
    [{"id": "a", "key": "x", "policy": {"no_such_field": 1}}],
])
def test_bad_key_sets_are_refused_at_startup(keys, monkeypatch):
    monkeypatch.setenv("SAFETHINK_API_KEYS", json.dumps(keys))
    with pytest.raises((ValidationError, ValueError)):
        ServerSettings()


@pytest.mark.parametrize("text", ['keys:\n  - id: a\n    key: "sk-TOPSECRET\n', '{"keys": [{"id": "a", "key": "sk-TOPSECRET"', "keys:\n  - id: a\n    key: sk-TOPSECRET\n    extra: 1\n",
                                  "keys:\n  - id: a\n    key: x\n    sk-TOPSECRET: 1\n"])
def test_a_broken_keys_file_stops_the_server_without_quoting_a_key(tmp_path, text):
    for name in ("keys.yaml", "keys.json"):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValidationError) as caught:
            ServerSettings(api_keys_file=path, api_key="sk-TOPSECRET-TOO")
        assert "TOPSECRET" not in str(caught.value) and str(path) in str(caught.value)


# --- on a real server ------------------------------------------------------------------------------

EVAL_KEY, APP_KEY, OPS_KEY, QUIET_KEY = "eval-team-secret-1", "application-secret-2", "ops-secret-3", "quiet-secret-4"
KEYS = {"keys": [
    {"id": "eval", "key": EVAL_KEY, "policy": {"threshold": 0.0, "early_steps": 2, "max_interventions": 1}, "allow_client_overrides": True,
     "allow_assistant_prefill": True, "report": "full"},
    {"id": "app", "key": APP_KEY},
    {"id": "ops", "key": OPS_KEY, "policy": {"threshold": 0.0, "early_steps": 2, "max_interventions": 1}},  # the keyed default: actions
    {"id": "quiet", "key": QUIET_KEY, "policy": {"threshold": 0.0, "early_steps": 2, "max_interventions": 1}, "report": "none"},
]}
ASK = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "How do plants grow?"}], "max_tokens": 48}


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    (folder / "keys.yaml").write_text(json.dumps(KEYS))  # JSON is YAML
    audit = folder / "audit.jsonl"
    with running_server("--api-keys-file", str(folder / "keys.yaml"), "--threshold", "1.0", "--max-step-tokens", "12",
                        "--audit-log", str(audit)) as url:
        yield url, audit


def post(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def audit_lines(path, at_least: int = 0) -> list[dict]:  # type: ignore[no-untyped-def]
    """The log's lines, once it has `at_least` (a stream's line is written after its last byte)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_each_key_gets_its_own_policy_permissions_and_metrics(keyed_server):
    url, audit = keyed_server
    before = {key: series(url, "safethink_interventions_total", key=key) for key in ("eval", "app")}
    steered = post(url, EVAL_KEY, ASK)
    plain = post(url, APP_KEY, ASK)
    assert steered.status_code == plain.status_code == 200
    steered_report, plain_report = steered.json()["safethink"], plain.json()["safethink"]
    assert steered_report["interventions"] and all(s["p_unsafe"] is not None for s in steered_report["steps"])
    assert len(steered_report["steps"]) <= 2 + 1  # the eval key's early_steps (and the refusal's breach)
    assert not plain_report["interventions"]
    assert series(url, "safethink_interventions_total", key="eval") == before["eval"] + len(steered_report["interventions"])
    assert series(url, "safethink_interventions_total", key="app") == before["app"]

    override = {**ASK, "safethink": {"early_steps": 0}}
    assert post(url, EVAL_KEY, override).status_code == 200
    refused = post(url, APP_KEY, override)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "safethink"
    assert series(url, "safethink_requests_total", key="app", status="invalid") >= 1
    assert post(url, "not-a-key", ASK).status_code == 401

    prefill = {**ASK, "messages": [*ASK["messages"], {"role": "assistant", "content": "Sure"}], "continue_final_message": True,
               "add_generation_prompt": False, "safethink": None}
    assert post(url, EVAL_KEY, prefill).status_code == 200
    assert post(url, APP_KEY, prefill).json()["error"]["param"] == "continue_final_message"
    raw = {"model": EMBEDDED_MODEL, "prompt": "Plants grow", "max_tokens": 4}
    assert httpx.post(url + "/v1/completions", json=raw, headers={"Authorization": f"Bearer {EVAL_KEY}"}, timeout=60).status_code == 200
    refused_raw = httpx.post(url + "/v1/completions", json=raw, headers={"Authorization": f"Bearer {APP_KEY}"}, timeout=60)
    assert refused_raw.status_code == 400 and refused_raw.json()["error"]["code"] == "raw_prompt_not_allowed"

    metrics = httpx.get(url + "/metrics").text
    assert EVAL_KEY not in metrics and APP_KEY not in metrics and 'key="anonymous"' not in metrics


def test_the_audit_log_has_one_line_per_request_naming_the_key_by_id(keyed_server):
    url, audit = keyed_server
    seen = len(audit_lines(audit))
    served = post(url, EVAL_KEY, ASK)
    streamed = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": True}, headers={"Authorization": f"Bearer {APP_KEY}"},
                          timeout=120)
    audit_lines(audit, seen + 2)
    invalid = post(url, APP_KEY, {**ASK, "model": "no-such-model"})
    unauthenticated = post(url, "wrong-key", {"deeply": json.loads("[" * 100 + "]" * 100)})  # refused before the body is read
    assert (served.status_code, streamed.status_code, invalid.status_code, unauthenticated.status_code) == (200, 200, 404, 401)
    lines = audit_lines(audit, seen + 4)[seen:]
    assert len(lines) == 4
    first, second, third, fourth = lines
    assert (fourth["key"], fourth["status"], fourth["error"]["status"]) == ("unauthenticated", "unauthorized", 401)
    assert first["request_id"] == served.headers["x-request-id"] and second["request_id"] == streamed.headers["x-request-id"]
    assert (first["key"], second["key"], third["key"]) == ("eval", "app", "app")
    assert (first["status"], second["status"], third["status"]) == ("success", "success", "invalid")
    report = served.json()["safethink"]
    choice = first["choices"][0]
    assert choice["steps"] == report["steps"] and choice["interventions"] == len(report["interventions"])
    assert choice["refusal"] == (report["refusal"] is not None)
    assert choice["finish_reason"] == served.json()["choices"][0]["finish_reason"]
    assert first["completion_tokens"] == served.json()["usage"]["completion_tokens"] and first["ttft_s"] <= first["duration_s"]
    assert second["stream"] is True and third["error"]["status"] == 404
    text = audit.read_text()
    assert EVAL_KEY not in text and APP_KEY not in text
    assert "plants" not in text and "output" not in text and "prompt\"" not in text  # no text unless configured


def test_the_audit_log_holds_the_text_only_where_configured():
    audit = LOG_DIR / f"audit-{free_port()}.jsonl"
    with running_server("--audit-log", str(audit), "--audit-log-text", "--early-steps", "0") as url:
        served = httpx.post(url + "/v1/chat/completions", json=ASK, timeout=120).json()
    (line,) = audit_lines(audit)
    assert line["key"] == ANONYMOUS and line["prompt"]["messages"][0]["content"] == "How do plants grow?"
    message = served["choices"][0]["message"]
    assert line["choices"][0]["output"] == (message.get("reasoning_content") or "") + message["content"]


def test_a_keys_clients_get_only_the_report_it_discloses(keyed_server):
    """With keys, a client gets actions and counts but no score and no size of a withheld text (an
    adaptive attacker could search with them) unless its key says `full`; `none` sends no report. The
    audit log keeps it all."""
    url, audit = keyed_server
    seen = len(audit_lines(audit))
    full, actions, quiet = (post(url, key, ASK) for key in (EVAL_KEY, OPS_KEY, QUIET_KEY))
    streamed = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": True}, headers={"Authorization": f"Bearer {OPS_KEY}"},
                          timeout=120)
    assert all(r.status_code == 200 for r in (full, actions, quiet, streamed))
    assert all(s.get("p_unsafe") is not None and s["tokens"] is not None for s in full.json()["safethink"]["steps"])
    assert full.json()["safethink"]["withheld_tokens"] + full.json()["safethink"]["discarded_tokens"] > 0
    for report in (actions.json()["safethink"], actions.json()["choices"][0]["safethink"],
                   json.loads([line for line in streamed.text.splitlines() if "\"safethink\"" in line][-1][6:])["safethink"]):
        assert report["steps"] and report["interventions"] and report["refusal"], "the actions are told"
        assert all("p_unsafe" not in s and "score_ms" not in s for s in report["steps"]), "a score reached the client"
        assert all("tokens" not in s and "section" not in s for s in report["steps"] if s["action"] != "released"), "a withheld step's size reached the client"
        assert all("p_unsafe" not in i and "discarded_tokens" not in i for i in report["interventions"])
        assert "withheld_tokens" not in report and "discarded_tokens" not in report
    assert "safethink" not in quiet.json() and "safethink" not in quiet.json()["choices"][0]
    logged = audit_lines(audit, seen + 4)[seen:]
    ops = next(line for line in logged if line["key"] == "ops")
    assert ops["choices"][0]["steps"] and all(s["p_unsafe"] is not None for s in ops["choices"][0]["steps"])
