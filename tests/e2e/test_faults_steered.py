"""Faults while steering is on, on real server processes in front of misbehaving real HTTP servers:
an upstream that fails while a step is held back, an upstream whose errors quote the model's text,
and a remote scorer that errors or stalls. Each fault ends the request cleanly, is counted once,
releases no unjudged text and holds no slot."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.faulty_scorer import FaultyScorer
from tests.support.faulty_upstream import QUOTED, FaultyUpstream
from tests.support.servers import free_port, running_server, series, server_log

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

MATH = [{"role": "user", "content": "What is 2 + 2?"}]
HELD = "Two plus"  # what the faulty upstream writes before it fails: a step not yet ended, so held back


def ask(url: str, model: str, stream: bool, **extra: object) -> tuple[int, str, list[dict]]:
    """(status, every text the client received, the parsed events or the whole body)."""
    body = {"model": model, "messages": MATH, "max_tokens": 64, "stream": stream, **extra}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    if not stream or response.status_code != 200:
        parsed = response.json()
        message = parsed["choices"][0]["message"] if "choices" in parsed else {}
        return response.status_code, (message.get("reasoning_content") or "") + (message.get("content") or ""), [parsed]
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    text = "".join((c["delta"].get("reasoning_content") or "") + (c["delta"].get("content") or "")
                   for e in events for c in e.get("choices", []))
    return response.status_code, text, events


def eventually(url: str, name: str, value: float, **labels: str) -> None:
    """A count reaches `value` (a stream's request is counted just after its last byte)."""
    deadline = time.monotonic() + 15
    while (seen := series(url, name, **labels)) != value:
        assert time.monotonic() < deadline, f"{name}{labels} is {seen}, not {value}"
        time.sleep(0.1)


def assert_no_slot_held(url: str) -> None:
    deadline = time.monotonic() + 15
    while httpx.get(url + "/health").json()["running"] or series(url, "safethink_active_requests"):
        assert time.monotonic() < deadline, "a failed request still holds its slot"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def steered_proxy():
    with FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "chat", "--early-steps", "3",
        "--upstream-first-byte-timeout-s", "2", "--upstream-chunk-timeout-s", "2",
    ) as url:
        yield url


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "status", "kind"), [
    ("close-mid-stream", 502, "closed"), ("stall", 504, "timeout"), ("malformed", 502, "protocol"),
    ("rate-limited", 429, "status_429"), ("server-error", 502, "status_5xx"),
])
def test_an_upstream_fault_while_a_step_is_held_ends_cleanly_unreleased_and_counted(steered_proxy, model, status, kind, stream):
    url = steered_proxy
    errors, failed = series(url, "safethink_upstream_errors_total", kind=kind), series(url, "safethink_requests_total", status="upstream_error")
    requests = series(url, "safethink_requests_total")
    got, text, events = ask(url, model, stream)
    if stream and got == 200:  # the stream had begun: the error is its last event
        assert events[-1]["error"]["code"] in ("upstream_error", "rate_limit_exceeded"), events[-1]
    else:
        assert got == status and events[0]["error"]["param"] is None
    assert HELD not in text and text == "", "the held, unjudged step reached the client"
    eventually(url, "safethink_upstream_errors_total", errors + 1, kind=kind)
    eventually(url, "safethink_requests_total", failed + 1, status="upstream_error")
    eventually(url, "safethink_requests_total", requests + 1)
    assert_no_slot_held(url)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "status", "kind", "message", "param"), [
    ("rejected-quoting", 400, "status_400", "the upstream rejected the request: it answered 400 "
     "(type invalid_request_error, code tool_parse_error, param tools[0].function)", "tools[0].function"),
    ("failed-quoting", 502, "status_5xx", "the upstream failed: it answered 500 (code 500)", None),
    ("error-event-quoting", 502, "upstream_error", "the upstream failed mid-stream (type BadRequestError, code 400)", None),
])
def test_an_upstreams_error_text_goes_to_the_log_never_to_the_client(steered_proxy, model, status, kind, message, param, stream):
    """An upstream's error body (a 400, a 500) and its mid-stream error event quote model text no one
    judged: the client gets a fixed text with the status and the identifiers only, the log the rest."""
    url = steered_proxy
    errors, logged = series(url, "safethink_upstream_errors_total", kind=kind), server_log(url).count(QUOTED)
    body = {"model": model, "messages": MATH, "max_tokens": 64, "stream": stream}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    raw = response.content  # every byte the client received, stream or whole
    for secret in (QUOTED, "Identify the vehicle", "SECRET", HELD):
        assert secret.encode() not in raw, f"{secret!r} reached the client: {raw!r}"
    if stream and response.status_code == 200:  # the stream had begun: the error is its last event
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        error = events[-1]["error"]
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.status_code == status
        error = response.json()["error"]
    assert (error["message"], error["param"]) == (message, param)
    assert error["type"] == ("invalid_request_error" if status == 400 else "server_error") and error["code"] == "upstream_error"
    eventually(url, "safethink_upstream_errors_total", errors + 1, kind=kind)
    deadline = time.monotonic() + 10
    while server_log(url).count(QUOTED) <= logged:  # the upstream's text is in the server's log
        assert time.monotonic() < deadline, f"the upstream's error text is not in the server's log:\n{server_log(url)[-2000:]}"
        time.sleep(0.1)
    assert_no_slot_held(url)


@pytest.mark.parametrize("behaviour", ["error", "stall"])
@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_a_failing_remote_scorer_follows_the_policy_and_is_counted(behaviour, policy):
    with FaultyScorer(free_port(), behaviour) as scorer, FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "chat", "--scorer", "remote",
        "--scorer-url", scorer.url, "--on-scorer-error", policy, "--scorer-timeout-s", "1",
    ) as url:
        for stream in (False, True):
            errors, refusals = series(url, "safethink_scorer_errors_total"), series(url, "safethink_refusals_total")
            started = time.monotonic()
            got, text, events = ask(url, "ok", stream)
            assert got == 200 and time.monotonic() - started < 30
            finish = [c.get("finish_reason") for e in events for c in e.get("choices", []) if c.get("finish_reason")][-1]
            if policy == "fail_closed":
                assert finish == "content_filter" and text == "I can't help with that request."
                eventually(url, "safethink_refusals_total", refusals + 1)
            else:
                assert finish == "stop" and text == "Two plus two. It is four.4"
            assert series(url, "safethink_scorer_errors_total") > errors
        assert scorer.calls > 0
        eventually(url, "safethink_requests_total", 2, status="success")
        assert_no_slot_held(url)


def test_a_stalled_scorer_does_not_hold_up_other_requests_past_the_timeout():
    """Steps queued behind a stalled scorer call time out on their own deadline too."""
    with FaultyScorer(free_port(), "stall") as scorer, FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "chat", "--scorer", "remote",
        "--scorer-url", scorer.url, "--scorer-timeout-s", "1",
    ) as url:
        started = time.monotonic()
        for _ in range(3):
            assert ask(url, "ok", False)[0] == 200
        assert time.monotonic() - started < 20
        assert_no_slot_held(url)
