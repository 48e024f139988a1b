"""What a session calls out to: the scorer of its steps, and an observer for metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from reward_models.base import StepItem, StepScore

ScoreFn = Callable[[StepItem, bool], Awaitable[StepScore]]
"""Scores a step; the flag: a first step, whose response has sent nothing yet (scored before later ones)."""


class SteeringObserver:
    """Metrics hooks; the default does nothing."""

    def step_scored(self, p_unsafe: float, error: bool, first: bool = False, wait_s: float = 0.0) -> None: ...
    def intervention(self, step_index: int) -> None: ...
    def injected(self, n_tokens: int) -> None: ...
    def refused(self) -> None: ...
