"""What the three generation APIs share: admission, sessions, a whole response or a stream, and the request counted once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from safethink_server.api.errors import APIError
from safethink_server.api.lifecycle import shutting_down
from safethink_server.api.protocol import GenerationRequest, Usage
from safethink_server.api.responses import ResponsesRequest
from safethink_server.api.sessions import close_all
from safethink_server.api.state import ServerState
from safethink_server.api.streaming import SessionStream, choice_runs, error_ending
from safethink_server.api.tracker import RequestTracker
from safethink_server.api.usage import counted_usage
from safethink_server.engines.base import AnswerFormat, TokenLogprob
from safethink_server.schema import RequestStatus
from safethink_server.steering.output import Delta
from safethink_server.steering.session import SteeringSession

Completer = Callable[[ServerState, Any, list[SteeringSession], AnswerFormat | None, "RequestTracker", Request], Awaitable[Response]]


Streamer = Callable[[ServerState, Any, list[SteeringSession], AnswerFormat | None, "RequestTracker"], AsyncIterator[str]]


async def respond(state: ServerState, tracker: RequestTracker, body: GenerationRequest | ResponsesRequest, request: Request,
                  sessions_for: Callable[[], Awaitable[tuple[list[SteeringSession], AnswerFormat | None]]],
                  completer: Completer, streamer: Streamer, abort_event: Callable[[APIError], str] | None = None) -> Response:
    """A completion request of either API: its sessions built and checked, then answered whole or
    streamed. The request is counted once and every slot is freed, however it ends (a drain that
    times out aborts it: `abort_event` is a stream's last event then)."""
    sessions: list[SteeringSession] = []
    streaming = False
    try:
        tracker.admit()
        with state.lifecycle.abortable():  # returns from inside unless a drain past its timeout cancels it
            sessions, answer = await sessions_for()
            tracker.sessions = sessions
            if not body.stream:
                return await completer(state, body, sessions, answer, tracker, request)
            # A full queue answers 503 before the stream begins. The other choices take their slots as
            # they run: with fewer slots than choices, they wait for the first ones to end.
            await sessions[0].start()
            response = SessionStream(sessions, tracker, streamer(state, body, sessions, answer, tracker), state.lifecycle,
                                     abort_event or error_ending)
            streaming = True  # from here the response owns the slots and the count
            return response
        tracker.status = RequestStatus.ABORTED  # the drain timed out
        return shutting_down().response()
    except Exception as exc:
        return tracker.failed(exc).response()
    finally:
        if not streaming:
            try:
                await close_all(sessions)
            finally:
                tracker.close()


@dataclass
class Released:
    """One choice's released deltas, in order, for a whole response."""

    deltas: list[Delta] = field(default_factory=list)

    def of(self, *sections: str) -> str:
        return "".join(d.text for d in self.deltas if d.section in sections)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [entry for d in self.deltas for entry in d.logprobs]


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected. The request's body is read by now, so the next ASGI
    message is the disconnect: waited for, not polled (vLLM's `listen_for_disconnect`)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0)  # a server that answers at once with something else is not spun on


async def finished(sessions: list[SteeringSession], tracker: RequestTracker, request: Request) -> tuple[list[Released], Usage] | Response:
    """Every choice's released deltas and the usage, once all have ended (the request counted as a
    success); or the response that ends the request early (a client gone, a failure)."""
    parts = [Released() for _ in sessions]

    async def collect() -> None:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for index, delta in runs:
                if delta is None:
                    continue
                tracker.saw(delta.text, index)
                parts[index].deltas.append(delta)

    task = asyncio.create_task(collect())
    gone = asyncio.create_task(client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            gone.result()  # a failure to listen is a failure, not a client gone
            return JSONResponse({}, status_code=499)
        task.result()
    except Exception as exc:
        return tracker.failed(exc).response()
    finally:
        gone.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError, Exception):
            await gone
        if not task.done():
            task.cancel()  # the sessions' own `finally` frees the slots; the route closes them again regardless
            with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
                await task
    return parts, counted_usage(sessions, tracker)
