"""`/v1/completions`: the whole response and the stream, the text as the model wrote it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from safethink_server.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage, text_completion_id
from safethink_server.api.serving import finished
from safethink_server.api.state import ServerState
from safethink_server.api.streaming import choice_runs, failed_stream, stream_tail
from safethink_server.api.tracker import RequestTracker
from safethink_server.api.usage import LogprobEntries, fingerprint
from safethink_server.engines.base import AnswerFormat
from safethink_server.steering.session import SteeringSession


async def complete_text(state: ServerState, body: CompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                        tracker: RequestTracker, request: Request) -> Response:
    done = await finished(sessions, tracker, request)
    if isinstance(done, Response):
        return done
    parts, usage = done
    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs is not None else None
    choices = []
    for index, (session, text) in enumerate(zip(sessions, parts, strict=True)):
        # The session's raw text holds the reasoning markers as the model (or the server) wrote them.
        choices.append(CompletionChoice(index=index, text=text.of("reasoning", "answer"), finish_reason=session.finish_reason,
                                        safethink=session.client_report, logprobs=logprobs.of_text(text.logprobs) if logprobs else None))
    response = CompletionResponse(model=state.engine.model_name, choices=choices, usage=usage, safethink=sessions[0].client_report,
                                  system_fingerprint=fingerprint(sessions))
    return JSONResponse(response.model_dump(exclude_none=True))


async def stream_text(state: ServerState, body: CompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                      tracker: RequestTracker) -> AsyncIterator[str]:
    """`/v1/completions` streamed: each delta a `text_completion` chunk, its text as the model wrote it."""
    chunk_id, created, model = text_completion_id(), int(time.time()), state.engine.model_name

    def chunk(*choices: CompletionChoice, usage: Usage | None = None, fingerprint: str | None = None) -> str:
        payload = CompletionResponse(id=chunk_id, created=created, model=model, choices=list(choices), usage=usage,
                                     system_fingerprint=fingerprint)
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs is not None else None
    try:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for index, delta in runs:
                session = sessions[index]
                if delta is None:
                    yield chunk(CompletionChoice(index=index, text="", finish_reason=session.finish_reason, safethink=session.client_report),
                                fingerprint=fingerprint([session]))
                    continue
                tracker.saw(delta.text, index)
                yield chunk(CompletionChoice(index=index, text=delta.text, logprobs=logprobs.of_text(delta.logprobs) if logprobs else None))
    except Exception as exc:
        for event in failed_stream(tracker, exc):
            yield event
        return
    for event in stream_tail(body, sessions, tracker, lambda usage: chunk(usage=usage)):
        yield event
