"""A drain past its timeout, in-process over the scripted engine: a stream it cuts ends with [DONE]
(after its error event, where the request had no outcome yet), wherever the cut falls, including
while the stream's last events go out."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from safethink_server.api.app import create_app
from safethink_server.config import ServerSettings
from safethink_server.engines.base import EngineError, Generation
from tests.server.test_accounting import Quiet
from tests.server.test_api_properties import MODEL, AppEngine


async def stream_cut_at(event: int, fail_after: int | None = None) -> list[str]:
    """The events a client reads from a chat stream (usage included) when a drain with no time to wait
    begins while the server sends event number `event`; `fail_after`: the engine fails on that read."""
    engine = FailingEngine([], [1], fail_after) if fail_after is not None else AppEngine([], [1])
    tok = engine.tokenizer
    engine.script = [tok.ids[p] for p in ["a", ".\n\n", "b", ".\n\n"]] + [tok.eos_token_id]
    app = create_app(ServerSettings(audit_log="off", scorer_max_wait_ms=0, drain_timeout_s=0), engine, Quiet())
    lifecycle = app.state.safethink.lifecycle
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    sent, received = [], asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if len(sent) == event and not lifecycle.draining:
                asyncio.get_running_loop().create_task(lifecycle.drain())
                await asyncio.sleep(0.05)  # the drain cancels the stream here: this event does not go out
            sent.append(message["body"].decode())

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")], "client": ("test", 1), "server": ("test", 80)}
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), 30)
    return sent


class FailingEngine(AppEngine):
    """The scripted engine whose backend fails on a given read."""

    def __init__(self, ids: list[int], eos: list[int], fail_after: int) -> None:
        super().__init__(ids, eos)
        self.fail_after = fail_after

    async def start(self, *args: Any, **kwargs: Any) -> Generation:
        generation = await super().start(*args, **kwargs)
        read, fail_after = generation.next_tokens, self.fail_after

        async def next_tokens() -> list[int]:
            if generation._calls >= fail_after:
                raise EngineError("the backend failed")
            return await read()

        generation.next_tokens = next_tokens  # type: ignore[method-assign]
        return generation


FULL = asyncio.run(stream_cut_at(10**6))  # every chunk, uncut
USAGE = next(i for i, chunk in enumerate(FULL) if '"choices":[],"usage"' in chunk)  # computed as the request ends


@pytest.mark.parametrize("cut", range(len(FULL) + 1))
def test_a_stream_cut_by_the_drain_ends_with_done(cut):
    chunks = asyncio.run(stream_cut_at(cut))
    events = [event for chunk in chunks for event in chunk.split("\n\n") if event]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1, events
    if cut >= len(FULL) - 1:  # past the end, or [DONE] itself cut: the stream is whole
        assert len(chunks) == len(FULL)
    elif cut >= USAGE:  # the request had its outcome: what was cut is followed by [DONE] alone
        assert len(chunks) == cut + 1 and not any('"error"' in e for e in events), events
    else:  # no outcome yet: the error event, then [DONE]
        assert len(chunks) == cut + 1 and '"error"' in events[-2] and "shutting down" in events[-2], events


FAILED = asyncio.run(stream_cut_at(10**6, fail_after=3))  # a stream whose engine fails: its error event, then [DONE]


@pytest.mark.parametrize("cut", range(len(FAILED) + 1))
def test_a_failed_stream_cut_by_the_drain_keeps_its_own_error(cut):
    assert "the backend failed" in FAILED[-1] and FAILED[-1].endswith("data: [DONE]\n\n"), FAILED
    chunks = asyncio.run(stream_cut_at(cut, fail_after=3))
    events = [event for chunk in chunks for event in chunk.split("\n\n") if event]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1, events
    if cut >= len(FAILED) - 1:  # the error event and [DONE] were cut (or nothing was): the request's own error
        assert "the backend failed" in events[-2], events
    else:  # cut before the failure: the request had no outcome yet
        assert '"error"' in events[-2] and "shutting down" in events[-2], events
