"""Tools and structured outputs through the proxy: the upstream applies them, and the gateway judges
what comes back like any answer text.

- The fields (`tools`, `tool_choice`, `parallel_tool_calls`, `response_format`, `structured_outputs`)
  are passed on unchanged; the upstream checks them (its 400 keeps the `param` it names) and applies
  a structured output from where its reasoning parser sees the answer begin.
- Tool calls arrive as `delta.tool_calls`. They are folded into the answer's text as
  `CALL` name `ARGUMENTS` arguments, so that the steering loop judges a call's arguments like any
  answer step, and are read back into tool calls once the choice has ended. The two marks are ASCII
  control characters that are removed from the upstream's own text, so a model cannot forge a call.
- A breach in such an answer ends it with the refusal: a corrective prefix would break the structure.
- Tool calls need the chat API, where the upstream's tool parser reads them: in token_ids mode they
  are refused (a structured output is passed to /v1/completions, which takes it).
"""

from __future__ import annotations

from typing import Any

from safethink_server.engines.base import AnswerFormat, ToolCallReader
from safethink_server.engines.upstream_stream import UpstreamError
from safethink_server.prompt import PromptError

ANSWER_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs")
CALL = "\x02"  # a folded tool call begins (STX, not whitespace: text is stripped): its function's name follows
ARGUMENTS = "\x03"  # the call's arguments follow


def without_marks(text: str) -> str:
    """The upstream's own text, with the characters that mark a folded tool call removed."""
    return text.replace(CALL, "").replace(ARGUMENTS, "") if CALL in text or ARGUMENTS in text else text


class ToolCallFolder:
    """Folds one choice's streamed `delta.tool_calls` into answer text: a call begins where its index
    changes."""

    def __init__(self) -> None:
        self._index: int | None = None

    def fold(self, calls: Any) -> str:
        text = ""
        if calls is None:
            return ""
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function") or {}, dict) for c in calls):
            raise UpstreamError(f"the upstream sent malformed tool calls: {str(calls)[:200]}", 502, "protocol")
        for call in calls:
            function = call.get("function") or {}
            index = call.get("index", 0)
            if index != self._index:
                self._index = index
                text += CALL + without_marks(str(function.get("name") or "")) + ARGUMENTS
            text += without_marks(str(function.get("arguments") or ""))
        return text


class FoldedToolCalls(ToolCallReader):
    """Reads the folded calls back from the whole answer (held until the choice ends, then sent as one
    delta per call)."""

    def final(self, answer: str) -> tuple[str | None, list[tuple[str, str]]]:
        content, *calls = answer.split(CALL)
        folded = [call.partition(ARGUMENTS) for call in calls]
        return content.strip() or None if calls else content, [(name, arguments) for name, _, arguments in folded]

    def plain(self, text: str) -> str:
        return without_marks(text.replace(ARGUMENTS, " "))


def answer_format(request: dict[str, Any], chat_mode: bool) -> AnswerFormat | None:
    """`request`: the chat request's fields as the client sent them. What is passed on is the
    answer's constraint; None where nothing is asked of the answer."""
    asked = {name: request[name] for name in ANSWER_FIELDS if request.get(name) is not None}
    tools, choice = bool(asked.get("tools")), asked.get("tool_choice")
    if not tools and (isinstance(choice, dict) or choice == "required"):
        raise PromptError("tool_choice names a function but no tools are given", param="tool_choice")
    if tools and not chat_mode:
        raise PromptError("tools through this gateway need the upstream's chat API (--upstream-mode chat), where the "
                          "upstream's chat template renders them and its tool parser reads the calls", param="tools")
    if asked.get("response_format") == {"type": "text"}:
        del asked["response_format"]
    passed = asked if tools else {name: value for name, value in asked.items() if name in ("response_format", "structured_outputs")}
    if not passed:
        return None
    calls = tools and choice != "none"
    return AnswerFormat(constraint=passed, tools=FoldedToolCalls() if calls else None, finish_with_tool_calls=not isinstance(choice, dict))
