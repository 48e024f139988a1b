"""Every request field honoured or refused by name (the table in docs/api.md), and what honouring means:
logprobs of the released tokens only, n choices each steered on its own, sampling fields that change
the answer. Real servers, the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from safethink_server.api.fields import is_neutral, refused_field
from safethink_server.api.protocol import ChatCompletionRequest, ChatMessage
from tests.support.openai_fields import EXAMPLES, HONOURED, check_vllm_sampling_fields, refused_param
from tests.support.servers import EMBEDDED_MODEL, running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

MATH = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]
UNSTEERED = {"safethink": {"early_steps": 0}}


@pytest.fixture(scope="module")
def hf_url():
    with running_server("--allow-client-overrides", "--max-concurrent-sequences", "2", "--threshold", "0",
                        "--max-step-tokens", "12") as url:
        yield url


@pytest.fixture(scope="module")
def plain_url():
    """An upstream that does not steer, for the proxy (which steers)."""
    with running_server("--early-steps", "0", "--allow-assistant-prefill") as url:
        yield url


@pytest.fixture(scope="module")
def proxy_url(plain_url):
    with running_server("--engine", "upstream", "--upstream-url", plain_url + "/v1", "--upstream-mode", "chat", "--threshold", "0",
                        "--max-step-tokens", "12",
                        "--max-interventions", "1", "--on-budget-exhausted", "release") as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def send(url: str, fields: dict) -> httpx.Response:
    body = {"model": EMBEDDED_MODEL, "messages": MATH, "max_tokens": 8, **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def check_cell(url: str, engine: str, example: str, upstream: str | None = None) -> None:
    """`upstream`: the engine behind the proxy, which gets the fields the proxy passes through."""
    response = send(url, EXAMPLES[example])
    if example in HONOURED[engine] and (upstream is None or example in HONOURED[upstream]):
        assert response.status_code == 200, response.text
        assert_honoured(url, example, response.json())
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == refused_param(example), error
        assert error["type"] == "invalid_request_error" and refused_param(example) in error["message"]


def assert_honoured(url: str, example: str, body: dict) -> None:
    """What an honoured field visibly does to one response (the sampling fields' effect on the text,
    min_tokens' included, is `test_sampling_fields_change_the_answer`'s)."""
    choices = body["choices"]
    assert [c["message"]["role"] for c in choices] == ["assistant"] * (2 if example == "n" else 1)
    logprobs = choices[0].get("logprobs")
    if example == "logprobs":
        entries = logprobs["content"]
        # two alternatives each, or none: inside the watched window alternatives are withheld (they could
        # show text never judged), and whether a blank token lands there depends on the upstream's events
        assert all(len(e["top_logprobs"]) in (0, 2) for e in entries), logprobs
        # at the proxy's threshold 0 every step is replaced or withheld: 8 tokens may release no model text
        message, report = choices[0]["message"], body.get("safethink") or {}
        released = (message.get("reasoning_content") or "") + (message.get("content") or "")
        for inserted in report.get("inserted", []):
            released = released.replace(inserted["text"], "", 1)
        assert entries or not released.strip(), body
    else:
        assert logprobs is None
    if example == "seed":
        again = send(url, EXAMPLES[example]).json()["choices"][0]["message"]
        assert again == choices[0]["message"], "the same seed samples the same answer"


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_hf_honours_or_refuses(plain_url, example):
    """On the server that does not steer: at hf_url's threshold 0 every step is withheld, and with it
    what logprobs or min_tokens visibly do."""
    check_cell(plain_url, "hf", example)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_upstream_honours_or_refuses(proxy_url, example):
    check_cell(proxy_url, "upstream", example, upstream="hf")


def test_neutral_values_ask_for_nothing():
    neutral = {"n": 1, "frequency_penalty": 0, "logprobs": False, "tool_choice": "none", "tools": [], "echo": False, "best_of": 1,
               "response_format": {"type": "text"}, "top_k": -1, "repetition_penalty": 1.0, "logit_bias": {}, "min_tokens": 0,
               "parallel_tool_calls": True, "top_logprobs": 0}
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": MATH, **neutral})
    assert refused_field(body, frozenset({"model", "messages"})) is None
    assert not is_neutral("n", 2) and not is_neutral("top_k", 1) and not is_neutral("frequency_penalty", 0.1)
    assert not is_neutral("tool_choice", "required") and not is_neutral("response_format", {"type": "json_object"})
    for unknown in ({"thinking_token_budget": 0}, {"prompt_logprobs": 0}, {"guided_choice": []}):
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": MATH, **unknown})
        assert refused_field(body, frozenset({"model", "messages"})) == next(iter(unknown)), "an unknown field may mean something at 0"


def test_logprobs_cover_the_released_tokens_and_never_a_discarded_step(hf_url):
    """τ = 0: every watched step is discarded. Its tokens are not in the final sequence, and their
    logprobs (token text) never reach the client, streamed or not."""
    r = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=48, temperature=0,
                                                logprobs=True, top_logprobs=3)
    info = r.model_extra["safethink"]
    assert info["discarded_tokens"] > 0
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens - info["injected_tokens"]
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert entry.bytes == list(entry.token.encode())
    streamed = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=48, temperature=0,
                                                       logprobs=True, stream=True, stream_options={"include_usage": True})
    tokens = []
    for chunk in streamed:
        for choice in chunk.choices:
            tokens += [e.token for e in (choice.logprobs.content if choice.logprobs else None) or []]
    assert tokens == [e.token for e in entries]


def test_n_choices_are_steered_each_on_its_own(hf_url):
    r = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=40, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1]
    reports = [c.model_extra["safethink"] for c in r.choices]
    assert all(report["interventions"] for report in reports), "τ = 0: each choice is steered"
    assert r.model_extra["safethink"] == reports[0]
    assert r.choices[0].message.reasoning_content != r.choices[1].message.reasoning_content, "each choice has its own seed"

    stream = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=40, n=2, seed=5, stream=True)
    text: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += (getattr(choice.delta, "reasoning_content", None) or "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = chunk.model_extra["safethink"]
    assert set(finished) == {0, 1} and all(report["interventions"] for report in finished.values())
    assert text[0] == (r.choices[0].message.reasoning_content or "") + (r.choices[0].message.content or "")
    assert httpx.get(hf_url + "/health").json()["running"] == 0


def test_more_choices_than_slots_still_finish(hf_url):
    """Two slots, four choices: the later choices wait for slots rather than deadlock."""
    stream = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=8, n=4, stream=True,
                                                    extra_body=UNSTEERED)
    assert sorted(c.index for chunk in stream for c in chunk.choices if c.finish_reason) == [0, 1, 2, 3]
    r = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=8, n=4, extra_body=UNSTEERED)
    assert len(r.choices) == 4
    health = httpx.get(hf_url + "/health").json()
    assert (health["running"], health["waiting"]) == (0, 0)


def test_sampling_fields_change_the_answer(hf_url):
    def answer(**fields) -> str:
        r = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=24, extra_body={**UNSTEERED, **fields})
        return (r.choices[0].message.reasoning_content or "") + (r.choices[0].message.content or "")

    greedy = answer(temperature=0)
    assert answer(temperature=1.0, top_k=1, seed=1) == greedy == answer(temperature=1.0, top_k=1, seed=2)
    assert answer(temperature=0, frequency_penalty=2.0) != greedy
    assert answer(temperature=1.0, min_p=1.0, seed=4) == greedy, "min_p 1 keeps only the likeliest token"
    assert answer(temperature=0, presence_penalty=2.0) != greedy
    assert answer(temperature=0, repetition_penalty=3.0) != greedy
    short = [{"role": "user", "content": "Reply with one word: yes or no?"}]

    def completion_tokens(**fields) -> int:
        return client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=short, max_tokens=200, temperature=0,
                                                      extra_body={**UNSTEERED, **fields}).usage.completion_tokens

    free = completion_tokens()
    assert free < 190, "the model ends its answer by itself"
    assert completion_tokens(min_tokens=free + 8) >= free + 8, "the end of sequence is not sampled before min_tokens"
    forced = client(hf_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=6, temperature=0,
                                                     logprobs=True, extra_body={**UNSTEERED, "logit_bias": {"1248": 100}})
    assert {e.token for e in forced.choices[0].logprobs.content} == {forced.choices[0].logprobs.content[0].token}


async def test_hf_honours_vllms_sampling_fields(plain_url):
    await check_vllm_sampling_fields(plain_url, {})


def test_upstream_errors_keep_the_field_they_name(proxy_url):
    r = send(proxy_url, {"logit_bias": {"999999999": 1.0}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_tokenize_and_detokenize_as_vllm_has_them(hf_url, proxy_url):
    text = "Reasoning models leak harm in their chain of thought."
    tokens = httpx.post(hf_url + "/tokenize", json={"model": EMBEDDED_MODEL, "prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 5 and tokens["max_model_len"] >= 2048
    assert httpx.post(hf_url + "/detokenize", json={"model": EMBEDDED_MODEL, "tokens": tokens["tokens"]}).json() == {"prompt": text}
    chat = httpx.post(hf_url + "/tokenize", json={"model": EMBEDDED_MODEL, "messages": MATH}).json()
    rendered = httpx.post(hf_url + "/detokenize", json={"model": EMBEDDED_MODEL, "tokens": chat["tokens"]}).json()["prompt"]
    assert MATH[0]["content"] in rendered and rendered.rstrip().endswith("assistant")
    for bad, param in (({"tokens": [10**9]}, "tokens"), ({"tokens": [-1]}, "tokens")):
        r = httpx.post(hf_url + "/detokenize", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(hf_url + "/tokenize", json={"prompt": text, "messages": MATH})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # The proxy's tokens are its upstream's: in chat mode (this upstream) it has none to give.
    r = httpx.post(proxy_url + "/tokenize", json={"prompt": text})
    assert r.status_code == 404 and "chat mode" in r.json()["error"]["message"]


def test_logprobs_through_the_proxy_are_the_upstreams_for_the_kept_text(plain_url, proxy_url):
    """The proxy steers (τ = 0: its first step is replaced, then the budget is spent and the rest
    released): the upstream's entries come back for the text the client got, and none for the
    discarded step."""
    r = client(proxy_url).chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=48, temperature=0, logprobs=True,
                                                  top_logprobs=2)
    info = r.model_extra["safethink"]
    assert info["discarded_tokens"] > 0 and info["interventions"]
    entries = r.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    model_text = "".join(e.token for e in entries)
    client_text = (r.choices[0].message.reasoning_content or "") + (r.choices[0].message.content or "")
    for inserted in info["inserted"]:
        client_text = client_text.replace(inserted["text"], "", 1)
    assert "".join(model_text.split()) == "".join(client_text.split()), "entries for exactly the model text the client got"


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "Hi.", "audio": {"id": "a1"}}, "messages[0].audio"),
    ({"role": "user", "content": [{"type": "text", "text": "Hi.", "cache_control": {"type": "ephemeral"}}]},
     "messages[0].content[0].cache_control"),
    ({"role": "user", "content": "Hi.", "reasoning_content": "I think."}, "messages[0].reasoning_content"),
    ({"role": "user", "content": "Hi.", "tool_call_id": "call_1"}, "messages[0].tool_call_id"),
    ({"role": "tool", "content": "Sunny.", "tool_call_id": "call_1",
      "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "messages[0].tool_calls"),
])
def test_message_fields_honoured_or_refused(hf_url, message, param):
    for path, extra in (("/v1/chat/completions", {"max_tokens": 4}), ("/tokenize", {})):
        response = httpx.post(hf_url + path, json={"model": EMBEDDED_MODEL, "messages": [message], **extra}, timeout=120)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error", error


def test_a_returned_message_goes_back_as_history(hf_url):
    """A client that appends the assistant message it got (reasoning fields, nulls and all) to the
    conversation is served; the reasoning reaches the template under both of vLLM's names."""
    c = client(hf_url)
    first = c.chat.completions.create(model=EMBEDDED_MODEL, messages=MATH, max_tokens=24, extra_body=UNSTEERED)
    returned = first.choices[0].message.model_dump()
    assert "reasoning_content" in returned
    messages = [*MATH, returned, {"role": "user", "content": "And 12 + 31?"}]
    second = c.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=8, extra_body=UNSTEERED)
    assert second.choices[0].message.role == "assistant"
    message = ChatMessage.model_validate({"role": "assistant", "content": "42", "reasoning_content": "12 + 30."})
    assert message.for_template()["reasoning"] == message.for_template()["reasoning_content"] == "12 + 30."


@pytest.mark.parametrize(("field", "value"), [("reasoning", "12 + 30."), ("reasoning_content", "12 + 30."), ("name", "helper"),
                                              ("tool_calls", [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}])])
def test_a_continued_assistant_message_is_only_its_text(plain_url, field, value):
    messages = [*MATH, {"role": "assistant", "content": "First,", field: value}]
    response = httpx.post(plain_url + "/v1/chat/completions", timeout=120, json={
        "model": EMBEDDED_MODEL, "messages": messages, "max_tokens": 4, "continue_final_message": True, "add_generation_prompt": False})
    assert response.status_code == 400 and response.json()["error"]["param"] == f"messages[1].{field}", response.text
    messages[-1].pop(field)
    response = httpx.post(plain_url + "/v1/chat/completions", timeout=120, json={
        "model": EMBEDDED_MODEL, "messages": messages, "max_tokens": 4, "continue_final_message": True, "add_generation_prompt": False})
    assert response.status_code == 200, response.text
