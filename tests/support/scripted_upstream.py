"""A real OpenAI-style HTTP server that streams a fixed script of chat events with logprobs, the way
vLLM's chat API sends them: an event may carry entries and no text (the `</think>` token its
reasoning parser turns into the section change, a tool-call token its tool parser holds back).
The request's `model` picks the script; a continuation (the last message is the assistant's, with
`continue_final_message`) gets the script's continuation. Each script goes out in one write, so the
gateway reads all its events in one batch. And a real /classify server that scores by keyword."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.support.threaded_server import ThreadedServer

# An event: (field, text, [tokens with entries], finish_reason). Field None: an event without text.
Event = tuple[str | None, str, list[str], str | None]


def entry(token: str) -> dict[str, Any]:
    """A chat logprob entry; the alternatives name the token so that a test can tell them apart."""
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": -0.5}, {"token": f"alt({token})", "logprob": -1.5}]}


SCRIPTS: dict[str, tuple[list[Event], list[Event]]] = {
    # Step one (safe), then the end of the reasoning as an event with no text, then a step the
    # keyword scorer finds unsafe. The continuation after an intervention writes a safe step.
    "breach": ([("reasoning_content", "Fine step one.\n\n", ["Fine", " step", " one", ".\n\n"], None),
                (None, "", ["</think>"], None),
                ("content", "BAD step two.\n\n", ["BAD", " step", " two", ".\n\n"], None),
                ("content", "Done.", ["Done", "."], "stop")],
               [("reasoning_content", "Good step three.\n\n", ["Good", " step", " three", ".\n\n"], None),
                (None, "", ["</think>"], None),
                ("content", "Done.", ["Done", "."], "stop")]),
    # The same without a breach: the text-less event's entry goes out with the text after it.
    "safe": ([("reasoning_content", "Fine step one.\n\n", ["Fine", " step", " one", ".\n\n"], None),
              (None, "", ["</think>"], None),
              ("content", "Good step two.\n\n", ["Good", " step", " two", ".\n\n"], None),
              ("content", "Done.", ["Done", "."], "stop")], []),
    # An event whose text crosses the end of step one (the window's end at --early-steps 1).
    "straddle": ([("reasoning_content", "Fine step", ["Fine", " step"], None),
                  ("reasoning_content", " one.\n\nGood", [" one", ".\n\n", "Good"], None),
                  ("reasoning_content", " step two.\n\n", [" step", " two", ".\n\n"], None),
                  ("content", "Done.", ["Done", "."], "stop")], []),
}


def _chunk(event: Event, first: bool) -> str:
    field, text, tokens, finish = event
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if field is not None:
        delta[field] = text
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": {"content": [entry(t) for t in tokens]}}
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}) + "\n\n"


def stream(events: list[Event]) -> str:
    usage = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 10, "completion_tokens": sum(len(e[2]) for e in events), "total_tokens": 0}}
    return "".join(_chunk(e, i == 0) for i, e in enumerate(events)) + f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"


class ScriptedUpstream(ThreadedServer):
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1"
        self.requests: list[dict[str, Any]] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, object]:
            return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "scripted"} for name in SCRIPTS]}

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> StreamingResponse | JSONResponse:
            body = await request.json()
            self.requests.append(body)
            first, continuation = SCRIPTS[body["model"]]
            continued = body.get("continue_final_message") and body["messages"][-1]["role"] == "assistant"
            events = continuation if continued else first
            if not events:
                return JSONResponse({"error": {"message": "no continuation scripted", "type": "invalid_request_error"}}, status_code=400)

            async def once():  # type: ignore[no-untyped-def]
                yield stream(events)  # one write: the gateway reads every event in one batch

            return StreamingResponse(once(), media_type="text/event-stream")

        super().__init__(app, port)


class KeywordScorer(ThreadedServer):
    """vLLM's /classify: p_unsafe 0.99 for a text that holds "BAD", else 0.01."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.inputs: list[str] = []
        app = FastAPI()

        @app.post("/classify")
        async def classify(body: dict) -> JSONResponse:
            self.inputs += body["input"]
            data = [{"index": i, "probs": [0.01, 0.99] if "BAD" in text else [0.99, 0.01]} for i, text in enumerate(body["input"])]
            return JSONResponse({"object": "list", "data": data})

        super().__init__(app, port)
