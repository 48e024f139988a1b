"""Tools and structured outputs through the proxy: the upstream applies them, and the gateway judges
what comes back like any answer text.

- The fields (`tools`, `tool_choice`, `parallel_tool_calls`, `response_format`, `structured_outputs`)
  are passed on unchanged; the upstream checks them (its 400 keeps the `param` it names) and applies
  a structured output from where its reasoning parser sees the answer begin.
- Tool calls arrive as `delta.tool_calls`. They are folded into the answer's text as
  `CALL` name `ARGUMENTS` arguments, so that the steering loop judges a call's arguments like any
  answer step, and are read back into tool calls as they are released. The two marks are ASCII
  control characters that are removed from the upstream's own text, so a model cannot forge a call.
- A breach in such an answer ends it with the refusal: a corrective prefix would break the structure.
- Tool calls need the chat API, where the upstream's tool parser reads them: a request with tools
  takes it in token_ids mode too (a structured output is passed to /v1/completions, which takes it).
"""

from __future__ import annotations

import re
from typing import Any

from safethink_server.engines.base import AnswerFormat, CallPiece, CallStreamer, ToolCallReader
from safethink_server.engines.upstream.errors import UpstreamError
from safethink_server.prompt import PromptError

ANSWER_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs")
CALL = "\x02"  # a folded tool call begins (STX: not whitespace, which text handling strips): its function's name follows
ARGUMENTS = "\x03"  # the call's arguments follow
CALL_END = "\x04"  # content follows the calls
_MARKS = (CALL, ARGUMENTS, CALL_END)
_NO_CALL = -1


def without_marks(text: str) -> str:
    """The upstream's own text, with the characters that mark a folded tool call removed."""
    if any(mark in text for mark in _MARKS):
        for mark in _MARKS:
            text = text.replace(mark, "")
    return text


def _malformed(what: str) -> UpstreamError:
    # Only the shape is named, never a value: arguments are model text that was never judged.
    return UpstreamError(f"the upstream sent malformed tool calls: {what}", 502, "protocol")


class ToolCallFolder:
    """Folds one choice's answer deltas, text and `tool_calls`, into one text: each call as
    CALL name ARGUMENTS arguments, and CALL_END before text that follows a call. A call begins where
    the (required) `index` changes; its name comes with its id or in a later delta, but before its
    arguments, and a call that has ended does not come back."""

    def __init__(self) -> None:
        self._index = _NO_CALL
        self._header_written = False  # the current call's CALL name ARGUMENTS is out
        self._ended: set[int] = set()  # indices of calls that are over
        self._after_call = False  # text now would follow a call

    def _end_call(self) -> None:
        if self._index != _NO_CALL:
            self._ended.add(self._index)
        self._index, self._header_written = _NO_CALL, False

    def fold(self, content: str, calls: Any) -> str:
        text = ""
        if content:
            text += (CALL_END if self._after_call else "") + without_marks(content)
            self._after_call = False
            self._end_call()
        if calls is None:
            return text
        if not isinstance(calls, list):
            raise _malformed("tool_calls is not a list")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            index = call.get("index") if isinstance(call, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise _malformed("a call without an integer index")
            if not isinstance(function or {}, dict):
                raise _malformed("a call whose function is not an object")
            name, arguments = (function or {}).get("name"), (function or {}).get("arguments")
            if not isinstance(name, str | None) or not isinstance(arguments, str | None):
                raise _malformed("a name or arguments that are not strings")
            if index != self._index:
                if index in self._ended:
                    raise _malformed("a call that had ended came back")
                self._end_call()
                self._index = index
            if name and self._header_written:
                raise _malformed("a second name for a call whose arguments have begun")
            if not self._header_written and arguments and not name:
                raise _malformed("arguments before the call's name")
            if not self._header_written and name:
                text += CALL + without_marks(name) + ARGUMENTS
                self._header_written = self._after_call = True
            text += without_marks(arguments or "")
        return text


def read_folded(answer: str) -> tuple[str, list[tuple[str, str]]]:
    """(the text outside calls, [(name, arguments)]) of a folded answer."""
    content, *folded = answer.split(CALL)
    texts, calls = [content], []
    for call in folded:
        name, _, rest = call.partition(ARGUMENTS)
        arguments, _, after = rest.partition(CALL_END)
        calls.append((name, arguments))
        texts.append(after)
    return "".join(texts), calls


class FoldedCalls(CallStreamer):
    """Released text of an answer with folded calls, as the pieces the upstream sent: content as
    content, each call's name once it is complete, then its arguments as they come."""

    _SPLIT = re.compile(f"([{CALL}{ARGUMENTS}{CALL_END}])")

    def __init__(self) -> None:
        self._state, self._name, self._index = "content", "", -1

    def feed(self, text: str) -> list[CallPiece]:
        out: list[CallPiece] = []
        for piece in self._SPLIT.split(text):
            if piece == CALL:
                self._state, self._name = "name", ""
            elif piece == ARGUMENTS:
                self._state, self._index = "arguments", self._index + 1
                out.append(CallPiece(index=self._index, name=self._name))
            elif piece == CALL_END:
                self._state = "content"
            elif piece and self._state == "name":
                self._name += piece
            elif piece and self._state == "arguments":
                out.append(CallPiece(index=self._index, arguments=piece))
            elif piece:
                out.append(CallPiece(content=piece))
        return out


class FoldedToolCalls(ToolCallReader):
    """Reads the folded calls back: from the whole answer (`final`), or as released text streams."""

    def streamer(self) -> CallStreamer:
        return FoldedCalls()

    def final(self, answer: str) -> tuple[str | None, list[tuple[str, str]]]:
        content, calls = read_folded(answer)
        return (content.strip() or None) if calls else content, calls

    def plain(self, text: str) -> str:
        return without_marks(text.replace(ARGUMENTS, " ").replace(CALL_END, " "))


def answer_format(request: dict[str, Any]) -> AnswerFormat | None:
    """`request`: the chat request's fields as the client sent them. What is passed on is the
    answer's constraint; None where nothing is asked of the answer."""
    asked = {name: request[name] for name in ANSWER_FIELDS if request.get(name) is not None}
    tools, choice = bool(asked.get("tools")), asked.get("tool_choice")
    if not tools and (isinstance(choice, dict) or choice == "required"):
        raise PromptError("tool_choice names a function but no tools are given", param="tool_choice")
    if asked.get("response_format") == {"type": "text"}:
        del asked["response_format"]
    passed = asked if tools else {name: value for name, value in asked.items() if name in ("response_format", "structured_outputs")}
    if not passed:
        return None
    calls = tools and choice != "none"
    return AnswerFormat(constraint=passed, tools=FoldedToolCalls() if calls else None, finish_with_tool_calls=not isinstance(choice, dict))
