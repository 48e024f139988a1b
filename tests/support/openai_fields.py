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
    "audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
    "an_unknown_field": {"an_unknown_field": 1},
}

SAMPLING = {"frequency_penalty", "presence_penalty", "repetition_penalty", "top_k", "min_p", "logit_bias", "min_tokens"}
ALWAYS = {"n", "seed", "stop", "user", "metadata", "store"}
TEMPLATE = {"chat_template_kwargs", "reasoning_effort"}
STRUCTURED = {"response_format:json_object", "response_format:json_schema", "structured_outputs", "tools", "tool_choice"}

# Engine -> the examples it honours; every other example is refused. The upstream engine honours a
# field by passing it to the upstream, which may refuse it in turn (the gateway keeps its `param`).
HONOURED: dict[str, set[str]] = {
    "hf": ALWAYS | SAMPLING | TEMPLATE | {"logprobs"},
    "vllm": ALWAYS | SAMPLING | TEMPLATE | STRUCTURED | {"logprobs", "stop_token_ids"},
    "upstream": ALWAYS | SAMPLING | TEMPLATE | STRUCTURED | {"stop_token_ids", "logprobs"},
}


def refused_param(example: str) -> str:
    """The field a refusal must name: the first of the example's fields, in name order, that asks for something."""
    return sorted(EXAMPLES[example])[0]
