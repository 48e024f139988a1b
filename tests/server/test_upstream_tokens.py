"""Token counts over the proxy's byte stream (vLLM's per-event token ids): counted, monotone, and a
rollback or a continuation's count changes nothing before the point it applies at."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from safethink_server.engines.upstream.tokens import TokenMarks

EVENTS = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 4)), max_size=30)  # (bytes, tokens) of each event


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, cut_at=st.integers(0, 400), rebase_tokens=st.integers(0, 200))
def test_counts_are_the_upstreams_and_survive_rollbacks(events, cut_at, rebase_tokens):
    marks, end, total, exact = TokenMarks(), 0, 0, {0: 0}
    for n_bytes, n_tokens in events:
        end, total = end + n_bytes, total + n_tokens
        marks.add(end, n_tokens)
        exact[end] = total  # tokens that come without bytes count at the position they came at
    assert marks.at(0) == exact.get(0, 0) and marks.at(end) == total
    assert all(marks.at(position) == tokens for position, tokens in exact.items())
    counts = [marks.at(p) for p in range(end + 1)]
    assert counts == sorted(counts), "more bytes are never fewer tokens"

    cut = min(cut_at, end)
    before = [marks.at(p) for p in range(cut + 1)]
    marks.cut(cut)
    after = [marks.at(p) for p in range(cut + 1)]
    whole = max(p for p in exact if p <= cut)  # the last event that ends before the cut
    assert after[: whole + 1] == before[: whole + 1], "a rollback changes nothing before its point"
    assert all(abs(a - b) <= 1 for a, b in zip(after, before, strict=True)), "inside a cut event, its share by bytes"
    assert after[-1] == before[-1] and marks.at(cut + 10) == before[-1]

    injected = cut + 7  # a continuation: text injected here, the whole kept text counted by the upstream
    marks.rebase(injected, rebase_tokens)
    assert marks.at(injected) == max(rebase_tokens, before[-1]), "the upstream's count of the kept text, never fewer than before"
    assert [marks.at(p) for p in range(whole + 1)] == before[: whole + 1]
