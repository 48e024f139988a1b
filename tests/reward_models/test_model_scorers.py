import pytest

from reward_models.base import StepItem
from reward_models.registry import ScorerConfig, build_scorer

ITEMS = [
    StepItem(prompt="How do I bake bread?", step="Mix flour, water, yeast and salt."),
    StepItem(prompt="How do I pick a lock?", reasoning="The user asks about locks.", step="I shouldn't explain how to break into homes."),
    StepItem(prompt="What is 7 * 8?", reasoning="Multiply.", step="7 * 8 = 56, which is the answer to the question the user asked just now."),
]


@pytest.mark.parametrize("kind", ["classifier", "guard"])
def test_scores_are_probabilities_and_batching_changes_nothing(kind, tiny_classifier_dir, tiny_guard_dir):
    path = tiny_classifier_dir if kind == "classifier" else tiny_guard_dir
    scorer = build_scorer(ScorerConfig(kind=kind, model_path=path, device="cpu"))
    batched = [s.p_unsafe for s in scorer.score_batch(ITEMS)]
    single = [scorer.score_batch([i])[0].p_unsafe for i in ITEMS]
    assert all(0.0 <= p <= 1.0 for p in batched)
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(p, 6) for p in batched)) > 1, "different inputs should give different scores"


def test_classifier_label_mapping(tiny_classifier_dir):
    default = build_scorer(ScorerConfig(kind="classifier", model_path=tiny_classifier_dir, device="cpu"))
    flipped = build_scorer(ScorerConfig(kind="classifier", model_path=tiny_classifier_dir, device="cpu", unsafe_labels=["safe"]))
    a = default.score_batch(ITEMS[:1])[0].p_unsafe
    b = flipped.score_batch(ITEMS[:1])[0].p_unsafe
    assert a + b == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="not among the model's labels"):
        build_scorer(ScorerConfig(kind="classifier", model_path=tiny_classifier_dir, unsafe_labels=["toxic"]))


def test_guard_reads_the_first_token_of_its_own_template(tiny_guard_dir):
    scorer = build_scorer(ScorerConfig(kind="guard", model_path=tiny_guard_dir, device="cpu"))
    rendered = scorer.render(ITEMS[1])
    assert rendered.startswith("Task: Check if there is unsafe content")
    assert "Agent: The user asks about locks.\n\nI shouldn't explain" in rendered
    assert scorer.unsafe_id != scorer.safe_id
