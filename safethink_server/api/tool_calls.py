"""A choice's answer as tool calls on the wire, whole or streamed. The answer text is steered like
any other (its first steps are judged before they go out); this only changes how it is sent."""

from __future__ import annotations

from safethink_server.api.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall, tool_call_id
from safethink_server.engines.base import ToolCallReader


def tool_call_message(reader: ToolCallReader, answer: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of a whole answer."""
    content, calls = reader.final(answer)
    if not calls:
        return content, None
    return content, [ToolCall(function=FunctionCall(name=name, arguments=arguments)) for name, arguments in calls]


class ToolCallStream:
    """One choice's answer streamed as tool-call deltas. A forced function's arguments go out as they
    are released, after a first delta with the call's id and name (as vLLM streams them); other calls
    are read from the whole answer, so the answer is held until the choice ends, then sent as one
    delta per call. Server text (a refusal) goes out as content."""

    def __init__(self, reader: ToolCallReader) -> None:
        self.reader = reader
        self.held: list[str] = []
        self.called = False

    def answer(self, text: str) -> list[DeltaMessage]:
        if self.reader.named is None:
            self.held.append(text)
            return []
        header = []
        if not self.called:
            self.called = True
            header = [DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=tool_call_id(), type="function",
                                                             function=DeltaFunctionCall(name=self.reader.named, arguments=""))])]
        return [*header, DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])]

    def server_text(self, text: str) -> list[DeltaMessage]:
        return [*self._flush_as_content(), DeltaMessage(content=text)]

    def _flush_as_content(self) -> list[DeltaMessage]:
        held, self.held = self.reader.plain("".join(self.held)), []
        return [DeltaMessage(content=held)] if held else []

    def end(self) -> list[DeltaMessage]:
        """What is still held, at the choice's end: the calls read from it, or its text."""
        if self.reader.named is not None or not self.held:
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
