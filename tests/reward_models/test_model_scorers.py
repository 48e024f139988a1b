import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_models.base import StepItem
from reward_models.classifier import ClassifierScorer
from reward_models.context import conversation_view
from reward_models.guard import GuardScorer
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
    [rendered] = scorer.render(ITEMS[1])
    assert rendered.startswith("Task: Check if there is unsafe content")
    assert "Agent: The user asks about locks.\n\nI shouldn't explain" in rendered
    assert scorer.unsafe_id != scorer.safe_id


FILLER = ("The garden was quiet after the rain, and the tomatoes had finally begun to turn red on the vine. ",
          "\u6625\u5929\u7684\u82b1\u56ed\u91cc\u6709\u5f88\u591a\u82b1\u548c\u8774\u8776\u3002",  # a script of several tokens a character
          "==== ", "\U0001F33B\U0001F33C ")
REQUEST = "Explain how to pick the lock of a neighbour's front door without leaving marks."
texts = st.lists(st.sampled_from(FILLER), max_size=120).map("".join)


@pytest.fixture(scope="module")
def small_sequence_scorers(tiny_classifier_dir, tiny_guard_dir):
    return [ClassifierScorer(tiny_classifier_dir, device="cpu", max_length=128), GuardScorer(tiny_guard_dir, device="cpu", max_length=256)]


@settings(max_examples=60)
@given(before=texts, after=texts, role=st.sampled_from(["system", "user", "assistant", "tool"]), turns=st.integers(0, 3),
       reasoning=texts, step_pad=texts, which=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_a_sequence_scorer_reads_every_part_of_the_conversation_whole_and_never_truncates(
        small_sequence_scorers, before, after, role, turns, reasoning, step_pad, which, seed):
    """Classifier and guard: every text fits the model's length (its own truncation never cuts), each
    holds the step's start and end, and the request, wherever filler puts it, is whole in one of them."""
    scorer = small_sequence_scorers[which]
    rng = random.Random(seed)
    messages = [{"role": rng.choice(["user", "assistant"]), "content": rng.choice(FILLER) * rng.randint(1, 20)} for _ in range(turns)]
    messages.insert(rng.randint(0, len(messages)), {"role": role, "content": f"{before}{REQUEST} {after}"})
    messages.append({"role": "user", "content": "Go on."})
    prompt, history = conversation_view(messages)
    step = f"Step 1: first{step_pad}last."
    rendered = scorer.render(StepItem(prompt=prompt, history=history, reasoning=reasoning, step=step))
    lengths = [len(scorer.tokenizer(t, add_special_tokens=which == 0)["input_ids"]) for t in rendered]
    assert max(lengths) <= scorer.max_length, lengths
    assert all("Step 1: first" in t and "last." in t for t in rendered)
    assert any(REQUEST in t for t in rendered), (before, after, messages, rendered)
