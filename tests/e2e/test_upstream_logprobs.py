"""Where an upstream's logprob entries go, over real sockets: a gateway (`--engine upstream`, in
front of a real scripted HTTP upstream, chat mode as auto-detection picks for an upstream with no
/tokenize) steered by a real /classify server that scores by keyword.

vLLM's chat API sends events with entries and no text: the `</think>` token its reasoning parser
turns into the section change, a tool-call token its tool parser holds back. Those entries belong
to the tokens of the next text, never to the text before them: released with step one, they would
tell the client the reasoning's end (and its alternatives) before anyone judged step two. And an
event's entries are checked against the window's end at the event's first byte, so that an event
whose text crosses the window's end gives no alternatives of tokens inside it."""

from __future__ import annotations

import json

import httpx
import pytest

from safethink_server.engines.base import SamplingParams
from safethink_server.engines.upstream.bytes import END
from safethink_server.engines.upstream.config import UpstreamConfig
from safethink_server.engines.upstream.engine import UpstreamEngine
from safethink_server.prompt import Conversation
from safethink_server.schema import ReasoningConfig
from tests.support.scripted_upstream import KeywordScorer, ScriptedUpstream
from tests.support.servers import free_port, running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

MATH = [{"role": "user", "content": "What is 2 + 2?"}]
REFUSAL = "I can't help with that request."
STEP_ONE = ["Fine", " step", " one", ".\n\n"]


@pytest.fixture(scope="module")
def upstream():
    with ScriptedUpstream(free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream):
    with KeywordScorer(free_port()) as scorer, running_server(
        "--engine", "upstream", "--upstream-url", upstream.url, "--scorer", "remote", "--scorer-url", scorer.url,
        "--allow-client-overrides",
    ) as url:
        assert httpx.get(url + "/health").json()["upstream_mode"] == "chat", "no /tokenize upstream: auto picks chat"
        yield url


def ask(url: str, model: str, stream: bool, **policy: object) -> tuple[str, str, str, list[tuple[str, list[str]]], list[list[str]]]:
    """(reasoning, answer, finish_reason, [(token, its alternatives)] in order, the tokens of each
    streamed chunk's entries)."""
    body = {"model": model, "messages": MATH, "max_tokens": 200, "logprobs": True, "top_logprobs": 2, "stream": stream}
    if policy:
        body["safethink"] = policy
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        entries = (choice["logprobs"] or {}).get("content") or []
        message = choice["message"]
        return (message.get("reasoning_content") or "", message.get("content") or "", choice["finish_reason"],
                [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in entries], [])
    reasoning = answer = finish = ""
    chunks: list[list[dict]] = []
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            reasoning += choice["delta"].get("reasoning_content") or ""
            answer += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
            if (choice.get("logprobs") or {}).get("content"):
                chunks.append(choice["logprobs"]["content"])
    entries = [e for chunk in chunks for e in chunk]
    return (reasoning, answer, finish, [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in entries],
            [[e["token"] for e in chunk] for chunk in chunks])


def tokens(entries: list[tuple[str, list[str]]]) -> list[str]:
    return [token for token, _ in entries]


# --- the engine: where each entry sits, and the first byte it is checked at -------------------

async def test_the_entries_of_an_event_without_text_sit_with_the_next_text(upstream):
    """Chat mode folds `<think>`/`</think>` into the text. The `</think>` token's entry comes in an
    event of its own, with no text: it sits at the last byte of the next event's text (whose
    first byte, the folded `</think>`, is the position its window check uses), not at step one's."""
    engine = UpstreamEngine(UpstreamConfig(url=upstream.url))
    await engine.open()
    try:
        assert engine.mode == "chat"
        conversation = Conversation(MATH)
        prompt = await engine.render(conversation, engine.reasoning_for(ReasoningConfig(), conversation))
        generation = await engine.start(prompt, SamplingParams(max_tokens=200, logprobs=2), conversation, model="safe")
        out: list[int] = []
        while not out or out[-1] != END:
            out += await generation.next_tokens()
        text = bytes(out[:-1]).decode()
        assert text == "<think>Fine step one.\n\n</think>Good step two.\n\nDone."
        one_end = len("<think>Fine step one.\n\n")
        two_end = one_end + len("</think>Good step two.\n\n")
        assert sorted(generation.logprobs_at) == [one_end - 1, two_end - 1, len(text) - 1]
        assert [e.token_id for e in generation.logprobs_at[one_end - 1]] == STEP_ONE, "only step one's entries sit at its end"
        assert [e.token_id for e in generation.logprobs_at[two_end - 1]] == ["</think>", "Good", " step", " two", ".\n\n"]
        placed = [(first, e.token_id) for first, e in generation.logprob_entries(0, len(text))]
        assert placed == ([(0, t) for t in STEP_ONE] + [(one_end, t) for t in ["</think>", "Good", " step", " two", ".\n\n"]]
                          + [(two_end, "Done"), (two_end, ".")]), "each entry is reported at its event's first byte"
        assert [e.token_id for e in generation.token_logprobs(0, one_end)] == STEP_ONE
        assert generation.logprob_entries(0, one_end - 1) == [], "an event's entries wait for its last byte"
        # A rollback into the second event drops its entries, the text-less event's with them.
        await generation.rollback(len(text) - one_end - 3 + 1)  # (+1: the end id)
        assert sorted(generation.logprobs_at) == [one_end - 1] and sorted(generation.logprobs_from) == [one_end - 1]
        await generation.abort()
    finally:
        await engine.close()


# --- through the gateway ----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_step_never_gives_out_the_entry_of_the_event_before_it(gateway, stream):
    """Step two breaches and no intervention is left: the client gets step one's text with step one's
    entries only, then the refusal; the text-less `</think>` event's entry (and step two's) never."""
    reasoning, answer, finish, entries, chunks = ask(gateway, "breach", stream, max_interventions=0)
    assert (reasoning, answer, finish) == ("Fine step one.\n\n", REFUSAL, "content_filter")
    assert tokens(entries) == STEP_ONE, f"entries beyond step one's reached the client: {tokens(entries)}"
    assert all(top == [] for _, top in entries), "an alternative inside the window"
    if stream:
        assert chunks == [STEP_ONE]


@pytest.mark.parametrize("stream", [False, True])
def test_a_replaced_step_takes_the_entry_of_the_event_before_it_along(gateway, upstream, stream):
    """Step two breaches and is replaced: the rollback drops the `</think>` entry with step two's, and
    the continuation's entries follow step one's. (Its own text-less `</think>` event's entry goes
    with its answer text.)"""
    sent = len(upstream.requests)
    reasoning, answer, finish, entries, chunks = ask(gateway, "breach", stream)
    assert (reasoning, answer, finish) == ("Fine step one.\n\nWait, think safely.Good step three.\n\n", "Done.", "stop")
    assert tokens(entries) == [*STEP_ONE, "Good", " step", " three", ".\n\n", "</think>", "Done", "."]
    assert len(upstream.requests) == sent + 1 + 1, "one request, one continuation"
    if stream:
        assert chunks[0] == STEP_ONE, "step one's entries went out with step one, alone"


@pytest.mark.parametrize("stream", [False, True])
def test_the_entry_of_an_event_without_text_goes_out_before_the_next_texts(gateway, stream):
    reasoning, answer, finish, entries, chunks = ask(gateway, "safe", stream)
    assert (reasoning, answer, finish) == ("Fine step one.\n\n", "Good step two.\n\nDone.", "stop")
    assert tokens(entries) == [*STEP_ONE, "</think>", "Good", " step", " two", ".\n\n", "Done", "."]
    if stream:  # the entries go with the last model text released with them; step one's never carry the marker's
        assert all(chunk[-1] != "</think>" for chunk in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_an_event_that_crosses_the_windows_end_gives_no_alternatives(gateway, stream):
    """At --early-steps 1 the window ends with step one. The event " one.\\n\\nGood" begins inside it:
    its entries (" one" and ".\\n\\n" are tokens of step one) go out without alternatives; the events
    wholly after the window's end give theirs."""
    reasoning, answer, finish, entries, _ = ask(gateway, "straddle", stream, early_steps=1)
    assert (reasoning, answer, finish) == ("Fine step one.\n\nGood step two.\n\n", "Done.", "stop")
    assert tokens(entries) == ["Fine", " step", " one", ".\n\n", "Good", " step", " two", ".\n\n", "Done", "."]
    tops = [top for _, top in entries]
    assert tops[:5] == [[]] * 5, f"alternatives of tokens inside the window reached the client: {entries[:5]}"
    assert all(top == [token, f"alt({token})"] for token, top in entries[5:]), "the alternatives past the window are given"
