"""Tool calls folded into the proxy's answer text and read back: every call comes back as the
upstream streamed it (its name in the first delta or a later one, its arguments cut anywhere), text
before, between and after calls stays text, and text alone never makes a call."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safethink_server.api.tool_calls import ToolCallStream
from safethink_server.engines.upstream.answer import CALL, CALL_END, FoldedToolCalls, ToolCallFolder, read_folded, without_marks
from safethink_server.engines.upstream.stream import UpstreamError
from safethink_server.engines.vllm_answer import JSONToolCalls

MARKS = [CALL, "\x03", CALL_END]
TEXT = st.text(alphabet=st.sampled_from(["a", " ", "{", '"', "\n", "é", *MARKS]), max_size=20)
NAME = st.text(alphabet=st.sampled_from(["f", "_", "é", *MARKS]), min_size=1, max_size=8)


def pieces(text: str, cuts: list[int]) -> list[str]:
    at = sorted({min(cut, len(text)) for cut in cuts})
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]


# An answer: runs of text and of calls, each call (name, arguments, whether its name comes in a delta
# of its own after the one with its id).
ANSWERS = st.lists(st.one_of(TEXT.map(lambda t: ("text", t)),
                             st.lists(st.tuples(NAME, TEXT, st.booleans()), min_size=1, max_size=3).map(lambda c: ("calls", c))),
                   max_size=5)


@settings(max_examples=400, deadline=None)
@given(answer=ANSWERS, cuts=st.lists(st.integers(0, 20), max_size=4), first_index=st.integers(0, 2),
       release_cuts=st.one_of(st.lists(st.integers(0, 300), max_size=12), st.just(list(range(300)))))
def test_folded_calls_read_back_as_streamed(answer, cuts, first_index, release_cuts):
    folder, folded, index = ToolCallFolder(), "", first_index
    expected_calls, expected_text = [], ""
    for kind, run in answer:
        if kind == "text":
            folded += folder.fold(run, None)
            expected_text += without_marks(run)
            continue
        for name, arguments, late_name in run:
            head = {"index": index, "id": f"call_{index}", "type": "function"}
            if late_name:
                folded += folder.fold("", [head])
                folded += folder.fold("", [{"index": index, "function": {"name": name}}])
            else:
                folded += folder.fold("", [{**head, "function": {"name": name, "arguments": ""}}])
            for piece in pieces(arguments, cuts):
                folded += folder.fold("", [{"index": index, "function": {"arguments": piece}}])
            expected_calls.append((without_marks(name), without_marks(arguments)))
            index += 1
    text, calls = read_folded(folded)
    assert calls == expected_calls and text == expected_text
    content, final_calls = FoldedToolCalls().final(folded)
    assert final_calls == expected_calls
    assert content == (expected_text if not expected_calls else expected_text.strip() or None)
    assert not any(mark in FoldedToolCalls().plain(folded) for mark in MARKS)

    # Streamed as released, in pieces cut anywhere: the same calls and text, as the upstream's deltas.
    stream, names, arguments, streamed_text = ToolCallStream(FoldedToolCalls()), {}, {}, ""
    for piece in pieces(folded, release_cuts):  # (all of 0..299: a character at a time)
        for message in stream.answer(piece):
            streamed_text += message.content or ""
            for call in message.tool_calls or []:
                if call.id is not None:
                    assert call.index not in names and call.function.name is not None
                    names[call.index] = call.function.name
                arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    assert stream.end() == [] and stream.called == bool(expected_calls)
    assert [(names[i], arguments[i]) for i in sorted(names)] == expected_calls and streamed_text == expected_text


@settings(max_examples=200, deadline=None)
@given(arguments=TEXT, release_cuts=st.lists(st.integers(0, 25), max_size=8), refusal=st.booleans())
def test_a_forced_functions_arguments_stream_as_released(arguments, release_cuts, refusal):
    """vLLM's named tool_choice: one delta with the call's id and name, then the arguments as each
    released piece comes, which join to the whole answer's call; the server's refusal goes out as content."""
    reader = JSONToolCalls("get_weather")
    stream, headers, streamed, content = ToolCallStream(reader), [], "", ""
    for piece in pieces(arguments, release_cuts):
        for message in stream.answer(piece):
            assert message.content is None and len(message.tool_calls) == 1 and message.tool_calls[0].index == 0
            call = message.tool_calls[0]
            if call.id is not None:
                headers.append(call.function.name)
            streamed += call.function.arguments or ""
    if refusal:
        content = "".join(m.content or "" for m in stream.server_text("I can't help with that request."))
    assert stream.end() == [] and stream.called == bool(pieces(arguments, release_cuts))
    assert headers == (["get_weather"] if stream.called else []) and streamed == arguments
    assert reader.final(streamed)[1] == [("get_weather", arguments.strip())]
    assert content == ("I can't help with that request." if refusal else "")


SECRET = "unjudged model text"


@pytest.mark.parametrize("deltas", [
    [("", "not a list")], [("", [{"function": {"name": "f", "arguments": SECRET}}])],
    [("", [{"index": None, "function": {"name": "f"}}])], [("", [{"index": True, "function": {}}])],
    [("", [{"index": 0, "function": SECRET}])], [("", [{"index": 0, "function": {"name": "f", "arguments": {"x": SECRET}}}])],
    [("", [{"index": 0, "function": {"arguments": SECRET}}])],  # arguments before a name
    [("", [{"index": 0, "function": {"name": "f", "arguments": "{"}}]), ("", [{"index": 0, "function": {"name": "g"}}])],
    [("", [{"index": 0, "function": {"name": "f", "arguments": "{"}}]), ("Then", None), ("", [{"index": 0, "function": {"arguments": "}"}}])],
    [("", [{"index": 0, "function": {"name": "f"}}]), ("", [{"index": 1, "function": {"name": "g"}}]),
     ("", [{"index": 0, "function": {"arguments": SECRET}}])],  # a call that had ended comes back
])
def test_malformed_calls_are_a_protocol_error_that_quotes_nothing(deltas):
    folder = ToolCallFolder()
    with pytest.raises(UpstreamError) as caught:
        for content, calls in deltas:
            folder.fold(content, calls)
    assert caught.value.kind == "protocol" and SECRET not in str(caught.value) and "{" not in str(caught.value)
