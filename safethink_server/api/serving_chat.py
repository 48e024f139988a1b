"""`/v1/chat/completions`: the whole response and the stream of chunks, with reasoning, tool calls and logprobs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from safethink_server.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    DeltaMessage,
    StreamChoice,
    completion_id,
)
from safethink_server.api.serving import finished
from safethink_server.api.state import ServerState
from safethink_server.api.streaming import DeltaEvents, choice_runs, delta_message, failed_stream, sse, stream_tail
from safethink_server.api.tool_calls import ToolCallStream, tool_call_message
from safethink_server.api.tracker import RequestTracker
from safethink_server.api.usage import LogprobEntries, fingerprint
from safethink_server.engines.base import AnswerFormat
from safethink_server.steering.session import SteeringSession


async def complete(state: ServerState, body: ChatCompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                   tracker: RequestTracker, request: Request) -> Response:
    done = await finished(sessions, tracker, request)
    if isinstance(done, Response):
        return done
    parts, usage = done
    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs else None
    choices = []
    for index, (session, text) in enumerate(zip(sessions, parts, strict=True)):
        reasoning = text.of("reasoning") or None
        content, calls = text.of("answer"), None
        if answer is not None and answer.tools is not None:
            if session.finish_reason == "content_filter":
                content = answer.tools.plain(content)
            else:
                content, calls = tool_call_message(answer.tools, content)
        choices.append(Choice(index=index, message=AssistantMessage(content=content, reasoning_content=reasoning, reasoning=reasoning,
                                                                    tool_calls=calls),
                              finish_reason=finish_reason(session, answer, bool(calls)), safethink=session.client_report,
                              logprobs=logprobs(text.logprobs) if logprobs else None))
    response = ChatCompletionResponse(model=state.engine.model_name, choices=choices, usage=usage, safethink=sessions[0].client_report,
                                      system_fingerprint=fingerprint(sessions))
    return JSONResponse(response.model_dump(exclude_none=True))


def finish_reason(session: SteeringSession, answer: AnswerFormat | None, called: bool) -> str | None:
    if called and session.finish_reason == "stop" and answer is not None and answer.finish_with_tool_calls:
        return "tool_calls"
    return session.finish_reason


async def stream(state: ServerState, body: ChatCompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                 tracker: RequestTracker) -> AsyncIterator[str]:
    chunk_id, created, model = completion_id(), int(time.time()), state.engine.model_name

    def chunk(delta: DeltaMessage, finish: str | None = None, index: int = 0, logprobs: ChoiceLogprobs | None = None,
              **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                   choices=[StreamChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)], **extra)

    event = DeltaEvents(chunk, len(sessions))
    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs else None
    tools = [ToolCallStream(answer.tools) for _ in sessions] if answer is not None and answer.tools is not None else None
    opened = False
    try:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for index, delta in runs:
                session = sessions[index]
                if not opened:  # as vLLM: every choice's role, in order, with the first output, so a client's TTFT is real
                    opened = True
                    for choice in range(len(sessions)):
                        yield sse(chunk(DeltaMessage(role="assistant", content=""), index=choice))
                if delta is None:
                    for message in tools[index].end() if tools else []:
                        yield sse(chunk(message, index=index))
                    called = tools is not None and tools[index].called
                    yield sse(chunk(DeltaMessage(), finish_reason(session, answer, called), index=index,
                                     safethink=session.client_report, system_fingerprint=fingerprint([session])))
                    continue
                tracker.saw(delta.text, index)
                entries = logprobs(delta.logprobs) if logprobs is not None and delta.logprobs else None
                if tools is not None and delta.section == "answer":
                    messages = tools[index].server_text(delta.text) if delta.server else tools[index].answer(delta.text)
                    for message in messages or ([DeltaMessage()] if entries else []):
                        yield sse(chunk(message, index=index, logprobs=entries))
                        entries = None  # the delta's entries go out once, with its first message
                elif entries is None:
                    if delta.text:
                        yield event(delta, index)
                else:
                    yield sse(chunk(delta_message(delta), index=index, logprobs=entries))
    except Exception as exc:
        for event in failed_stream(tracker, exc):
            yield event
        return
    for event in stream_tail(body, sessions, tracker,
                             lambda usage: sse(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=usage))):
        yield event
