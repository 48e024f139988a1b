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
from tests.server.test_accounting import Quiet
from tests.server.test_api_properties import MODEL, AppEngine


async def stream_cut_at(event: int) -> list[str]:
    """The events a client reads from a chat stream (usage included) when a drain with no time to wait
    begins while the server sends event number `event`."""
    engine = AppEngine([], [1])
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
