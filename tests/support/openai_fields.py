"""The request fields × engine table of docs/api.md, as data for the tests: each cell is a test that
sends the field alone (with a value that asks for something) and expects it honoured (200) or
refused (400 naming it in `param`)."""

from __future__ import annotations

from typing import Any

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}

# Field (or field:variant) -> the request fields that ask for it.
EXAMPLES: dict[str, dict[str, Any]] = {
    "frequency_penalty": {"frequency_penalty": 0.5},
    "presence_penalty": {"presence_penalty": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.2},
    "top_k": {"top_k": 5},
    "min_p": {"min_p": 0.05},
    "logit_bias": {"logit_bias": {"11": 1.0}},
    "min_tokens": {"min_tokens": 2},
    "stop_token_ids": {"stop_token_ids": [13]},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "n": {"n": 2},
    "seed": {"seed": -(2**63)},
    "stop": {"stop": ["\n\n\n"]},
    "chat_template_kwargs": {"chat_template_kwargs": {"custom_flag": True}},
    "reasoning_effort": {"reasoning_effort": "low"},
    "response_format:json_object": {"response_format": {"type": "json_object"}},
    "response_format:json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}},
    "structured_outputs": {"structured_outputs": {"choice": ["yes", "no"]}},
    "tools": {"tools": [WEATHER_TOOL]},
    "tool_choice": {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "user": {"user": "someone"},
    "metadata": {"metadata": {"team": "a"}},
    "store": {"store": True},
    "thinking_token_budget": {"thinking_token_budget": 0},
    "echo": {"echo": True},
    "ignore_eos": {"ignore_eos": True},
    "prompt_logprobs": {"prompt_logprobs": 1},
    "bad_words": {"bad_words": ["the"]},
    "allowed_token_ids": {"allowed_token_ids": [1, 2, 3]},
    "skip_special_tokens": {"skip_special_tokens": False},
    "spaces_between_special_tokens": {"spaces_between_special_tokens": False},
    "include_stop_str_in_output": {"include_stop_str_in_output": True},
    "truncate_prompt_tokens": {"truncate_prompt_tokens": 16},
    "priority": {"priority": 1},
    "audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
    "an_unknown_field": {"an_unknown_field": 1},
}

SAMPLING = {"frequency_penalty", "presence_penalty", "repetition_penalty", "top_k", "min_p", "logit_bias", "min_tokens"}
VLLM_SAMPLING = {"ignore_eos", "bad_words", "allowed_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
                 "include_stop_str_in_output", "truncate_prompt_tokens"}
ALWAYS = {"n", "seed", "stop", "user", "metadata", "store"}
TEMPLATE = {"chat_template_kwargs", "reasoning_effort"}
STRUCTURED = {"response_format:json_object", "response_format:json_schema", "structured_outputs", "tools", "tool_choice"}

# Engine -> the examples it honours; every other example is refused. The upstream engine honours a
# field by passing it to the upstream, which may refuse it in turn (the gateway keeps its `param`).
# `priority` on vllm: the test servers schedule first-come-first-served, under which vLLM refuses it.
HONOURED: dict[str, set[str]] = {
    "hf": ALWAYS | SAMPLING | VLLM_SAMPLING | TEMPLATE | {"logprobs"},
    "vllm": ALWAYS | SAMPLING | VLLM_SAMPLING | TEMPLATE | STRUCTURED | {"logprobs", "stop_token_ids"},
    "upstream": ALWAYS | SAMPLING | VLLM_SAMPLING | TEMPLATE | STRUCTURED | {"stop_token_ids", "logprobs", "priority"},
}


def refused_param(example: str) -> str:
    """The field a refusal must name: the first of the example's fields, in name order, that asks for something."""
    return sorted(EXAMPLES[example])[0]


async def check_vllm_sampling_fields(base: str, extra: dict[str, Any]) -> None:
    """What vLLM's own sampling fields visibly do on a server that allows raw prompts, unsteered
    (`extra`: what turns steering off there), compared with the same request without them."""
    import re

    import openai
    from transformers import AutoTokenizer

    from safethink_server.engines.model_store import embedded_model_dir
    from tests.support.servers import EMBEDDED_MODEL

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    short = [{"role": "user", "content": "Reply with one word: yes or no?"}]

    async def chat(max_tokens: int, **fields: Any) -> Any:
        return await client.chat.completions.create(model=EMBEDDED_MODEL, messages=short, max_tokens=max_tokens, temperature=0,
                                                    extra_body={**extra, **fields})

    def text(r: Any) -> str:
        message = r.choices[0].message
        return (getattr(message, "reasoning_content", None) or "") + (message.content or "")

    free = await chat(200)
    ends_at = free.usage.completion_tokens
    assert free.choices[0].finish_reason == "stop" and ends_at < 180, "the model ends by itself"
    ran_on = await chat(ends_at + 12, ignore_eos=True)
    assert (ran_on.choices[0].finish_reason, ran_on.usage.completion_tokens) == ("length", ends_at + 12), "ignore_eos: on to max_tokens"
    shown = await chat(ends_at + 12, ignore_eos=True, skip_special_tokens=False)
    assert "<|im_end|>" in text(shown) and "<|im_end|>" not in text(ran_on), "skip_special_tokens: false shows the EOS it ran past"

    async def complete(**fields: Any) -> Any:
        return await client.completions.create(model=EMBEDDED_MODEL, prompt="Count with me: 1, 2, 3, 4,", max_tokens=10, temperature=0,
                                               extra_body={**extra, **fields})

    counted = (await complete()).choices[0].text
    assert counted.startswith(" 5"), counted
    cut = (await complete(stop=[","])).choices[0].text
    kept = (await complete(stop=[","], include_stop_str_in_output=True)).choices[0].text
    assert "," not in cut and kept == cut + ",", (cut, kept)
    assert not (await complete(bad_words=["5"])).choices[0].text.startswith(" 5"), "bad_words: the likeliest next word is banned"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    allowed = tokenizer.encode(" yes", add_special_tokens=False) + tokenizer.encode(" no", add_special_tokens=False)
    only = (await complete(allowed_token_ids=allowed)).choices[0].text
    assert only and re.fullmatch(r"( yes| no)+", only), only
    whole = (await complete()).usage.prompt_tokens
    assert whole > 6 and (await complete(truncate_prompt_tokens=6)).usage.prompt_tokens == 6
    await client.close()
