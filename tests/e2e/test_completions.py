"""`/v1/completions` end to end: a real server, the real SmolLM2, the official openai client. A raw
prompt that leaves the reasoning open is steered as a chat turn is; every field is honoured or
refused by name."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.support.servers import EMBEDDED_MODEL, running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

REASONING_PROMPT = "<|im_start|>user\nWhat is 12 + 30? Think step by step.<|im_end|>\n<|im_start|>assistant\n<think>\n"
BARE = {"safethink": {"early_steps": 0}}
FORCED = {"safethink": {"threshold": 0, "max_interventions": 1}}


@pytest.fixture(scope="module")
def url():
    with running_server("--allow-client-overrides", "--allow-assistant-prefill", "--max-step-tokens", "24") as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_text_prompt_is_completed_and_counted(url, embedded_model_dir):
    prompt = "The capital of France is"
    r = client(url).completions.create(model=EMBEDDED_MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=BARE)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.text.startswith(" ") and choice.text.strip() and choice.finish_reason == "length"
    ids = AutoTokenizer.from_pretrained(embedded_model_dir).encode(prompt)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    by_ids = client(url).completions.create(model=EMBEDDED_MODEL, prompt=ids, max_tokens=12, temperature=0, extra_body=BARE)
    assert by_ids.choices[0].text == choice.text
    streamed = list(client(url).completions.create(model=EMBEDDED_MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}, extra_body=BARE))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[-1].usage.completion_tokens == 12 and [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"


def test_an_open_reasoning_is_steered_and_the_discarded_step_never_sent(url):
    """The text is as the model wrote it, the end marker included; the first step, judged unsafe, is
    replaced before anything of it goes out."""
    bare = client(url).completions.create(model=EMBEDDED_MODEL, prompt=REASONING_PROMPT, max_tokens=64, temperature=0, extra_body=BARE)
    first_step = bare.choices[0].text.strip().split("\n\n")[0]
    assert first_step and not bare.choices[0].model_extra["safethink"]["steps"]
    for stream in (False, True):
        r = client(url).completions.create(model=EMBEDDED_MODEL, prompt=REASONING_PROMPT, max_tokens=64, temperature=0,
                                           stream=stream, extra_body=FORCED)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        info = next(c.choices[0].model_extra["safethink"] for c in reversed(chunks) if c.choices and c.choices[0].model_extra.get("safethink"))
        assert info["steps"][0]["section"] == "reasoning" and info["steps"][0]["action"] == "replaced"
        assert text.lstrip().startswith("Wait, think safely.") and first_step not in text
        assert "</think>" not in text or text.count("</think>") == 1


def test_logprobs_in_the_completions_shape(url):
    """Each released token's text, logprob and alternatives; streamed, with the text they came with."""
    whole = client(url).completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                           logprobs=2, extra_body=BARE)
    entries = whole.choices[0].logprobs
    assert "".join(entries.tokens) == whole.choices[0].text and len(entries.token_logprobs) == 12
    assert all(lp <= 0 for lp in entries.token_logprobs) and all(len(top) == 2 for top in entries.top_logprobs)
    streamed = [c.choices[0] for c in client(url).completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is",
                                                                     max_tokens=12, temperature=0, logprobs=2, stream=True,
                                                                     extra_body=BARE) if c.choices]
    assert all("".join(c.logprobs.tokens) == c.text for c in streamed if c.text)
    assert [t for c in streamed if c.logprobs for t in c.logprobs.tokens] == entries.tokens


def test_the_answer_to_a_plain_prompt_is_judged(url):
    r = client(url).completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is", max_tokens=24, temperature=0,
                                       extra_body=FORCED)
    steps = r.choices[0].model_extra["safethink"]["steps"]
    assert steps and steps[0]["section"] == "answer" and steps[0]["action"] in ("replaced", "refused")


def test_n_choices_each_steered(url):
    r = client(url).completions.create(model=EMBEDDED_MODEL, prompt=REASONING_PROMPT, max_tokens=32, n=2, seed=7, extra_body=FORCED)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.model_extra["safethink"]["interventions"] for c in r.choices)


@pytest.mark.parametrize(("fields", "param"), [
    ({"echo": True}, "echo"), ({"logprobs": 99}, "logprobs"), ({"suffix": " the end"}, "suffix"), ({"best_of": 2}, "best_of"),
    ({"prompt": ["one", "two"]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": [10**9]}, "prompt"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
])
def test_fields_it_does_not_honour_are_refused_by_name(url, fields, param):
    response = httpx.post(url + "/v1/completions", json={"model": EMBEDDED_MODEL, "prompt": "Hello", "max_tokens": 4, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"
