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


class Engine(ABC):
    name: str
    model_name: str
    tokenizer: Any  # a transformers tokenizer: chat template, encode, decode

    @abstractmethod
    async def start(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        """Reserve a slot (queueing if needed) and begin decoding after `prompt_ids`."""

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, list) else {ids}

    async def open(self) -> None:
        """Start what needs the server's event loop (called once before serving)."""
        return None

    async def close(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {}
