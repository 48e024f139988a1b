"""Tools and structured outputs on the vllm engine, read with vLLM's own request model, tool-call
schemas and tool parsers, so that they mean here what they mean to `vllm serve`:

- `response_format` (json_object, json_schema) and `structured_outputs` become a structured output
  that applies to the answer only, from its first token (the reasoning stays free);
- a named `tool_choice` constrains the answer to that function's parameters, and `required` to a
  JSON list of calls (vLLM's schema); the calls are read back from the answer;
- `auto` needs a tool parser (`--enable-auto-tool-choice --tool-call-parser NAME`), which reads the
  calls out of the answer's text.
"""

from __future__ import annotations

import json
from typing import Any

from safethink_server.engines.base import AnswerFormat, ToolCallReader
from safethink_server.prompt import PromptError


class JSONToolCalls(ToolCallReader):
    """The answer is JSON written under vLLM's tool-call schema: the forced function's arguments, or
    (`required`) a list of {"name", "parameters"}."""

    def __init__(self, named: str | None) -> None:
        self.named = named  # (parallel_tool_calls false: vLLM's schema for `required` allows one call only)

    def final(self, answer: str) -> tuple[str | None, list[tuple[str, str]]]:
        if self.named is not None:
            return None, [(self.named, answer.strip())]
        try:
            calls = json.loads(answer)
            return None, [(call["name"], json.dumps(call.get("parameters", {}), ensure_ascii=False)) for call in calls]
        except (ValueError, TypeError, KeyError):
            return answer, []  # cut short (max_tokens, a refusal): the text is what there is


class ParsedToolCalls(ToolCallReader):
    """`auto`: the model's own tool-call syntax, read by vLLM's parser for the model."""

    def __init__(self, parser: Any, request: Any, single: bool) -> None:
        self.parser = parser
        self.request = request
        self.single = single  # parallel_tool_calls false: the first call only, as vLLM keeps it

    def final(self, answer: str) -> tuple[str | None, list[tuple[str, str]]]:
        extracted = self.parser.extract_tool_calls(answer, self.request)
        if not extracted.tools_called:
            return answer, []
        calls = [(c.function.name, c.function.arguments) for c in extracted.tool_calls]
        return extracted.content or None, calls[:1] if self.single else calls


def answer_format(request: dict[str, Any], tokenizer: Any, tool_parser: str | None) -> AnswerFormat | None:
    """`request`: the chat request's fields as the client sent them. `tool_parser`: the parser the
    server enables for tool_choice auto (None: auto is refused)."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMChatRequest
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    fields = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs")
    asked = {name: request[name] for name in fields if request.get(name) is not None}
    if not asked or set(asked) == {"parallel_tool_calls"}:
        return None
    try:
        vllm_request = VLLMChatRequest.model_validate({"messages": request.get("messages", []), "model": request.get("model"), **asked})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or next(iter(asked))
        raise PromptError(f"invalid value for '{param}': {first.get('msg')}", param=param.split(".")[0]) from exc
    except (ValueError, VLLMClientError) as exc:
        raise PromptError(str(exc), param=_named(exc, asked)) from exc
    tool_choice = vllm_request.tool_choice if vllm_request.tools else "none"
    single = vllm_request.parallel_tool_calls is False
    try:
        constraint = _checked(vllm_request.extract_structured_outputs(), StructuredOutputsParams)
    except (ValueError, VLLMClientError) as exc:
        raise PromptError(str(exc), param=_named(exc, asked)) from exc
    if tool_choice in ("none", None):
        if "tool_choice" in asked and request["tool_choice"] not in ("none", "auto"):
            raise PromptError("tool_choice names a function but no tools are given", param="tool_choice")
        return AnswerFormat(constraint=constraint) if constraint is not None else None
    if tool_choice == "auto":
        if tool_parser is None:
            raise PromptError('tool_choice "auto" needs a tool parser: serve with --enable-auto-tool-choice '
                              "--tool-call-parser NAME", param="tool_choice" if "tool_choice" in asked else "tools")
        parser = ToolParserManager.get_tool_parser(tool_parser)(tokenizer, vllm_request.tools)
        vllm_request = parser.adjust_request(vllm_request)
        return AnswerFormat(constraint=_checked(vllm_request.extract_structured_outputs(), StructuredOutputsParams),
                            tools=ParsedToolCalls(parser, vllm_request, single), keep_special_tokens=not vllm_request.skip_special_tokens)
    if constraint is not None:
        raise PromptError(f"a {'named' if tool_choice != 'required' else 'required'} tool_choice constrains the answer to tool calls: "
                          "it cannot take response_format or structured_outputs too", param="tool_choice")
    try:
        schema = get_json_schema_from_tools(tool_choice=tool_choice, tools=vllm_request.tools,
                                            parallel_tool_calls=vllm_request.parallel_tool_calls)
    except (ValueError, VLLMClientError) as exc:
        raise PromptError(str(exc), param="tool_choice") from exc
    named = None if tool_choice == "required" else tool_choice.function.name
    return AnswerFormat(constraint={"json": schema}, tools=JSONToolCalls(named), finish_with_tool_calls=named is None)


def _named(exc: Exception, asked: dict[str, Any]) -> str:
    parameter = getattr(exc, "parameter", None)
    return str(parameter) if parameter in asked else next(iter(asked))


def _checked(params: Any, cls: type) -> dict[str, Any] | None:
    """A StructuredOutputsParams as the keyword arguments that rebuild it (only those set), rebuilt
    once here so that a contradictory one is refused before any slot is taken."""
    from dataclasses import fields

    if params is None:
        return None
    kwargs = {f.name: getattr(params, f.name) for f in fields(cls) if getattr(params, f.name) not in (None, False)}
    cls(**kwargs)
    return kwargs
