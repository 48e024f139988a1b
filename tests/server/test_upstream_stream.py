"""The proxy's SSE reading: however the upstream's bytes are cut into network reads, and whichever
line ends it uses, the same events come out, in order, and nothing after [DONE]."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safethink_server.engines.upstream.stream import EventReader, SSEDecoder, UpstreamError, sse_batches

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def encode(events: list[dict], line_end: bytes, separator: bytes, comments: bool) -> bytes:
    body = b""
    for event in events:
        if comments:
            body += b": keep-alive" + line_end
        body += b"data: " + json.dumps(event, ensure_ascii=False).encode() + line_end + separator
    return body + b"data: [DONE]" + line_end + line_end + b"data: {\"after\": true}" + line_end + line_end


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


async def chunks_of(parts: list[bytes]):  # type: ignore[no-untyped-def]
    for part in parts:
        await asyncio.sleep(0)
        yield part


@settings(max_examples=500, deadline=None)
@given(st.lists(st.fixed_dictionaries({"text": texts}), max_size=8), st.sampled_from([b"\n", b"\r\n", b"\r"]),
       st.sampled_from(["blank line", "single line end"]), st.booleans(), st.lists(st.integers(0, 400), max_size=12),
       st.booleans())
def test_events_survive_any_cutting_into_reads(events, line_end, separation, comments, cuts, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + encode(events, line_end, line_end if separation == "blank line" else b"", comments)

    async def read() -> list[dict]:
        out: list[dict] = []
        async for batch in sse_batches(chunks_of(cut(data, cuts)), 5, 5):
            out += batch
        return out

    assert asyncio.run(read()) == events


def test_a_line_split_across_reads_is_joined():
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b': 1}\n\nda') == [b'{"a": 1}']
    assert decoder.feed(b"ta: [DONE]\n\n") == [b"[DONE]"]
    split_mark = SSEDecoder()  # a byte order mark cut across two reads
    assert split_mark.feed(b"\xef") == []
    assert split_mark.feed(b"\xbb\xbfdata: [DONE]\n\n") == [b"[DONE]"]


def test_the_reader_hands_out_every_event_before_an_error():
    async def broken():  # type: ignore[no-untyped-def]
        yield b'data: {"n": 1}\n\ndata: {"n": 2}\n\n'
        await asyncio.sleep(0)
        yield b"data: not json\n\n"

    async def read() -> tuple[list[dict], Exception]:
        reader = EventReader(broken(), 5, 5)
        events: list[dict] = []
        try:
            while True:
                events += await reader.take()
        except UpstreamError as exc:
            return events, exc
        finally:
            await reader.aclose()

    events, error = asyncio.run(read())
    assert events == [{"n": 1}, {"n": 2}]
    assert error.kind == "protocol"


def test_silence_is_a_timeout():
    async def stalled():  # type: ignore[no-untyped-def]
        yield b'data: {"n": 1}\n\n'
        await asyncio.sleep(10)
        yield b""

    async def read() -> None:
        async for _ in sse_batches(stalled(), 5, 0.05):
            pass

    with pytest.raises(UpstreamError) as raised:
        asyncio.run(read())
    assert raised.value.status == 504


def test_silence_before_the_first_byte_uses_its_own_limit():
    async def silent():  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)
        yield b""

    async def read() -> float:
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamError) as raised:
            async for _ in sse_batches(silent(), 0.1, 5):
                pass
        assert raised.value.status == 504 and "0.1 s" in str(raised.value)
        return asyncio.get_running_loop().time() - started

    assert 0.09 <= asyncio.run(read()) < 2


def test_a_slow_reader_is_not_an_upstream_silence():
    """Only the wait for the upstream counts: a consumer busy longer than the limit between reads
    is not timed out, and the timer never cancels it while it works."""

    async def steady():  # type: ignore[no-untyped-def]
        for n in range(4):
            yield f'data: {{"n": {n}}}\n\n'.encode()

    async def read() -> list[dict[str, int]]:
        out = []
        async for batch in sse_batches(steady(), 0.05, 0.05):
            out += batch
            await asyncio.sleep(0.15)
        return out

    assert asyncio.run(read()) == [{"n": n} for n in range(4)]


def test_an_outside_cancellation_stays_a_cancellation():
    async def stalled():  # type: ignore[no-untyped-def]
        yield b'data: {"n": 1}\n\n'
        await asyncio.sleep(10)
        yield b""

    async def read() -> None:
        async for _ in sse_batches(stalled(), 5, 5):
            pass

    async def main() -> None:
        task = asyncio.create_task(read())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
