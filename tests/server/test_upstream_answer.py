"""Tool calls folded into the proxy's answer text and read back: every call comes back as the
upstream streamed it, however its arguments were cut into deltas, and text alone never makes one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from safethink_server.engines.upstream_answer import ARGUMENTS, CALL, FoldedToolCalls, ToolCallFolder, without_marks

TEXT = st.text(alphabet=st.sampled_from(["a", " ", "{", '"', "\n", "é", CALL, ARGUMENTS]), max_size=30)


def pieces(text: str, cuts: list[int]) -> list[str]:
    at = sorted({min(cut, len(text)) for cut in cuts})
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(content=TEXT, calls=st.lists(st.tuples(TEXT, TEXT), max_size=3), cuts=st.lists(st.integers(0, 30), max_size=4))
def test_folded_calls_read_back_as_streamed(content, calls, cuts):
    folder = ToolCallFolder()
    answer = without_marks(content)  # the upstream's own text, as the engine keeps it
    for index, (name, arguments) in enumerate(calls):
        first, *rest = pieces(arguments, cuts)
        answer += folder.fold([{"index": index, "id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": first}}])
        for piece in rest:
            answer += folder.fold([{"index": index, "function": {"arguments": piece}}])
    text, read = FoldedToolCalls().final(answer)
    assert read == [(without_marks(name), without_marks(arguments)) for name, arguments in calls]
    assert text == (without_marks(content).strip() or None if calls else without_marks(content))
    assert CALL not in FoldedToolCalls().plain(answer) and ARGUMENTS not in FoldedToolCalls().plain(answer)
