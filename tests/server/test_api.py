"""End to end over HTTP: real server subprocess, real SmolLM2, real probe scorer, official openai client."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.conftest import EMBEDDED_MODEL, running_server

API_KEY = "test-key"
MATH = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]


@pytest.fixture(scope="module")
def steered_url():
    # --threshold 0: every watched step breaches, so interventions are forced.
    with running_server("--threshold", "0", "--max-concurrent-sequences", "2", "--max-step-tokens", "24",
                        "--reasoning-budget", "64") as url:
        yield url


@pytest.fixture(scope="module")
def bare_url():
    with running_server("--early-steps", "0", "--api-key", API_KEY, "--max-body-bytes", "4096") as url:
        yield url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_forced_interventions_show_in_reasoning_response_and_metrics(steered_url):
    before = metric(steered_url, "safethink_interventions_total")
    r = client(steered_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=96, temperature=0)
    message = r.choices[0].message
    info = r.model_extra["safethink"]
    assert message.reasoning_content.startswith("Wait, think safely.")
    assert message.model_extra["reasoning"] == message.reasoning_content
    assert len(info["interventions"]) == 2, "max_interventions (2) injections with τ = 0"
    assert all(s["action"] == "replaced" for s in info["steps"])
    assert r.usage.completion_tokens >= info["injected_tokens"] > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert metric(steered_url, "safethink_interventions_total") == before + 2
    assert metric(steered_url, 'safethink_interventions_total{step="1"}') >= 2
    assert metric(steered_url, "safethink_steps_scored_total") >= 2
    assert metric(steered_url, "safethink_injected_tokens_total") >= info["injected_tokens"]


def test_streaming_parses_and_splits_reasoning_from_answer(steered_url):
    stream = client(steered_url).chat.completions.create(
        model=EMBEDDED_MODEL, messages=MATH, max_tokens=96, temperature=0, stream=True, stream_options={"include_usage": True})
    reasoning, answer, finish, usage, info = "", "", None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.model_extra.get("safethink"):
            info = chunk.model_extra["safethink"]
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            answer += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length")
    assert reasoning.startswith("Wait, think safely.")
    assert "<think>" not in reasoning + answer and "</think>" not in reasoning + answer
    assert usage is not None and usage.completion_tokens > 0
    assert info is not None and len(info["interventions"]) == 2
    # Streamed and non-streamed greedy runs of one request agree.
    full = client(steered_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=96, temperature=0)
    assert (full.choices[0].message.reasoning_content or "") == reasoning
    assert (full.choices[0].message.content or "") == answer


def test_early_steps_zero_scores_nothing(bare_url):
    r = client(bare_url, API_KEY).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=48, temperature=0)
    assert r.model_extra["safethink"]["steps"] == []
    assert metric(bare_url, "safethink_steps_scored_total") == 0
    assert metric(bare_url, "safethink_requests_total") >= 1


def test_two_concurrent_streams_keep_their_texts_apart(steered_url):
    prompts = [[{"role": "user", "content": "List three fruits."}], [{"role": "user", "content": "What is the capital of Italy?"}]]

    async def one(messages):
        c = openai.AsyncOpenAI(base_url=steered_url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = await c.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=48, temperature=0, seed=1)
        return (r.choices[0].message.reasoning_content or "") + "|" + (r.choices[0].message.content or "")

    async def both():
        return await asyncio.gather(*(one(p) for p in prompts))

    concurrent = asyncio.run(both())
    alone = [asyncio.run(one(p)) for p in prompts]
    assert concurrent == alone
    assert concurrent[0] != concurrent[1]


def test_disconnect_mid_stream_frees_the_engine_and_health_stays_responsive(steered_url):
    body = {"model": EMBEDDED_MODEL, "messages": MATH, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", steered_url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and "reasoning_content" in line:
                break
        # Generation is running: /health and /metrics answer meanwhile.
        assert httpx.get(steered_url + "/health", timeout=10).json()["running"] >= 1
        assert httpx.get(steered_url + "/metrics", timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    while httpx.get(steered_url + "/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "the engine slot was not freed after the client left"
        time.sleep(0.2)
    assert metric(steered_url, 'safethink_requests_total{engine="hf",status="aborted"}') >= 1


def post(url: str, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    h = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    if raw is not None:
        return httpx.post(url + "/v1/chat/completions", content=raw, headers={**h, "Content-Type": "application/json"})
    return httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=60)


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"]
    assert "Traceback" not in error["message"] and "pydantic" not in error["message"].lower()
    if param is not None:
        assert error["param"] == param
    return error


def test_error_shapes(bare_url):
    good = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert_error(post(bare_url, good, headers={"Authorization": "Bearer wrong"}), 401, "authentication_error")
    assert_error(httpx.post(bare_url + "/v1/chat/completions", json=good), 401, "authentication_error")
    assert_error(post(bare_url, {**good, "model": "nope"}), 404, "not_found_error", "model")
    assert_error(post(bare_url, {**good, "messages": [{"role": "robot", "content": "x"}]}), 400, "invalid_request_error", "messages.0.role")
    assert_error(post(bare_url, {"model": EMBEDDED_MODEL}), 400, "invalid_request_error", "messages")
    assert_error(post(bare_url, {**good, "messages": []}), 400, "invalid_request_error", "messages")
    assert_error(post(bare_url, {**good, "n": 2}), 400, "invalid_request_error", "n")
    assert_error(post(bare_url, {**good, "temperature": 5}), 400, "invalid_request_error", "temperature")
    assert_error(post(bare_url, {**good, "max_tokens": 10**6}), 400, "invalid_request_error", "messages")
    assert_error(post(bare_url, {**good, "safethink": {"early_steps": 0}}), 400, "invalid_request_error", "safethink")
    assert_error(post(bare_url, None, raw=b"{not json"), 400, "invalid_request_error")
    assert_error(post(bare_url, None, raw=json.dumps({**good, "pad": "x" * 8000}).encode()), 413, "invalid_request_error")
    assert_error(httpx.get(bare_url + "/v1/nothing-here"), 404, "not_found_error")
    # The server is still up and serving after all of that.
    assert post(bare_url, good).status_code == 200
