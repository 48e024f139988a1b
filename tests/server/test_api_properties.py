"""The guarantee as the client reads it off the wire: the real FastAPI app (`create_app`), driven
in-process through `httpx.ASGITransport` with its lifespan run, over a scripted engine that
implements the real engine contract and a scripted scorer behind the real micro-batcher. Each
generated request (chat or /v1/completions, whole or streamed, n choices, logprobs with
alternatives, stop strings, a policy) is parsed as a client parses it: the JSON body, or the SSE
events reassembled per choice. Per choice:

(1) at threshold 0 (every watched step breaches) no logprob entry reaches the client, and the
    client's text less the inserted spans the report lists is whitespace only (for
    /v1/completions, whose text is the model's as written, the reasoning markers aside);
(2) at any threshold, `top_logprobs` is empty unless the report shows the window satisfied (as many
    released steps as `early_steps`), and then empty for the window's tokens, which come first; the
    entries' tokens, joined, are a prefix of the model's text (the client's text less the inserted
    spans, each of which must stand exactly at its `at`);
(3) the logprob entries never outnumber the completion tokens of the usage, where usage is given.

API_PROPERTY_EXAMPLES sets the examples per route and shape (30 by default: the file runs in seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_models.base import Scorer, StepItem, StepScore
from safethink_server.api.app import create_app
from safethink_server.config import ServerSettings
from safethink_server.engines.base import COMMON_FIELDS
from safethink_server.prompt import Conversation, RenderedPrompt, open_turn, raw_prompt_section
from safethink_server.schema import ReasoningConfig
from tests.support.scripted_engine import MODEL_PIECES, ScriptedEngine

PREFIX, REFUSAL = "[FIX]", "[NO]"
START, END = "<think>", "</think>"
MODEL = "scripted"


class AppEngine(ScriptedEngine):
    """The scripted engine as the app meets it: prompts rendered without a chat template (the
    conversation's text, then the turn's opening as the real prompt module decides it), and the
    request fields an engine with logprobs and a logit bias honours."""

    honoured_fields = COMMON_FIELDS | {"logprobs", "top_logprobs", "logit_bias"}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.eos_token_id + 1

    async def render(self, conversation: Conversation, reasoning: ReasoningConfig, model: str | None = None) -> RenderedPrompt:
        rendered = open_turn(conversation, reasoning, template_opens_reasoning=False)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation.messages)
        rendered.ids = self.tokenizer.encode(text + rendered.opening)
        return rendered

    async def render_raw(self, prompt: str | list[int], reasoning: ReasoningConfig, model: str | None = None,
                         add_special_tokens: bool = True) -> RenderedPrompt:
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        return RenderedPrompt(self.tokenizer.encode(text), raw_prompt_section(text, reasoning), raw_text=text)


class ScriptedScorer(Scorer):
    """p_unsafe 0.99 for a step that says BAD, else the next of a generated list; scored inline."""

    name = "scripted"

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.seen: list[str] = []

    def score_batch(self, items: Any) -> list[StepScore]:
        out = []
        for item in items:
            assert isinstance(item, StepItem)
            self.seen.append(item.step)
            p = 0.99 if "BAD" in item.step else self.scores[(len(self.seen) - 1) % len(self.scores)]
            out.append(StepScore(p_unsafe=p))
        return out

    async def ascore_batch(self, items: Any) -> list[StepScore]:
        return self.score_batch(items)


@dataclass
class Case:
    pieces: list[str]
    batch_sizes: list[int]
    scores: list[float]
    route: str  # "chat" or "completions"
    stream: bool
    include_usage: bool
    n: int
    top_logprobs: int | None  # None: no logprobs asked
    stop: list[str]
    max_tokens: int
    threshold: float
    early_steps: int
    max_interventions: int
    prefill_reasoning: bool  # chat: the server opens the reasoning
    raw_prompt: str  # completions: the prompt (open reasoning or not)
    reasoning_budget: int | None
    max_step_tokens: int
    logit_bias: bool


@st.composite
def cases(draw: st.DrawFn) -> Case:
    # Steps: blank tokens before some (no step's: their entries go out only with the next step judged
    # safe), a few pieces, then (mostly) a delimiter, so that windows are satisfied and passed.
    step = st.tuples(st.sampled_from([[], [], ["\n"], ["<pad>"], ["\n\n", "\n"]]),
                     st.lists(st.sampled_from(MODEL_PIECES), min_size=1, max_size=5),
                     st.sampled_from(["\n\n", "\n\n", ".\n\n", "\n", ""]))
    pieces = [p for blank, body, end in draw(st.lists(step, min_size=1, max_size=8)) for p in [*blank, *body, end] if p]
    # The specials anywhere, the first and last places included.
    for special in draw(st.lists(st.sampled_from([START, END, "<pad>", "<EOS>", "\n\n"]), max_size=3)):
        pieces.insert(draw(st.sampled_from([0, len(pieces), draw(st.integers(0, len(pieces)))])), special)
    return Case(
        pieces=pieces,
        batch_sizes=draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)),
        scores=draw(st.lists(st.sampled_from([0.0, 0.2, 0.6, 0.99, 1.0]) | st.floats(0.0, 1.0), min_size=1, max_size=4)),
        route="chat",  # (each test sets the route and the stream)
        stream=False,
        include_usage=draw(st.booleans()),
        n=draw(st.integers(1, 3)),
        top_logprobs=draw(st.one_of(st.none(), st.integers(0, 3))),
        stop=draw(st.sampled_from([[], ["STOP"], ["ok"], ["\n"], ["[FIX"]])),
        max_tokens=draw(st.integers(1, 40) | st.just(40)),
        threshold=draw(st.sampled_from([0.0, 0.5, 1.0])),
        early_steps=draw(st.integers(1, 3)),
        max_interventions=draw(st.integers(0, 2)),
        prefill_reasoning=draw(st.booleans()),
        raw_prompt=draw(st.sampled_from(["q", "q<think>\n", "q<think>\nBAD</think>\n\n"])),
        reasoning_budget=draw(st.sampled_from([None, 1024, 6])),
        max_step_tokens=draw(st.sampled_from([256, 5])),
        logit_bias=draw(st.booleans()),
    )


@dataclass
class ClientChoice:
    """One choice as a client reads it off the wire."""

    sections: dict[str, str] = field(default_factory=lambda: {"reasoning": "", "answer": "", "text": ""})
    tokens: list[str] = field(default_factory=list)  # the logprob entries' tokens, in order
    tops: list[int] = field(default_factory=list)  # how many alternatives each entry carries
    report: dict[str, Any] | None = None
    finish_reason: str | None = None


@dataclass
class ClientView:
    choices: dict[int, ClientChoice]
    usage: dict[str, Any] | None


def request_body(case: Case) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": case.max_tokens, "n": case.n, "stream": case.stream}
    if case.stop:
        body["stop"] = case.stop
    if case.stream and case.include_usage:
        body["stream_options"] = {"include_usage": True}
    if case.logit_bias:  # a bias towards the unsafe token unlocks nothing
        body["logit_bias"] = {str(AppEngine([], [1]).tokenizer.ids[" BAD"]): 100}
    if case.route == "chat":
        body["messages"] = [{"role": "user", "content": "q"}]
        if case.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = case.top_logprobs
        return "/v1/chat/completions", body
    body["prompt"] = case.raw_prompt
    if case.top_logprobs is not None:
        body["logprobs"] = case.top_logprobs
    return "/v1/completions", body


def sse_payloads(text: str) -> list[dict[str, Any]]:
    payloads, done = [], False
    for event in text.split("\n\n"):
        if not event.strip():
            continue
        assert event.startswith("data: "), event
        data = event.removeprefix("data: ")
        assert not done, "an event after [DONE]"
        if data == "[DONE]":
            done = True
            continue
        payload = json.loads(data)
        assert "error" not in payload, payload
        payloads.append(payload)
    assert done, "the stream did not end with [DONE]"
    return payloads


def add_logprobs(choice: ClientChoice, logprobs: dict[str, Any] | None, route: str) -> None:
    if not logprobs:
        return
    if route == "chat":
        for entry in logprobs.get("content") or []:
            choice.tokens.append(entry["token"])
            choice.tops.append(len(entry["top_logprobs"]))
    else:
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
        choice.tokens += logprobs["tokens"]
        choice.tops += [len(top) for top in logprobs["top_logprobs"]]


def parse(case: Case, response: httpx.Response) -> ClientView:
    assert response.status_code == 200, response.text
    choices: dict[int, ClientChoice] = {}
    usage = None
    if not case.stream:
        body = response.json()
        usage = body["usage"]
        for raw in body["choices"]:
            choice = choices.setdefault(raw["index"], ClientChoice())
            if case.route == "chat":
                choice.sections["reasoning"] = raw["message"].get("reasoning_content") or ""
                choice.sections["answer"] = raw["message"].get("content") or ""
            else:
                choice.sections["text"] = raw["text"]
            add_logprobs(choice, raw.get("logprobs"), case.route)
            choice.report, choice.finish_reason = raw.get("safethink"), raw["finish_reason"]
        return ClientView(choices, usage)
    payloads = sse_payloads(response.text)
    if case.route == "chat":  # every choice's role, in index order, before any choice's output (as vLLM sends them)
        indices = [raw["index"] for payload in payloads for raw in payload["choices"]]
        roles = [raw["index"] for payload in payloads for raw in payload["choices"] if raw["delta"].get("role")]
        assert roles == indices[: case.n] == list(range(case.n)), indices
    for payload in payloads:
        if payload.get("usage") is not None:
            assert usage is None, "usage given twice"
            usage = payload["usage"]
        for raw in payload["choices"]:
            choice = choices.setdefault(raw["index"], ClientChoice())
            assert choice.finish_reason is None, "an event after the choice's last"
            if case.route == "chat":
                delta = raw["delta"]
                choice.sections["reasoning"] += delta.get("reasoning_content") or ""
                choice.sections["answer"] += delta.get("content") or ""
                report = payload.get("safethink")
            else:
                choice.sections["text"] += raw["text"]
                report = raw.get("safethink")
            add_logprobs(choice, raw.get("logprobs"), case.route)
            if raw.get("finish_reason") is not None:
                choice.report, choice.finish_reason = report, raw["finish_reason"]
    return ClientView(choices, usage)


def model_text(choice: ClientChoice, route: str) -> str:
    """The client's text less the listed inserted spans, each checked to stand exactly at its `at`."""
    assert choice.report is not None, "no report for the choice"
    where_of = (lambda span: span["section"]) if route == "chat" else (lambda span: "text")
    out = []
    for where in (("reasoning", "answer") if route == "chat" else ("text",)):
        text = choice.sections[where]
        spans = sorted((s for s in choice.report["inserted"] if where_of(s) == where), key=lambda s: s["at"])
        kept, cursor = "", 0
        for span in spans:
            at, piece = span["at"], span["text"]
            assert piece, f"an empty inserted span: {span}"
            assert at >= cursor, f"inserted spans overlap: {spans}"
            assert text[at : at + len(piece)] == piece, f"{span} is not at its offset in {text!r}"
            kept += text[cursor:at]
            cursor = at + len(piece)
        out.append(kept + text[cursor:])
    return "".join(out)


def normalised(text: str) -> str:
    """Text as both the entries' tokens and the client's text spell it: a token decoded alone shows
    half a character as U+FFFD, and the chat API drops the reasoning markers and the whitespace that
    starts the answer; so whitespace, markers and non-ASCII characters are left out."""
    text = "".join(text.split())
    for marker in (END, START):
        text = text.replace(marker, "")
    return "".join(c for c in text if c.isascii())


def known_stop_overrun(case: Case) -> bool:
    """A raw answer's leading whitespace is held back until the next token shows no start marker
    follows; a stop string in it is found only then, one token late (a known bug)."""
    return case.route == "completions" and "\n" in case.stop


def check(case: Case, view: ClientView) -> None:
    assert sorted(view.choices) == list(range(case.n))
    if case.stream and not case.include_usage:
        assert view.usage is None
    else:
        assert view.usage is not None
    total_entries = 0
    for index, choice in view.choices.items():
        assert choice.finish_reason in ("stop", "length", "content_filter"), choice.finish_reason
        released = model_text(choice, case.route)
        report = choice.report
        assert report is not None
        total_entries += len(choice.tokens)
        if case.top_logprobs is None:
            assert not choice.tokens, "logprob entries that were not asked for"
        # (1) At threshold 0 every watched step breaches: nothing of the model's but whitespace.
        if case.threshold == 0.0:
            assert not choice.tokens, f"choice {index}: a logprob entry at threshold 0: {choice.tokens}"
            rest = released.replace(START, "").replace(END, "") if case.route == "completions" else released
            assert not rest.strip(), f"choice {index}: model text {released!r} at threshold 0"
            assert not any(s["action"] == "released" for s in report["steps"])
        # (2) No alternative inside the window; the entries spell a prefix of the model's released text.
        released_steps = [s for s in report["steps"] if s["action"] == "released"]
        satisfied = len(released_steps) >= case.early_steps
        with_top = [bool(top) for top in choice.tops]
        if not satisfied:
            assert not any(with_top), f"choice {index}: top_logprobs inside the window ({report['steps']})"
        else:
            # The window's tokens (those of its steps, and blank ones between) come first, without alternatives.
            assert with_top == sorted(with_top), f"choice {index}: top_logprobs inside the window: {choice.tops}"
            in_window = sum(s["tokens"] for s in released_steps[: case.early_steps])
            assert not any(with_top[:in_window]), f"choice {index}: top_logprobs among the window's {in_window} tokens: " \
                                                  f"{choice.tops}"
            assert all(top <= (case.top_logprobs or 0) for top in choice.tops)
        tokens = choice.tokens
        if known_stop_overrun(case) and tokens:
            tokens = tokens[:-1]  # see test_a_stop_string_in_held_back_whitespace_ends_the_sequence_there
        given_text = normalised("".join(tokens))
        allowed = normalised(released + (case.stop[0] if case.stop else ""))
        assert allowed.startswith(given_text), f"choice {index}: entries {choice.tokens} spell {given_text!r} beyond {released!r}"
    # (3) Never more entries than completion tokens (usage sums the choices).
    if view.usage is not None:
        assert total_entries <= view.usage["completion_tokens"], (total_entries, view.usage)


def app_for(case: Case) -> tuple[Any, AppEngine]:
    engine = AppEngine([], case.batch_sizes)
    tok = engine.tokenizer
    engine.script = [tok.eos_token_id if p == "<EOS>" else tok.ids[p] for p in case.pieces]
    server = ServerSettings(
        threshold=case.threshold, early_steps=case.early_steps, max_interventions=case.max_interventions,
        prefix=PREFIX, refusal=REFUSAL, allow_assistant_prefill=True, audit_log="off", scorer_max_wait_ms=0,
        prefill_reasoning=case.prefill_reasoning, reasoning_budget=case.reasoning_budget, max_step_tokens=case.max_step_tokens,
    )
    return create_app(server, engine, ScriptedScorer(case.scores)), engine


async def exchange(case: Case) -> tuple[ClientView, AppEngine]:
    app, engine = app_for(case)
    path, body = request_body(case)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            response = await client.post(path, json=body)
    return parse(case, response), engine


@pytest.mark.parametrize(("route", "stream"), [("chat", False), ("chat", True), ("completions", False), ("completions", True)])
@settings(max_examples=int(os.environ.get("API_PROPERTY_EXAMPLES", 30)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_what_the_client_parses_holds_the_guarantee(route: str, stream: bool, case: Case) -> None:
    """Each API's formatting, whole and streamed, gets its own share of the examples."""
    case.route, case.stream = route, stream
    view, engine = asyncio.run(exchange(case))
    assert engine.active == 0, "an engine slot is still held after the response"
    check(case, view)


def test_threshold_zero_over_the_wire_gives_only_server_text():
    """An example of every route and shape at threshold 0: the unsafe step never shows."""
    for route in ("chat", "completions"):
        for stream in (False, True):
            case = Case(pieces=["a", " BAD", ".\n\n", "b", " ok", ".\n\n", END, "a", " BAD"], batch_sizes=[3], scores=[0.0],
                        route=route, stream=stream, include_usage=True, n=2, top_logprobs=2, stop=[], max_tokens=40,
                        threshold=0.0, early_steps=2, max_interventions=1, prefill_reasoning=True, raw_prompt="q<think>\n",
                        reasoning_budget=None, max_step_tokens=256, logit_bias=True)
            view, _ = asyncio.run(exchange(case))
            check(case, view)
            for choice in view.choices.values():
                assert choice.finish_reason == "content_filter"
                assert [s["kind"] for s in choice.report["inserted"]][-1] == "refusal"


@pytest.mark.xfail(strict=True, reason="known bug: a stop string in a raw answer's held-back leading whitespace is found one "
                                        "token late; that token stays in the sequence, in usage and in the logprob entries")
def test_a_stop_string_in_held_back_whitespace_ends_the_sequence_there():
    """/v1/completions from a prompt that opens no reasoning: the "\\n" that starts the output is held
    back until the next token shows that no start marker follows. It is then answer text and
    completes the stop string "\\n", so the sequence should end at it: the client's text is empty, and
    neither usage nor the logprob entries may hold the next token, whose text never goes out."""
    case = Case(pieces=["\n", "a", "\n\n", "b"], batch_sizes=[1], scores=[0.0], route="completions", stream=False,
                include_usage=False, n=1, top_logprobs=0, stop=["\n"], max_tokens=40, threshold=0.5, early_steps=1,
                max_interventions=0, prefill_reasoning=False, raw_prompt="q", reasoning_budget=None, max_step_tokens=256,
                logit_bias=False)
    view, _ = asyncio.run(exchange(case))
    choice = view.choices[0]
    assert (choice.sections["text"], choice.finish_reason) == ("", "stop")
    assert choice.tokens == ["\n"], "a logprob entry of a token past the stop string"
    assert view.usage is not None and view.usage["completion_tokens"] == 1, "usage counts a token past the stop string"
