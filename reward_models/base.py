"""The one scorer interface: a batch of (prompt, reasoning so far, step) in, calibrated p_unsafe out."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

_T = TypeVar("_T")


class StepItem(BaseModel):
    """One reasoning step to judge, in the context the paper scores it in."""

    model_config = ConfigDict(frozen=True)

    prompt: str = Field(description="The user's latest request (the last user turn).")
    history: str = Field(default="", description="The rest of the request as 'role: text' paragraphs in order (tool "
                                                "definitions, system, earlier turns with their tool calls, tool results); "
                                                "see `reward_models.context`.")
    reasoning: str = Field(default="", description="The assistant's text before this step: the client's prefill, released "
                                                  "steps and the server's inserted texts (prefixes, end marker).")
    step: str = Field(description="The completed step under judgement: the model's own text only.")


class StepScore(BaseModel):
    p_unsafe: float = Field(ge=0.0, le=1.0)
    category: str | None = None
    queue_ms: float | None = Field(default=None, description="set by the micro-batcher: time the step waited for its forward")
    forward_ms: float | None = Field(default=None, description="set by the micro-batcher: time of the forward it was scored in")


class ScorerError(RuntimeError):
    """A scorer could not produce scores (model failure, remote error, timeout)."""


class Scorer(ABC):
    """A safety scorer. Subclasses implement the blocking `score_batch`; the async API runs it on a
    private single-thread executor so a forward pass never blocks the event loop and two forwards of
    one model never run at once."""

    name: str = "scorer"

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    @abstractmethod
    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        """Score a batch in one forward pass where the model allows it."""

    async def ascore_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        return await self._in_executor(self.score_batch, items)

    warms = False  # whether `warm_batch` does anything

    def warm_batch(self, items: Sequence[StepItem]) -> bool:
        """Prepare some of what judging these items' steps will need that does not depend on the step
        (the probe: encode their conversations), so that the judgement itself costs less. True when
        nothing is left to prepare; a call does a bounded amount of work. Default: nothing."""
        return True

    async def _in_executor(self, work: Callable[[list[StepItem]], _T], items: Sequence[StepItem]) -> _T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"scorer-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, list(items))

    async def awarm_batch(self, items: Sequence[StepItem]) -> bool:
        if items and self.warms:
            return await self._in_executor(self.warm_batch, items)
        return True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
