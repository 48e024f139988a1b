"""A choice's answer as tool calls on the wire, whole or streamed. The answer text is steered like
any other (its first steps are judged before they go out); this only changes how it is sent."""

from __future__ import annotations

from safethink_server.api.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall, tool_call_id
from safethink_server.engines.base import CallPiece, ToolCallReader


def tool_call_message(reader: ToolCallReader, answer: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of a whole answer."""
    content, calls = reader.final(answer)
    if not calls:
        return content, None
    return content, [ToolCall(function=FunctionCall(name=name, arguments=arguments)) for name, arguments in calls]


class ToolCallStream:
    """One choice's answer streamed as tool-call deltas. Where the engine's reader streams calls (a
    forced function's arguments; calls an upstream made, folded into the answer), they go out as
    they are released, a call's id and name first (as vLLM streams them); other calls are read from
    the whole answer, so the answer is held until the choice ends, then sent as one delta per call.
    Server text (a refusal) goes out as content."""

    def __init__(self, reader: ToolCallReader) -> None:
        self.reader = reader
        self.streamer = reader.streamer()
        self.held: list[str] = []
        self.called = False

    def answer(self, text: str) -> list[DeltaMessage]:
        if self.streamer is None:
            self.held.append(text)
            return []
        return [self._delta(piece) for piece in self.streamer.feed(text)]

    def _delta(self, piece: CallPiece) -> DeltaMessage:
        if piece.content is not None:
            return DeltaMessage(content=piece.content)
        self.called = True
        if piece.name is not None:
            return DeltaMessage(tool_calls=[DeltaToolCall(index=piece.index, id=tool_call_id(), type="function",
                                                          function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments))])
        return DeltaMessage(tool_calls=[DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))])

    def server_text(self, text: str) -> list[DeltaMessage]:
        return [*self._flush_as_content(), DeltaMessage(content=text)]

    def _flush_as_content(self) -> list[DeltaMessage]:
        held, self.held = self.reader.plain("".join(self.held)), []
        return [DeltaMessage(content=held)] if held else []

    def end(self) -> list[DeltaMessage]:
        """What is still held, at the choice's end: the calls read from it, or its text."""
        if self.streamer is not None or not self.held:
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
