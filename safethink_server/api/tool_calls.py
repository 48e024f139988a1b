"""A choice's answer as tool calls on the wire, whole or streamed. The answer text is steered like
any other (its first steps are judged before they go out); this only changes how it is sent."""

from __future__ import annotations

import re

from safethink_server.api.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall, tool_call_id
from safethink_server.engines.base import ToolCallReader
from safethink_server.engines.upstream.answer import ARGUMENTS, CALL, CALL_END


def tool_call_message(reader: ToolCallReader, answer: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of a whole answer."""
    content, calls = reader.final(answer)
    if not calls:
        return content, None
    return content, [ToolCall(function=FunctionCall(name=name, arguments=arguments)) for name, arguments in calls]


class ToolCallStream:
    """One choice's answer streamed as tool-call deltas. A forced function's arguments, and calls an
    upstream made (folded into the answer), go out as they are released, after a first delta with
    the call's id and name (as vLLM streams them); other calls are read from the whole answer, so the
    answer is held until the choice ends, then sent as one delta per call. Server text (a refusal)
    goes out as content."""

    def __init__(self, reader: ToolCallReader) -> None:
        self.reader = reader
        self.held: list[str] = []
        self.called = False
        self._state, self._name, self._index = "content", "", -1  # where folded calls are read

    def answer(self, text: str) -> list[DeltaMessage]:
        if self.reader.folded:
            return self._unfold(text)
        if self.reader.named is None:
            self.held.append(text)
            return []
        header = []
        if not self.called:
            self.called = True
            header = [DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=tool_call_id(), type="function",
                                                             function=DeltaFunctionCall(name=self.reader.named, arguments=""))])]
        return [*header, DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])]

    _MARKS = re.compile(f"([{CALL}{ARGUMENTS}{CALL_END}])")

    def _unfold(self, text: str) -> list[DeltaMessage]:
        """Released text of an answer with folded calls, as the deltas the upstream sent: content as
        content, each call's id and name once its name is complete, then its arguments as they come."""
        out: list[DeltaMessage] = []
        for piece in self._MARKS.split(text):
            if piece == CALL:
                self._state, self._name = "name", ""
            elif piece == ARGUMENTS:
                self._state, self._index, self.called = "arguments", self._index + 1, True
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=self._index, id=tool_call_id(), type="function",
                                                                  function=DeltaFunctionCall(name=self._name, arguments=""))]))
            elif piece == CALL_END:
                self._state = "content"
            elif piece and self._state == "name":
                self._name += piece
            elif piece and self._state == "arguments":
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=self._index, function=DeltaFunctionCall(arguments=piece))]))
            elif piece:
                out.append(DeltaMessage(content=piece))
        return out

    def server_text(self, text: str) -> list[DeltaMessage]:
        return [*self._flush_as_content(), DeltaMessage(content=text)]

    def _flush_as_content(self) -> list[DeltaMessage]:
        held, self.held = self.reader.plain("".join(self.held)), []
        return [DeltaMessage(content=held)] if held else []

    def end(self) -> list[DeltaMessage]:
        """What is still held, at the choice's end: the calls read from it, or its text."""
        if self.reader.named is not None or self.reader.folded or not self.held:
            return []
        content, calls = tool_call_message(self.reader, "".join(self.held))
        self.held = []
        out = [DeltaMessage(content=content)] if content else []
        for index, call in enumerate(calls or []):
            self.called = True
            out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=index, id=call.id, type="function",
                                                              function=DeltaFunctionCall(name=call.function.name,
                                                                                         arguments=call.function.arguments))]))
        return out
