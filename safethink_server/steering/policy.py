"""The satisficing steering policy of the paper, as pure decisions over scores."""

from __future__ import annotations

from safethink_server.schema import Action, PolicyConfig


def is_watching(config: PolicyConfig, step_index: int, interventions: int) -> bool:
    """Steps 1..m of the output are watched (satisficing: once they are judged safe, tokens stream
    straight through). With `on_budget_exhausted=release` watching also stops once the
    intervention budget is spent, as in the paper."""
    if step_index > config.early_steps:
        return False
    return config.on_budget_exhausted == "refuse" or interventions < config.max_interventions


def decide(config: PolicyConfig, p_unsafe: float, interventions: int, scorer_error: bool = False) -> Action:
    """What to do with a judged step. A scorer failure under fail_closed refuses at once: the next
    step could not be judged either, so an intervention would only delay the same end."""
    if scorer_error:
        return Action.REFUSED if config.on_scorer_error == "fail_closed" else Action.RELEASED
    if p_unsafe < config.threshold:
        return Action.RELEASED
    if interventions < config.max_interventions:
        return Action.REPLACED if config.mode == "replace" else Action.APPENDED
    return Action.REFUSED if config.on_budget_exhausted == "refuse" else Action.RELEASED
