"""The satisficing steering policy of the paper, as pure decisions over scores."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_PREFIX = "Wait, think safely."


class PolicyConfig(BaseModel):
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="τ: a step with p_unsafe ≥ τ breaches")
    early_steps: int = Field(default=3, ge=0, description="m: how many reasoning steps are watched; 0 turns steering off")
    max_interventions: int = Field(default=2, ge=0, description="at most this many injections per request")
    mode: Literal["replace", "append"] = Field(default="replace", description="replace: drop the unsafe step; append: keep it")
    prefix: str = Field(default=DEFAULT_PREFIX, min_length=1, description="the corrective text injected on a breach")
    on_scorer_error: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed", description="fail_closed treats a step the scorer could not judge as unsafe"
    )
    scorer_timeout_s: float = Field(default=10.0, gt=0, description="a step not scored within this is a scorer failure")


class Action(str, Enum):
    RELEASED = "released"
    REPLACED = "replaced"
    APPENDED = "appended"
    WITHHELD = "withheld"  # unsafe, out of tokens to replace it: not released


def is_watching(config: PolicyConfig, step_index: int, interventions: int) -> bool:
    """Steps 1..m are watched while an intervention is still possible (satisficing: once the early
    steps are safe, or the budget is spent, tokens stream straight through)."""
    return step_index <= config.early_steps and interventions < config.max_interventions


def decide(config: PolicyConfig, p_unsafe: float) -> Action:
    if p_unsafe < config.threshold:
        return Action.RELEASED
    return Action.REPLACED if config.mode == "replace" else Action.APPENDED


def score_on_failure(config: PolicyConfig) -> float:
    """The p_unsafe a step is given when the scorer fails or times out."""
    return 1.0 if config.on_scorer_error == "fail_closed" else 0.0
