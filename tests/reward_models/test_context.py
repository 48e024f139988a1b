"""What a scorer reads of a request: for any conversation, any span of any part of it (system, user,
tool and assistant messages, earlier reasoning, tool calls, tool definitions) is in what the probe
encodes, and the sequence scorers keep the request's start and end."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from reward_models.base import StepItem
from reward_models.context import WINDOW_CHARS, WINDOW_STRIDE, conversation_text, conversation_view, ends, windows
from reward_models.probe import FeatureTexts
from reward_models.text import render_item
from safethink_server.prompt import Conversation, scoring_context

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=900)
GUARANTEED_SPAN = WINDOW_CHARS - WINDOW_STRIDE


@st.composite
def conversations(draw):  # type: ignore[no-untyped-def]
    """Messages of every role, with reasoning and tool calls on some assistant turns, and tools."""
    messages = []
    for _ in range(draw(st.integers(1, 6))):
        role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
        message = {"role": role, "content": draw(TEXT)}
        if role == "assistant" and draw(st.booleans()):
            message["reasoning"] = draw(TEXT)
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = [{"id": "c", "type": "function",
                                      "function": {"name": "f", "arguments": json.dumps({"q": draw(TEXT)})}}]
        messages.append(message)
    tools = [{"type": "function", "function": {"name": "g", "description": draw(TEXT)}}] if draw(st.booleans()) else None
    return messages, tools


def parts(messages, tools) -> list[str]:  # type: ignore[no-untyped-def]
    """Every text a client sent that the model reads."""
    out = [m[key] for m in messages for key in ("content", "reasoning") if m.get(key)]
    out += [call["function"]["arguments"] for m in messages for call in m.get("tool_calls", [])]
    out += [json.dumps(t, ensure_ascii=False) for t in tools or []]
    return out


@settings(max_examples=300, deadline=None)
@given(conversations(), st.data())
def test_any_span_of_any_message_is_whole_in_a_window_the_probe_encodes(case, data):
    messages, tools = case
    prompt, history = scoring_context(Conversation(messages, tools=tools))
    read = FeatureTexts(StepItem(prompt=prompt, history=history, step="s")).windows
    part = data.draw(st.sampled_from(parts(messages, tools)))
    part = part.strip() or part
    start = data.draw(st.integers(0, len(part) - 1))
    span = part[start : start + data.draw(st.integers(1, GUARANTEED_SPAN))].strip()
    assert any(span in window for window in read), (span, read)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.integers(2, 600), st.integers(1, 600))
def test_windows_cover_every_character_and_hold_every_short_span_whole(length, size, stride):
    stride = min(stride, size)
    text = "".join(chr(0x4E00 + i) for i in range(length))  # distinct characters: a window's place is unique
    read = windows(text, size, stride)
    assert all(len(w) <= size for w in read) and (len(read) == 1) == (length <= size)
    covered = [False] * length
    for window in read:
        at = text.index(window)
        covered[at : at + len(window)] = [True] * len(window)
    assert all(covered)
    for start in range(max(1, length - (size - stride) + 1)):
        assert any(text[start : start + size - stride] in w for w in read)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_characters="["), max_size=5000), st.integers(60, 3000))
def test_a_sequence_scorer_keeps_both_ends_and_names_the_cut(text, budget):
    kept = ends(text, budget)
    if len(text) <= budget:
        assert kept == text
        return
    assert len(kept) <= budget
    head, _, rest = kept.partition("\n[... ")
    count, _, foot = rest.partition(" characters not shown ...]\n")
    assert text.startswith(head) and text.endswith(foot) and len(head) + int(count) + len(foot) == len(text)
    assert abs(len(head) - len(foot)) <= 1


@settings(max_examples=100, deadline=None)
@given(TEXT, TEXT, st.integers(0, 4000))
def test_a_classifier_reads_the_latest_turn_end_after_any_filler(request, filler, padding):
    item = StepItem(prompt=("garden " * padding) + filler + request, history="system: " + filler * 3, step="a step")
    rendered = render_item(item, prompt_chars=1000)
    assert conversation_text(item.prompt, item.history)[-200:] in rendered
    assert rendered.endswith("a step")


def test_the_view_keeps_order_and_roles():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A", "reasoning": "R",
                 "tool_calls": [{"function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "content": "T"}, {"role": "user", "content": "U2"}]
    assert conversation_view(messages, [{"name": "g"}]) == (
        "U2", 'tools: [{"name": "g"}]\n\nsystem: S\n\nuser: U1\n\nassistant: R\nA\nf({"x": 1})\n\ntool: T')
    assert conversation_view([], None) == ("", "")
    # with no user turn the last message is the latest turn: its content apart, its calls with the rest
    assert conversation_view(messages[2:4], None) == ("T", 'assistant: R\nA\nf({"x": 1})')
