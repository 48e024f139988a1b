"""Token accounting of finished sessions: usage as OpenAI counts it, and logprob entries in wire form."""

from __future__ import annotations

from typing import Any

from safethink_server.api.protocol import (
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionTokensDetails,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from safethink_server.api.tracker import RequestTracker
from safethink_server.engines.base import Generation, TokenLogprob
from safethink_server.steering.session import SteeringSession


def reasoning_count(generation: Generation, pre: int, reasoning: int) -> int | None:
    """Tokens of the output's ids `pre`..`pre + reasoning`, where the engine knows its counts."""
    if not reasoning:
        return 0
    start, end = generation.token_count_at(pre), generation.token_count_at(pre + reasoning)
    return None if start is None or end is None else end - start


def token_counts(session: SteeringSession) -> tuple[int, int, int]:
    """(prompt, completion, reasoning) tokens of one session."""
    counted = session.generation.token_usage() if session.generation is not None else None
    if counted is None:
        return session.prompt_tokens, session.output_tokens, session.reasoning_tokens
    prompt, completion = counted  # the engine's ids are not tokens: take its counts
    # The reasoning is the output's first ids, after a start marker the model wrote and up to its end
    # marker: counted where the engine knows, else its share.
    reasoning = reasoning_count(session.generation, session.output.pre_tokens, session.reasoning_tokens)
    if reasoning is None:
        reasoning = round(completion * session.reasoning_tokens / session.output_tokens) if session.output_tokens else 0
    return prompt, completion, reasoning


def fingerprint(sessions: list[SteeringSession]) -> str | None:
    """The backend's system_fingerprint (an upstream's), as it gave it."""
    generation = sessions[0].generation
    return generation.system_fingerprint if generation is not None else None


def usage_of(sessions: list[SteeringSession]) -> Usage:
    """The prompt once, the completions of every choice summed (as OpenAI counts n > 1)."""
    counts = [token_counts(session) for session in sessions]
    prompt = counts[0][0]
    completion, reasoning = sum(c[1] for c in counts), sum(c[2] for c in counts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))


class LogprobEntries:
    """The wire form of a session's logprob entries (vLLM's: each token decoded on its own)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _top(self, token: int | str, logprob: float) -> TopLogprob:
        text = token if isinstance(token, str) else self.tokenizer.decode([token])
        return TopLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode("utf-8", errors="replace")))

    def __call__(self, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[
            TokenLogprobEntry(**self._top(e.token_id, e.logprob).model_dump(), top_logprobs=[self._top(i, lp) for i, lp in e.top])
            for e in entries])

    def of_text(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        """The completions API's form of the same entries."""
        sampled = [self._top(e.token_id, e.logprob) for e in entries]
        return CompletionLogprobs(tokens=[t.token for t in sampled], token_logprobs=[t.logprob for t in sampled],
                                  top_logprobs=[{t.token: t.logprob for t in (self._top(i, lp) for i, lp in e.top)} for e in entries])


def counted_usage(sessions: list[SteeringSession], tracker: RequestTracker) -> Usage:
    """The usage of a request whose choices all ended, counted as a success."""
    usage = usage_of(sessions)
    tracker.finished(sessions, usage)
    return usage
