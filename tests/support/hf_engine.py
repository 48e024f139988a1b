"""Helpers for tests that drive the hf engine directly."""

from __future__ import annotations

from safethink_server.engines.base import SamplingParams
from safethink_server.prompt import Conversation, RenderedPrompt

CONVERSATION = Conversation([{"role": "user", "content": "x"}])


async def greedy(engine, prompt_ids, n):
    """A greedy generation of `n` tokens, and the generation left open."""
    gen = await engine.start(RenderedPrompt(prompt_ids, "reasoning"), SamplingParams(temperature=0.0, max_tokens=n), CONVERSATION)
    out = []
    for _ in range(n):
        out += await gen.next_tokens()
    return gen, out
