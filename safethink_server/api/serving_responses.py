"""`/v1/responses`: the whole response and the Responses API's events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from safethink_server.api.responses import ResponseBuilder, ResponseEvents, ResponsesRequest
from safethink_server.api.serving import finished
from safethink_server.api.state import ServerState
from safethink_server.api.streaming import choice_runs
from safethink_server.api.tracker import RequestTracker
from safethink_server.api.usage import usage_of
from safethink_server.engines.base import AnswerFormat
from safethink_server.steering.session import SteeringSession


async def complete_response(state: ServerState, body: ResponsesRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                            tracker: RequestTracker, request: Request) -> Response:
    done = await finished(sessions, tracker, request)
    if isinstance(done, Response):
        return done
    parts, usage = done
    session, text = sessions[0], parts[0]
    whole = ResponseBuilder(body, state.engine.model_name).whole(text.of("reasoning") or None, text.of("answer"),
                                                                session.finish_reason, usage, session.client_report)
    return JSONResponse(whole)


async def stream_response(state: ServerState, body: ResponsesRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                          tracker: RequestTracker) -> AsyncIterator[str]:
    """`/v1/responses` streamed: the Responses API's events, each text delta as it is released."""
    events = ResponseEvents(ResponseBuilder(body, state.engine.model_name))
    for event in events.start():
        yield event
    try:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for _, delta in runs:
                if delta is None or not delta.text:
                    continue
                tracker.saw(delta.text)
                for event in events.delta(delta.section, delta.text):
                    yield event
        usage = usage_of(sessions)
        ending = list(events.end(sessions[0].finish_reason, usage, sessions[0].client_report))
    except Exception as exc:
        yield events.error(tracker.failed(exc))
        return
    tracker.finished(sessions, usage)
    for event in ending:
        yield event
