"""`/v1/responses` end to end: a real server, the real SmolLM2, the official openai client. The
Responses API is served by the chat path, steered the same way; every field is honoured or refused."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.servers import EMBEDDED_MODEL, running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

QUESTION = "What is 12 + 30? Think step by step."
BARE = {"safethink": {"early_steps": 0}}
FORCED = {"safethink": {"threshold": 0, "max_interventions": 1}}


@pytest.fixture(scope="module")
def url():
    with running_server("--allow-client-overrides", "--max-step-tokens", "24") as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_response_is_the_chat_answer_as_output_items(url):
    """Instructions are the system turn and the input the conversation: the same greedy text as the
    chat API gives, as a reasoning item and a message item, with usage in the Responses shape."""
    chat = client(url).chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=48, temperature=0, extra_body=BARE)
    r = client(url).responses.create(model=EMBEDDED_MODEL, instructions="Be brief.", input=QUESTION, max_output_tokens=48,
                                     temperature=0, extra_body=BARE)
    reasoning = next(o for o in r.output if o.type == "reasoning")
    assert reasoning.content[0].text == chat.choices[0].message.reasoning_content
    assert r.output[-1].type == "message" and r.output_text == (chat.choices[0].message.content or "")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.output_tokens_details.reasoning_tokens == chat.usage.completion_tokens_details.reasoning_tokens
    finished = chat.choices[0].finish_reason == "stop"
    assert r.status == ("completed" if finished else "incomplete")
    assert finished or r.incomplete_details.reason == "max_output_tokens"


def test_a_steered_response_streams_only_judged_text(url):
    bare = client(url).responses.create(model=EMBEDDED_MODEL, input=QUESTION, max_output_tokens=64, temperature=0, extra_body=BARE)
    first_step = next(o for o in bare.output if o.type == "reasoning").content[0].text.strip().split("\n\n")[0]
    whole = client(url).responses.create(model=EMBEDDED_MODEL, input=QUESTION, max_output_tokens=64, temperature=0, extra_body=FORCED)
    events = list(client(url).responses.create(model=EMBEDDED_MODEL, input=QUESTION, max_output_tokens=64, temperature=0,
                                               stream=True, extra_body=FORCED))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    final = events[-1].response
    assert events[-1].type == f"response.{final.status}" and final.status == whole.status
    streamed = "".join(e.delta for e in events if e.type in ("response.reasoning_text.delta", "response.output_text.delta"))
    texts = ["".join(c.text for c in o.content or []) for o in final.output]
    assert streamed == "".join(texts) == "".join("".join(c.text for c in o.content or []) for o in whole.output)
    assert texts[0].lstrip().startswith("Wait, think safely.") and first_step not in streamed
    assert final.model_extra["safethink"]["steps"][0]["action"] == "replaced"
    refused = final.model_extra["safethink"].get("refusal") is not None
    assert not refused or (final.status == "incomplete" and final.incomplete_details.reason == "content_filter")
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.id for item in done] == [item.id for item in final.output]


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"text": {"format": {"type": "json_object"}}}, "text"), ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "sunny"}]}, "input"), ({"background": True}, "background"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"include": ["reasoning.encrypted_content"]}, "include"), ({"store": True}, "store"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary"), ({"metadata": {"n": 1}}, "metadata.n"), ({"metadata": "x"}, "metadata"),
])
def test_fields_it_does_not_honour_are_refused_by_name(url, fields, param):
    response = httpx.post(url + "/v1/responses", json={"model": EMBEDDED_MODEL, "input": "Hello", "max_output_tokens": 4, **fields},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


def test_neutral_fields_and_message_input_are_served(url):
    r = client(url).responses.create(
        model=EMBEDDED_MODEL, max_output_tokens=8, temperature=0, store=False, text={"format": {"type": "text"}}, tool_choice="none",
        truncation="disabled", reasoning={"effort": "low", "summary": None}, metadata={"team": "a"}, extra_body=BARE,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}])
    assert r.output[-1].type == "message" and r.store is False and r.metadata == {"team": "a"}
