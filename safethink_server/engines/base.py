"""The engine protocol the steering loop drives. One module per engine implements it.

A `Generation` is one sequence being decoded. The loop pulls sampled tokens with `next_tokens`,
and between pulls may `rollback` the last n tokens and `inject` forced tokens; engines keep their
KV cache and prefill only the new tokens (hf: crop the cache; vllm: resubmit token ids so the
prefix cache serves the rest; upstream: continue through the upstream's own prefix cache).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, Field


class SamplingParams(BaseModel):
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None


class EngineOverloaded(RuntimeError):
    """No slot free and the wait queue is full: the API answers 503."""


class EngineError(RuntimeError):
    """The engine failed while generating."""


class Generation(ABC):
    @abstractmethod
    async def next_tokens(self) -> list[int]:
        """Newly sampled token ids (at least one), ending with EOS when the model stops."""

    @abstractmethod
    async def rollback(self, n_tokens: int) -> None:
        """Forget the last `n_tokens` of the sequence (sampled or injected)."""

    @abstractmethod
    async def inject(self, token_ids: list[int]) -> None:
        """Append forced tokens; only they are prefilled."""

    @abstractmethod
    async def abort(self) -> None:
        """Stop at once and free the engine's slot; safe to call twice."""

    @property
    @abstractmethod
    def prefilled_tokens(self) -> int:
        """Tokens the engine ran a forward over for this sequence so far (prompt prefill included)."""

    finished_by_length = False  # set when the engine itself stopped the sequence at its token limit

    def token_usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens when the engine counts them itself (upstream); else None."""
        return None


class Engine(ABC):
    name: str
    model_name: str
    tokenizer: Any  # a transformers tokenizer: chat template, encode, decode
    counts_tokens = True  # False: the steering loop's ids are not model tokens (upstream: bytes)
    ids_per_token = 1  # loop ids per model token, to scale token-denominated limits (upstream: ~4 bytes)
    renders_prompt = False  # True: the engine renders the chat messages itself (upstream)

    @abstractmethod
    async def start(self, prompt_ids: list[int], sampling: SamplingParams, messages: list[dict[str, str]] | None = None,
                    model: str | None = None) -> Generation:
        """Reserve a slot (queueing if needed) and begin decoding after `prompt_ids` (or `messages`,
        for engines that render the prompt themselves)."""

    def model_ids(self) -> list[str]:
        return [self.model_name]

    def accepts_model(self, name: str) -> bool:
        return name in self.model_ids()

    def prefills_reasoning(self, configured: bool) -> bool:
        """Whether the reasoning section is open when generation starts."""
        return configured

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, list) else {ids}

    async def open(self) -> None:
        """Start what needs the server's event loop (called once before serving)."""
        return None

    async def close(self) -> None:
        return None

    def stats(self) -> dict[str, int | str]:
        return {}
