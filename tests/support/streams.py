"""What the official client read from a streamed chat completion."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Streamed:
    """What the official client read from one streamed chat completion."""

    reasoning: str = ""
    answer: str = ""
    finish: str | None = None
    usage: object = None
    info: dict | None = None  # the `safethink` report


def read_stream(stream) -> Streamed:  # type: ignore[no-untyped-def]
    out = Streamed()
    for chunk in stream:
        out.usage = chunk.usage if chunk.usage is not None else out.usage
        out.info = chunk.model_extra.get("safethink") or out.info
        for choice in chunk.choices:
            out.reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            out.answer += choice.delta.content or ""
            out.finish = choice.finish_reason or out.finish
    return out
