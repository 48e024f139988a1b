"""Hostile and malformed requests against a real `safethink serve --engine hf --api-key ...` process:
each gets an OpenAI-shaped 4xx (never a 5xx, a dropped connection or a hang), and the server serves
normally afterwards with no slot held. Then schemathesis fuzzes every route of its OpenAPI schema."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as sc
from schemathesis.generation.modes import GenerationMode

from tests.support.servers import EMBEDDED_MODEL, running_server, series

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"


def raw(template: str) -> bytes:
    """A body written by hand (what json.dumps cannot write: NaN, lone surrogates, repeated depth)."""
    return template.replace("MODEL", EMBEDDED_MODEL).encode("utf-8", "surrogatepass")


# (path, body, expected status, expected param or None)
CASES = {
    "seed beyond 64 bits": (CHAT, {**BASE, "seed": 2**64}, 400, "seed"),
    "seed beyond 64 bits, streamed": (CHAT, {**BASE, "seed": 2**64, "stream": True}, 400, "seed"),
    "max_tokens beyond 64 bits": (CHAT, {**BASE, "max_tokens": 2**70}, 400, "max_tokens"),
    "lone surrogate in a message": (CHAT, raw('{"model":"MODEL","messages":[{"role":"user","content":"\\ud800"}]}'), 400,
                                    "messages[0].content"),
    "lone surrogate in a key": (CHAT, raw('{"model":"MODEL","messages":[{"role":"user","content":"hi"}],"\\udc00":1}'), 400, None),
    "lone surrogate to /tokenize": ("/tokenize", raw('{"model":"MODEL","prompt":"\\udfff"}'), 400, "prompt"),
    "lone surrogate to /v1/responses": (RESPONSES, raw('{"model":"MODEL","input":"x\\ud83d"}'), 400, "input"),
    "nested 20,000 levels": (CHAT, raw('{"model":"MODEL","messages":[],"x":' + "[" * 20000 + "]" * 20000 + "}"), 400, None),
    "nested 100 levels in tools": (CHAT, {**BASE, "tools": [json.loads('{"a":' * 100 + "1" + "}" * 100)]}, 400, None),
    "NaN temperature": (CHAT, raw('{"model":"MODEL","messages":[{"role":"user","content":"hi"}],"temperature":NaN}'), 400, None),
    "infinite penalty": (CHAT, raw('{"model":"MODEL","messages":[{"role":"user","content":"hi"}],"presence_penalty":1e999}'), 400, None),
    "invalid UTF-8": (CHAT, b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}', 400, None),
    "not JSON": (CHAT, b"{{{", 400, None),
    "empty body": (CHAT, b"", 400, None),
    "a JSON array": (CHAT, [1, 2], 400, None),
    "body over the limit": (CHAT, {**BASE, "messages": [{"role": "user", "content": "a" * 1_100_000}]}, 413, None),
    "too many messages": (CHAT, {**BASE, "messages": [{"role": "user", "content": "a"}] * 5000}, 400, "messages"),
    "an image part": (CHAT, {**BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                      400, "messages.0.content"),
    "a part without a type": (CHAT, {**BASE, "messages": [{"role": "user", "content": [{"text": "hi"}]}]}, 400, "messages.0.content"),
    "content a number": (CHAT, {**BASE, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    "n in the thousands": (CHAT, {**BASE, "n": 10**6}, 400, "n"),
    "top_logprobs huge": (CHAT, {**BASE, "logprobs": True, "top_logprobs": 10**9}, 400, "top_logprobs"),
    "a thousand tools": (CHAT, {**BASE, "tools": [{"type": "function", "function": {"name": "f"}}] * 1000}, 400, "tools"),
    "logit_bias key beyond 64 bits": (CHAT, {**BASE, "logit_bias": {str(2**70): 1}}, 400, "logit_bias"),
    "a prompt id beyond 64 bits": (COMPLETIONS, {"model": EMBEDDED_MODEL, "prompt": [2**70]}, 400, "prompt[0]"),
    "a negative prompt id": (COMPLETIONS, {"model": EMBEDDED_MODEL, "prompt": [-5]}, 400, "prompt"),
    "a detokenize id beyond 64 bits": ("/detokenize", {"model": EMBEDDED_MODEL, "tokens": [2**70]}, 400, "tokens[0]"),
    "a context beyond the model's": (CHAT, {**BASE, "messages": [{"role": "user", "content": "word " * 150_000}]}, 400, "messages"),
}


@pytest.fixture(scope="module")
def server_url():
    with running_server("--engine", "hf", "--api-key", KEY, "--allow-assistant-prefill", "--default-max-tokens", "8",
                        "--max-model-len", "64") as url:
        yield url


def send(url: str, path: str, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"] and error["type"], error
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_request_gets_an_openai_shaped_4xx(server_url, case):
    path, body, status, param = CASES[case]
    assert_openai_error(send(server_url, path, body), status, param)


def test_without_a_key_the_body_is_never_read(server_url):
    deep = raw('{"model":"MODEL","x":' + "[" * 20000 + "]" * 20000 + "}")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(server_url + CHAT, content=deep, headers={**headers, "Content-Type": "application/json"}, timeout=30)
        assert_openai_error(response, 401)


def test_only_health_and_metrics_answer_without_the_key(server_url):
    refused = series(server_url, "safethink_unauthorized_requests_total")
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert httpx.get(server_url + path, timeout=10).status_code == 200, path
    protected = [("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", CHAT), ("POST", COMPLETIONS),
                 ("POST", RESPONSES), ("GET", "/health/"), ("GET", "/METRICS")]
    for method, path in protected:
        assert_openai_error(httpx.request(method, server_url + path, json={}, timeout=10), 401)
    assert series(server_url, "safethink_unauthorized_requests_total") == refused + len(protected)


def test_a_body_over_the_limit_without_a_length_is_a_413(server_url):
    def chunks():  # sent chunked: the limit is found while reading, not from Content-Length
        yield b'{"model":"m","messages":[{"role":"user","content":"'
        for _ in range(1200):
            yield b"a" * 1000
        yield b'"}]}'

    response = httpx.post(server_url + CHAT, content=chunks(), headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert_openai_error(response, 413)


def test_after_the_abuse_the_server_serves_and_holds_no_slot(server_url):
    for case in ("seed beyond 64 bits, streamed", "lone surrogate in a message", "nested 20,000 levels"):
        path, body, status, _ = CASES[case]
        assert send(server_url, path, body).status_code == status
    served = send(server_url, CHAT, BASE)
    assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] in ("stop", "length")
    health = httpx.get(server_url + "/health", timeout=10).json()
    assert (health["status"], health["running"], health["waiting"]) == ("ok", 0, 0)


OPERATIONS = [("POST", CHAT), ("POST", COMPLETIONS), ("POST", RESPONSES), ("POST", "/tokenize"), ("POST", "/detokenize"),
              ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/health/live"), ("GET", "/health/ready"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def api_schema(server_url):
    return schemathesis.openapi.from_url(server_url + "/openapi.json")


def test_the_schema_documents_every_route(api_schema):
    routes = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert routes == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), [(method, path, mode) for method, path in OPERATIONS for mode in GenerationMode
                                                     if method == "POST" or mode == GenerationMode.POSITIVE])  # a GET has no body
def test_schemathesis_every_answer_is_documented_and_openai_shaped(server_url, api_schema, method, path, mode):
    """Generated bodies, invalid and valid, for every route (bounded): no 5xx, a documented status and
    content type, and errors shaped like OpenAI's."""
    operation = api_schema[path][method]

    @given(operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def answers(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call(base_url=server_url, headers=AUTH, timeout=120)
        case.validate_response(response, checks=[sc.not_a_server_error, sc.status_code_conformance, sc.content_type_conformance])
        if response.status_code >= 400 and not path.startswith("/health"):
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error) and error["message"], error

    answers()
