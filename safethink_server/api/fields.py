"""The rule for request fields: every field a request sets is honoured by the serving engine, or
refused with a 400 that names it. Nothing is silently ignored.

A field set to its neutral value (`"n": 1`, `"frequency_penalty": 0`, `"logprobs": false`,
`"tool_choice": "none"`, ...) asks for nothing and is accepted by every engine, as are the fields in
`HARMLESS`, which change nothing about the answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from safethink_server.api.errors import APIError
from safethink_server.api.protocol import ChatMessage, refused_message_field

HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "request_id", "prompt_cache_key", "safety_identifier"})

_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "repetition_penalty": (1, 1.0),
    "length_penalty": (1, 1.0),
    "top_k": (-1, 0),
    "tool_choice": ("none", "auto"),  # without tools (`tools` itself is refused where tools are not honoured)
    "parallel_tool_calls": (True, False),  # the same
    "response_format": ({"type": "text"},),
    "include_reasoning": (True,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "add_generation_prompt": (True,),
    "modalities": (["text"],),
    "truncation": ("disabled",),
    "echo": (False,),
    "best_of": (1,),
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(value: Any, neutral: Any) -> bool:
    if _number(value) and _number(neutral):
        return bool(value == neutral)
    return type(value) is type(neutral) and value == neutral


def is_neutral(name: str, value: Any, declared: bool = True) -> bool:
    """Whether a field's value asks for nothing: None, its neutral value, or, for a field this server
    declares, false, zero or empty. A field it does not know may mean something even when zero
    (vLLM's `thinking_token_budget: 0`), so there only None is neutral."""
    if value is None:
        return True
    if name in _NEUTRAL:
        return any(_equal(value, neutral) for neutral in _NEUTRAL[name])
    return declared and (value is False or (_number(value) and value == 0) or (isinstance(value, list | dict | str) and not value))


def refused_field(body: BaseModel, honoured: frozenset[str]) -> str | None:
    """The first field the request sets that the engine does not honour, if any."""
    fields = [(name, getattr(body, name), True) for name in body.model_fields_set]
    fields += [(name, value, False) for name, value in (body.model_extra or {}).items()]
    for name, value, declared in sorted(fields, key=lambda field: field[0]):
        if name in honoured or name in HARMLESS:
            continue
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if not is_neutral(name, value, declared):
            return name
    return None


def refuse_message_fields(messages: list[ChatMessage]) -> None:
    """A 400 naming the first message field no engine honours (`messages[2].audio`), if any."""
    path = refused_message_field(messages)
    if path is not None:
        raise APIError(400, f"'{path}' is not supported by this server", param=path, code="unsupported_parameter")
