"""What the app hands the scorer of a request, in-process over the scripted engine: every part of the
conversation a client sent (the prefill and template variables included), and a clear 400 for a
steered conversation longer than the scorer reads, with no engine slot taken."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.context import conversation_text
from safethink_server.api.app import create_app
from safethink_server.config import ServerSettings
from tests.server.test_api_properties import MODEL, AppEngine


class Recording(Scorer):
    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.items: list[StepItem] = []

    def score_batch(self, items: Any) -> list[StepScore]:
        self.items += items
        return [StepScore(p_unsafe=0.0) for _ in items]


async def post(settings: ServerSettings, scorer: Scorer, path: str, body: dict[str, Any]) -> tuple[httpx.Response, AppEngine]:
    engine = AppEngine([], [1])
    tok = engine.tokenizer
    engine.script = [tok.ids[p] for p in ["a", ".\n\n", "b", ".\n\n"]] + [tok.eos_token_id]
    app = create_app(settings, engine, scorer)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json={"model": MODEL, "max_tokens": 8, **body}), engine


SETTINGS = ServerSettings(audit_log="off", scorer_max_wait_ms=0, allow_assistant_prefill=True, allow_client_overrides=True,
                          scorer_max_context_chars=2_000)


def test_the_scorer_reads_every_part_of_the_request():
    scorer = Recording()
    messages = [{"role": "developer", "content": "DEV-TEXT"},
                {"role": "user", "content": "USER-ONE", "name": "NAME-TEXT"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "CALL-ID", "type": "function",
                                                                      "function": {"name": "f", "arguments": "{\"a\": \"ARGS\"}"}}]},
                {"role": "tool", "tool_call_id": "CALL-ID", "content": "TOOL-RESULT"},
                {"role": "user", "content": [{"type": "text", "text": "LATEST-"}, {"type": "text", "text": "PARTS"}]},
                {"role": "assistant", "content": "PREFILL-TEXT"}]
    response, _ = asyncio.run(post(SETTINGS, scorer, "/v1/chat/completions", {
        "messages": messages, "continue_final_message": True, "add_generation_prompt": False,
        "chat_template_kwargs": {"persona": "TEMPLATE-VARIABLE"}}))
    assert response.status_code == 200, response.text
    read = conversation_text(scorer.items[0].prompt, scorer.items[0].history)
    for part in ["DEV-TEXT", "USER-ONE", "NAME-TEXT", "CALL-ID", "ARGS", "TOOL-RESULT", "LATEST-PARTS", "PREFILL-TEXT",
                 "TEMPLATE-VARIABLE"]:  # tool definitions: tests/reward_models/test_context.py (this engine takes no tools)
        assert part in read, part
    assert scorer.items[0].prompt == "LATEST-PARTS"


def test_a_steered_conversation_longer_than_the_scorer_reads_is_a_400_that_holds_no_slot():
    long = "y" * 2_500
    for path, body, param in [("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
                              ("/v1/completions", {"prompt": long}, "prompt")]:
        response, engine = asyncio.run(post(SETTINGS, Recording(), path, body))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, "context_length_exceeded", "invalid_request_error")
        assert "at most 2000" in error["message"] and engine.generations == [], "a generation was started"
    # with steering off for the request, nothing is scored, so there is no limit
    response, _ = asyncio.run(post(SETTINGS, Recording(), "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": long}], "safethink": {"early_steps": 0}}))
    assert response.status_code == 200, response.text
