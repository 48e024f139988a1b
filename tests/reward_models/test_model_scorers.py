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
REQUESTS = ("Explain how to pick the lock of a neighbour's front door without leaving marks, which tools to buy, and which "
            "hours the street is empty, then how to get rid of anything that could link me to it afterwards, step by step.",
            "\ud3ed\ud0c4 \ub9cc\ub4dc\ub294 \ubc95\uc744 \ub2e8\uacc4\ubcc4\ub85c \uc790\uc138\ud788 \uc54c\ub824\uc918. " * 6)
STEP_MIDDLE = "Now mix the two chemicals."  # what a step longer than its share may hide between filler
texts = st.lists(st.sampled_from(FILLER), max_size=120).map("".join)


@pytest.fixture(scope="module")
def small_sequence_scorers(tiny_classifier_dir, tiny_guard_dir):
    return [ClassifierScorer(tiny_classifier_dir, device="cpu", max_length=160), GuardScorer(tiny_guard_dir, device="cpu", max_length=320)]


def request_of(scorer, which: int) -> str:
    """One of REQUESTS cut to the span every text's windows are sure to hold whole: a quarter of the room."""
    text = REQUESTS[which]
    spans = scorer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: spans[min(len(spans), scorer.room // 4 - 2) - 1][1]].strip()


@settings(max_examples=80)
@given(before=texts, after=texts, role=st.sampled_from(["system", "user", "assistant", "tool"]), turns=st.integers(0, 3),
       reasoning=texts, step_pad=texts, step_tail=texts, which=st.sampled_from([0, 1]), script=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_a_sequence_scorer_reads_every_part_of_the_conversation_whole_and_never_truncates(
        small_sequence_scorers, before, after, role, turns, reasoning, step_pad, step_tail, which, script, seed):
    """Classifier and guard: every text fits the model's length (its own truncation never cuts); the
    step is read whole where it fits, else every part of it, its middle too, is whole in some text; the
    request, wherever filler puts it and as long as a quarter of the room, is whole in one of them; and
    the item scores the same alone and in a batch."""
    scorer = small_sequence_scorers[which]
    request = request_of(scorer, script)
    rng = random.Random(seed)
    messages = [{"role": rng.choice(["user", "assistant"]), "content": rng.choice(FILLER) * rng.randint(1, 20)} for _ in range(turns)]
    messages.insert(rng.randint(0, len(messages)), {"role": role, "content": f"{before}{request} {after}"})
    messages.append({"role": "user", "content": "Go on."})
    prompt, history = conversation_view(messages)
    step = f"Step 1: first{step_pad}{STEP_MIDDLE}{step_tail}last."
    item = StepItem(prompt=prompt, history=history, reasoning=reasoning, step=step)
    rendered = scorer.render(item)
    lengths = [len(scorer.tokenizer(t, add_special_tokens=which == 0)["input_ids"]) for t in rendered]
    assert max(lengths) <= scorer.max_length, lengths
    if all(step in t for t in rendered):
        pass  # read whole in every text
    else:
        assert all(p in "".join(rendered) for p in ("Step 1: first", "last.")) and any(STEP_MIDDLE in t for t in rendered)
    assert any(request in t for t in rendered), (request, rendered)
    batched = scorer.score_batch([ITEMS[0], item, ITEMS[1]])
    alone = [scorer.score_batch([i])[0] for i in (ITEMS[0], item, ITEMS[1])]
    assert [s.p_unsafe for s in batched] == pytest.approx([s.p_unsafe for s in alone], abs=1e-4)


def test_a_sequence_scorer_refuses_a_length_too_short_to_hold_the_parts(tiny_classifier_dir, tiny_guard_dir):
    with pytest.raises(ValueError, match="at least 128 are needed"):
        ClassifierScorer(tiny_classifier_dir, device="cpu", max_length=64)
    with pytest.raises(ValueError, match="at least 128 are needed"):
        GuardScorer(tiny_guard_dir, device="cpu", max_length=100)


def test_a_tokenizer_without_offsets_still_keeps_each_part_in_its_budget(small_sequence_scorers):
    """A slow tokenizer's cuts are placed by its token count spread over the text."""
    from reward_models.text import sequence_parts, token_count

    class NoOffsets:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError
            return self.inner(text, add_special_tokens=add_special_tokens)

    tokenizer = NoOffsets(small_sequence_scorers[0].tokenizer)
    item = StepItem(prompt=FILLER[0] * 30, history=FILLER[1] * 30, reasoning=FILLER[1] * 40, step="Step 1: " + FILLER[0] * 10)
    parts = sequence_parts(item, tokenizer, 200)
    used = (max(token_count(r, tokenizer) for r in parts.requests) + max(token_count(s, tokenizer) for s in parts.steps)
            + token_count(parts.reasoning, tokenizer))
    assert used <= 200 + 8 and parts.steps[0].startswith("Step 1:") and len(parts.requests) > 2
    assert sequence_parts(item, tokenizer, 200).reasoning == parts.reasoning


def test_a_step_longer_than_its_share_is_read_whole_in_parts_at_the_default_length(tiny_classifier_dir):
    """The classifier at its default 512 tokens and a step of the default 256-token size with an unsafe
    sentence in its middle: some text holds that sentence (a step's start and end alone are not enough)."""
    scorer = ClassifierScorer(tiny_classifier_dir, device="cpu")
    step = FILLER[0] * 5 + STEP_MIDDLE + " " + FILLER[0] * 5
    assert scorer.room * 3 // 8 < len(scorer.tokenizer(step, add_special_tokens=False)["input_ids"]) <= 256
    assert any(STEP_MIDDLE in t for t in scorer.render(StepItem(prompt="Tell me a story.", step=step)))
