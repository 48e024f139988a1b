"""Server-sent events: the fan-in of a request's choices, SSE framing, and the streamed response that owns its slots."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from safethink_server.api.errors import APIError
from safethink_server.api.lifecycle import Lifecycle, shutting_down
from safethink_server.api.protocol import ChatCompletionChunk, DeltaMessage, ErrorResponse, GenerationRequest, Usage
from safethink_server.api.sessions import close_all
from safethink_server.api.tracker import RequestTracker
from safethink_server.api.usage import counted_usage
from safethink_server.schema import RequestStatus
from safethink_server.steering.output import Delta
from safethink_server.steering.session import SteeringSession

DONE = "data: [DONE]\n\n"  # the last event of a chat or completions stream


async def choice_runs(sessions: list[SteeringSession]) -> AsyncIterator[tuple[int, Delta | None]]:
    """Every choice's deltas tagged with its index as they come, then (index, None) when it ends.
    One choice runs inline; several run as tasks feeding a bounded queue (a slow reader holds them
    back rather than letting text pile up)."""
    if len(sessions) == 1:
        async for delta in sessions[0].run():
            yield 0, delta
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue(maxsize=64)

    async def pump(index: int, session: SteeringSession) -> None:
        try:
            async for delta in session.run():
                await queue.put((index, delta, None))
            await queue.put((index, None, None))
        except Exception as exc:
            await queue.put((index, None, exc))

    tasks = [asyncio.create_task(pump(index, session)) for index, session in enumerate(sessions)]
    try:
        for _ in range(len(sessions)):
            while True:
                index, delta, error = await queue.get()
                if error is not None:
                    raise error
                yield index, delta
                if delta is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


class SessionStream(StreamingResponse):
    """A streamed response that owns its sessions' engine slots and its request count: both are
    released when the response ends, however it ends (finished, failed, cancelled, or a client
    that left before the first chunk, when the body iterator never even starts)."""

    def __init__(self, sessions: list[SteeringSession], tracker: RequestTracker, content: AsyncIterator[str], lifecycle: Lifecycle,
                 abort_event: Callable[[APIError], str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sessions = sessions
        self.tracker = tracker
        self.content = content
        self.lifecycle = lifecycle
        self.abort_event = abort_event

    async def stream_response(self, send: Send) -> None:
        """Starlette's, in a scope that a drain past its timeout cancels: the stream then ends with its
        error event (the request's own failure, else "shutting down") and [DONE], or, where it had
        succeeded and its last events were going out, with [DONE] (a Responses stream: with the error
        event)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False  # the stream's last event went out
        with self.lifecycle.abortable() as scope:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
                ended = chunk.endswith(DONE)
            ended = True
        if scope.cancelled_caught and not ended:
            succeeded = self.tracker.status == RequestStatus.SUCCESS  # (a failure's error event may be what was cut)
            ends_with_done = self.abort_event is error_ending  # chat and completions, not Responses
            tail = DONE if ends_with_done and succeeded else self.abort_event(self.tracker.error or shutting_down())
            await send({"type": "http.response.body", "body": tail.encode("utf-8"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.content.aclose()  # type: ignore[attr-defined]
                    finally:
                        await close_all(self.sessions)
            finally:
                self.tracker.close()


def stream_tail(body: GenerationRequest, sessions: list[SteeringSession], tracker: RequestTracker,
                usage_event: Callable[[Usage], str]) -> Iterator[str]:
    """A finished stream's last events: the usage where the client asked for it, then [DONE]."""
    usage = counted_usage(sessions, tracker)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield usage_event(usage)
    yield DONE


def failed_stream(tracker: RequestTracker, exc: Exception) -> Iterator[str]:
    """A stream that failed after it began: the error as an event, then [DONE]."""
    yield error_ending(tracker.failed(exc))


def error_ending(error: APIError) -> str:
    return sse(error.body()) + DONE


def sse(payload: ChatCompletionChunk | ErrorResponse) -> str:
    # An error keeps its null `param` and `code`, as OpenAI's do.
    return f"data: {payload.model_dump_json(exclude_none=not isinstance(payload, ErrorResponse))}\n\n"


class DeltaEvents:
    """The SSE events of text deltas, from templates of the chunk model dumped once per stream and
    choice with a mark where the text goes: a delta then costs one JSON string encoding, not a model dump."""

    _MARK = "\x00"

    def __init__(self, chunk: Callable[..., ChatCompletionChunk], choices: int) -> None:
        mark = json.dumps(self._MARK)
        self._templates = [{
            "reasoning": sse(chunk(DeltaMessage(reasoning_content=self._MARK, reasoning=self._MARK), index=index)).split(mark),
            "answer": sse(chunk(DeltaMessage(content=self._MARK), index=index)).split(mark),
        } for index in range(choices)]

    def __call__(self, delta: Delta, index: int = 0) -> str:
        return json.dumps(delta.text, ensure_ascii=False).join(self._templates[index][delta.section])


def delta_message(delta: Delta) -> DeltaMessage:
    if delta.section == "reasoning":
        return DeltaMessage(reasoning_content=delta.text, reasoning=delta.text)
    return DeltaMessage(content=delta.text)
