"""Safety scorers for reasoning steps: one interface, several kinds of model."""

from reward_models.base import Scorer, ScorerError, StepItem, StepScore
from reward_models.batcher import MicroBatcher
from reward_models.registry import ScorerConfig, build_scorer

__all__ = ["MicroBatcher", "Scorer", "ScorerConfig", "ScorerError", "StepItem", "StepScore", "build_scorer"]
