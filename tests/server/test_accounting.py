"""Every request accounted for, in-process over the scripted engine: whatever a client sends (a good
request, whole or streamed, a body the schema refuses, no key, a body over the limit, a wrong method,
an unknown model, a route without a tracker), its response carries an `x-request-id`, its audit line
carries the same id, and each request to a generation route is counted once in
safethink_requests_total with its status."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_models.base import Scorer, StepScore
from safethink_server.api.accounting import ROUTES
from safethink_server.api.app import create_app
from safethink_server.config import ServerSettings
from tests.server.test_api_properties import MODEL, AppEngine

KEY = "accounting-test-key"
GENERATION = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions", "/v1/responses": "responses"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# name -> (method, path, body, with the key, expected status, expected counted status)
REQUESTS: dict[str, tuple[str, str, Any, bool, int, str]] = {
    "served": ("POST", "/v1/chat/completions", CHAT, True, 200, "success"),
    "streamed": ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, True, 200, "success"),
    "raw prompt": ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4}, True, 200, "success"),
    "schema refused": ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "not a list"}, True, 400, "invalid"),
    "not JSON": ("POST", "/v1/completions", "{", True, 400, "invalid"),
    "no key": ("POST", "/v1/chat/completions", CHAT, False, 401, "unauthorized"),
    "no key, streamed": ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "stream": True}, False, 401, "unauthorized"),
    "over the limit": ("POST", "/v1/chat/completions", {**CHAT, "user": "x" * 5000}, True, 413, "invalid"),
    "wrong method": ("GET", "/v1/chat/completions", None, True, 405, "invalid"),
    "unknown model": ("POST", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}, True, 404, "invalid"),
    "tokenize": ("POST", "/tokenize", {"prompt": "hi"}, True, 200, "success"),
    "unknown route": ("POST", "/v1/nothing", {}, True, 404, "invalid"),
}


class Quiet(Scorer):
    name = "quiet"

    def score_batch(self, items: Any) -> list[StepScore]:
        return [StepScore(p_unsafe=0.0) for _ in items]


async def send_all(names: list[str], audit_path: str) -> tuple[list[httpx.Response], dict[tuple[str, str], float]]:
    engine = AppEngine([], [1])
    engine.script = [engine.tokenizer.ids[p] for p in ["a", ".\n\n"]] + [engine.tokenizer.eos_token_id]
    app = create_app(ServerSettings(api_key=KEY, audit_log=audit_path, max_body_bytes=2048, scorer_max_wait_ms=0,
                                    allow_assistant_prefill=True), engine, Quiet())
    responses = []
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for name in names:
                method, path, body, keyed, _, _ = REQUESTS[name]
                headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"} if keyed else {}
                content = None if body is None else body if isinstance(body, str) else json.dumps(body)
                responses.append(await client.request(method, path, content=content, headers=headers))
    registry = app.state.safethink.metrics.registry
    counted = {(sample.labels["status"], sample.labels["key"]): sample.value for metric in registry.collect()
               if metric.name == "safethink_requests" for sample in metric.samples if sample.name.endswith("_total")}
    return responses, counted


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(REQUESTS)), min_size=1, max_size=8))
def test_every_request_has_an_id_an_audit_line_and_a_count(tmp_path_factory, names):
    audit_path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    responses, counted = asyncio.run(send_all(names, str(audit_path)))
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids), ids
    for name, response in zip(names, responses, strict=True):
        assert response.status_code == REQUESTS[name][4], (name, response.text)
    lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ids, "one audit line per request, in order, with the response's id"
    for name, line in zip(names, lines, strict=True):
        _, path, _, keyed, status, as_counted = REQUESTS[name]
        assert line["status"] == as_counted and line["key"] == ("default" if keyed else "unauthenticated"), (name, line)
        assert line["route"] == ROUTES.get(path, "unknown") and (line.get("error") is None) == (status < 400), (name, line)
    expected: dict[tuple[str, str], int] = {}
    for name in names:
        _, path, _, keyed, _, as_counted = REQUESTS[name]
        if path in GENERATION:
            label = (as_counted, "default" if keyed else "unauthenticated")
            expected[label] = expected.get(label, 0) + 1
    assert {label: value for label, value in counted.items() if value} == expected


class BrokenModels(AppEngine):
    def model_ids(self) -> list[str]:
        raise RuntimeError("a bug")


def test_an_unhandled_error_is_a_500_with_an_id_and_an_audit_line(tmp_path):
    async def scenario() -> httpx.Response:
        app = create_app(ServerSettings(audit_log=str(tmp_path / "audit.jsonl")), BrokenModels([], [1]), Quiet())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await client.get("/v1/models")

    response = asyncio.run(scenario())
    assert response.status_code == 500 and response.json()["error"]["message"] == "internal server error", response.text
    [line] = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert (line["request_id"], line["status"], line["route"]) == (response.headers["x-request-id"], "error", "models")


def test_a_client_gone_while_its_body_is_read_is_counted_aborted(tmp_path):
    """It sent part of its body and left: not an invalid request of its own."""
    async def scenario() -> dict[tuple[str, str], float]:
        app = create_app(ServerSettings(audit_log=str(tmp_path / "audit.jsonl")), AppEngine([], [1]), Quiet())
        messages = iter([{"type": "http.request", "body": b'{"model": "scr', "more_body": True}, {"type": "http.disconnect"}])

        async def receive() -> dict[str, Any]:
            return next(messages, {"type": "http.disconnect"})

        async def send(message: dict[str, Any]) -> None:
            return None

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "client": ("test", 1), "server": ("test", 80)}
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        registry = app.state.safethink.metrics.registry
        return {(sample.labels["status"], sample.labels["key"]): sample.value for metric in registry.collect()
                if metric.name == "safethink_requests" for sample in metric.samples if sample.name.endswith("_total") and sample.value}

    assert asyncio.run(scenario()) == {("aborted", "anonymous"): 1.0}
    [line] = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["status"] == "aborted"


def test_a_judged_steps_time_is_in_its_record_and_its_wait_is_counted_as_first_or_later():
    """Each judged step's record says where its time went, and the wait of a response's first step
    (nothing released yet) is counted apart from later steps'."""
    async def scenario() -> tuple[dict[str, Any], dict[str, float]]:
        engine = AppEngine([], [1])
        engine.script = [engine.tokenizer.ids[p] for p in ["a", ".\n\n", "b", ".\n\n"]] + [engine.tokenizer.eos_token_id]
        app = create_app(ServerSettings(scorer_max_wait_ms=0), engine, Quiet())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                reply = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 16})).json()
        registry = app.state.safethink.metrics.registry
        waits = {sample.labels["step"]: sample.value for metric in registry.collect() if metric.name == "safethink_step_score_wait_seconds"
                 for sample in metric.samples if sample.name.endswith("_count")}
        return reply, waits

    reply, waits = asyncio.run(scenario())
    steps = reply["safethink"]["steps"]
    assert len(steps) >= 2, steps
    for step in steps:
        assert step["generation_ms"] >= 0 and step["queue_ms"] >= 0 and step["forward_ms"] >= 0, step
        assert step["queue_ms"] + step["forward_ms"] <= step["score_ms"] + 1.0, step  # parts of the step's wait
    assert waits == {"first": 1.0, "later": float(len(steps) - 1)}, waits
