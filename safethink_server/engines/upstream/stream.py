"""Reading an upstream's SSE stream: events parsed as whole network reads bring them, read ahead by
a background task so that a fast upstream's events are relayed together, with the upstream's
silences and malformed data turned into errors the gateway answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from pydantic_core import from_json

from safethink_server.engines.upstream.errors import UpstreamError, stream_error


class SSEDecoder:
    """The `data` of each `data:` line of an SSE byte stream (OpenAI-style servers send one JSON
    document per line, events separated by a blank line or, leniently, by a single line end). A line
    split across network reads is joined; comments, event names and keep-alives are skipped."""

    def __init__(self) -> None:
        self._partial = b""
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._partial += chunk
            return []
        complete, self._partial = self._partial + chunk[: end + 1], chunk[end + 1 :]
        if not self._started:  # the stream's first whole lines: a byte order mark may open them
            self._started = True
            complete = complete.removeprefix(b"\xef\xbb\xbf")
        return [line[5:].removeprefix(b" ") for line in complete.splitlines() if line.startswith(b"data:")]


class _SilenceTimer:
    """The read deadline of one stream: a single timer, re-armed lazily as reads come in (a timeout
    scope per read costs more than the read itself), that cancels the reading task once a wait has
    lasted `first_s` (before the first read) or `every_s` (after it)."""

    def __init__(self, first_s: float, every_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling() if self._task is not None else 0
        self.limit_s = first_s
        self._every_s = every_s
        self._since: float | None = None  # when the current wait began; None between waits
        self._handle: asyncio.TimerHandle | None = None
        self.expired = False

    def waiting(self) -> None:
        self._since = self._loop.time()
        due = self._since + self.limit_s
        if self._handle is not None and self._handle.when() > due:
            self._handle.cancel()
            self._handle = None
        if self._handle is None:
            self._handle = self._loop.call_at(due, self._check)

    def heard(self) -> None:
        self._since = None
        self.limit_s = self._every_s

    def _check(self) -> None:
        self._handle = None
        if self._since is None or self._task is None:
            return  # not waiting: the next wait arms the timer again
        due = self._since + self.limit_s
        if self._loop.time() + 1e-3 >= due:  # timers may fire up to the clock's resolution early
            self.expired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def timed_out(self) -> bool:
        """After a CancelledError: whether it was this timer's alone (and is now taken back)."""
        return self.expired and self._task is not None and self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def sse_batches(chunks: AsyncIterator[bytes], first_byte_timeout: float, chunk_timeout: float) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The parsed events of an SSE body until `[DONE]`, as many at a time as one read of `chunks`
    brings: a fast upstream's events are relayed together instead of one by one. Malformed data and
    silence raise."""
    decoder = SSEDecoder()
    silence = _SilenceTimer(first_byte_timeout, chunk_timeout)
    try:
        while True:
            try:
                silence.waiting()
                chunk = await anext(chunks)
                silence.heard()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if silence.timed_out():
                    raise UpstreamError(f"the upstream sent nothing for {silence.limit_s:g} s", 504, "timeout") from None
                raise
            events = []
            for data in decoder.feed(chunk):
                if not data.strip():
                    continue
                if data.strip() == b"[DONE]":
                    if events:
                        yield events
                    return
                try:
                    event = from_json(data)  # pydantic's parser: a quarter of json.loads' time per event
                except ValueError:
                    # (the data is not quoted: it may hold model text that was never judged)
                    raise UpstreamError(f"the upstream sent malformed event data ({len(data)} bytes, not JSON)", 502, "protocol") from None
                if not isinstance(event, dict):
                    raise UpstreamError("the upstream sent an event that is not a JSON object", 502, "protocol")
                if "error" in event:  # (its message may quote unjudged model text: it goes to the log only)
                    raise stream_error(event["error"])
                events.append(event)
            if events:
                yield events
    finally:
        silence.close()


async def sse_events(chunks: AsyncIterator[bytes], first_byte_timeout: float, chunk_timeout: float) -> AsyncIterator[dict[str, Any]]:
    """The parsed events of an SSE body until `[DONE]`, one at a time."""
    async for batch in sse_batches(chunks, first_byte_timeout, chunk_timeout):
        for event in batch:
            yield event


class EventReader:
    """Reads an SSE stream ahead in a background task. `take` returns every event read since the
    last call, so events that arrive while the reader's consumer is busy (judging a step, writing to
    a slow client) go out together. At most `max_buffered` events are read ahead."""

    def __init__(self, chunks: AsyncIterator[bytes], first_byte_timeout: float, chunk_timeout: float,
                 max_buffered: int = 4096) -> None:
        self._events: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        self._ended = False
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._max_buffered = max_buffered
        self._task = asyncio.get_running_loop().create_task(self._read(sse_batches(chunks, first_byte_timeout, chunk_timeout)))

    async def _read(self, batches: AsyncGenerator[list[dict[str, Any]], None]) -> None:
        try:
            async for batch in batches:
                self._events += batch
                self._arrived.set()
                while len(self._events) >= self._max_buffered:
                    self._room.clear()
                    await self._room.wait()
        except Exception as exc:
            self._error = exc
        finally:
            self._ended = True
            self._arrived.set()
            await batches.aclose()

    async def take(self) -> list[dict[str, Any]]:
        """The events read so far and not taken (waiting for one); StopAsyncIteration after [DONE]."""
        while not self._events and not self._ended:
            self._arrived.clear()
            await self._arrived.wait()
        if self._events:
            events, self._events = self._events, []
            self._room.set()
            return events
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.wait({self._task})  # unlike awaiting the task, this leaves a cancellation of the caller alone
