"""How an item is rendered into text for models that read one bounded sequence (classifier, guard, remote)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from reward_models.base import StepItem, StepScore
from reward_models.context import conversation_text, ends, omitted, tail, windows

DEFAULT_TEMPLATE = "User: {prompt}\n\nAssistant reasoning: {reasoning}{step}"
JOIN_MARGIN = 8  # tokens a template's joins may add over its parts counted apart


def request_text(item: StepItem, max_chars: int) -> str:
    """The conversation within `max_chars`: whole where it fits, else its start and its end (where the
    latest turn is) with what is left out between them named."""
    return ends(conversation_text(item.prompt, item.history), max_chars)


def token_count(text: str, tokenizer: Any) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_spans(text: str, tokenizer: Any) -> list[tuple[int, int]] | None:
    """Each of `text`'s tokens as its (start, end) characters; None from a slow tokenizer (no offsets)."""
    try:
        return [tuple(span) for span in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    except (NotImplementedError, ValueError, KeyError):
        return None


def _shrunk(cut: Callable[[int], str], tokenizer: Any, max_tokens: int) -> str:
    """A slow tokenizer's cut: `cut(budget)` with the budget in characters, shrunk until it fits."""
    budget = 3 * max_tokens
    while True:
        text = cut(budget)
        count = token_count(text, tokenizer)
        if count <= max_tokens or budget <= 1:
            return text if count <= max_tokens else ""
        budget = min(budget - 1, budget * max_tokens // count)


def ends_in_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """`ends` with the budget in `tokenizer`'s tokens."""
    spans = token_spans(text, tokenizer)
    if spans is None:
        return text if token_count(text, tokenizer) <= max_tokens else _shrunk(lambda chars: ends(text, chars), tokenizer, max_tokens)
    if len(spans) <= max_tokens:
        return text
    if max_tokens < 32:  # too small a budget for both ends and the note: the end alone
        return tail_in_tokens(text, tokenizer, max_tokens)
    keep = max_tokens - 16  # room for the note that names the cut
    head_end = spans[keep // 2 - 1][1]
    tail_start = spans[len(spans) - (keep - keep // 2)][0]
    return text[:head_end] + omitted(tail_start - head_end) + text[tail_start:]


def tail_in_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """The end of `text` within `max_tokens` of `tokenizer`'s tokens."""
    if max_tokens <= 0:
        return ""
    spans = token_spans(text, tokenizer)
    if spans is None:
        return text if token_count(text, tokenizer) <= max_tokens else _shrunk(lambda chars: tail(text, chars), tokenizer, max_tokens)
    return text if len(spans) <= max_tokens else text[spans[-max_tokens][0] :]


def token_windows(text: str, tokenizer: Any, size: int) -> list[str]:
    """Windows of `size` (at least 2) of `tokenizer`'s tokens over `text`, overlapping by half: every
    character is in one, and every span of up to `size // 2` tokens lies whole in one (a slow
    tokenizer's: windows of characters, halved where they do not fit)."""
    spans = token_spans(text, tokenizer)
    if spans is None:
        return windows(text, 3 * size, 3 * size // 2, fits=lambda window: token_count(window, tokenizer) <= size)
    if len(spans) <= size:
        return [text]
    starts = list(range(0, len(spans) - size, size // 2)) + [len(spans) - size]
    # A window runs from its first token's start to the start of the token after its last, so that the
    # text between tokens (spaces) is in it too.
    return [text[(spans[k][0] if k else 0) : (spans[k + size][0] if k + size < len(spans) else len(text))] for k in starts]


class SequenceParts(NamedTuple):
    """What a scorer that reads one bounded sequence reads of an item, each part within its share; it
    reads one text per pair of a request view and a step view."""

    requests: list[str]  # the conversation whole, or its ends and then each window of it
    reasoning: str  # the end of the reasoning so far
    steps: list[str]  # the step whole, or each window of it


MIN_ROOM = 128  # tokens: below it a share of the room is too small to be read


def sequence_parts(item: StepItem, tokenizer: Any, room: int) -> SequenceParts:
    """`item` cut to `room` tokens of `tokenizer`, so that the model's own truncation never has to cut:
    the conversation gets half (whole where it fits; where it does not, its ends, then each window of
    it, so that every span of a quarter of `room` tokens is read whole in one text), the step three
    eighths (whole where it fits, else in windows of that size overlapping by half: every part of a
    released step is judged), the reasoning's end the rest."""
    conversation = conversation_text(item.prompt, item.history)
    half = room // 2
    if (request_tokens := token_count(conversation, tokenizer)) <= half:
        requests = [conversation]
    else:
        requests = [ends_in_tokens(conversation, tokenizer, half), *token_windows(conversation, tokenizer, half)]
        request_tokens = max(token_count(r, tokenizer) for r in requests)  # a cut can come out a token or two over
    step, share = item.step.strip(), room * 3 // 8
    if (step_tokens := token_count(step, tokenizer)) <= share:
        steps = [step]
    else:
        steps = token_windows(step, tokenizer, share)
        step_tokens = max(token_count(s, tokenizer) for s in steps)
    reasoning = tail_in_tokens(item.reasoning.strip(), tokenizer, max(0, room - request_tokens - step_tokens))
    return SequenceParts(requests, reasoning, steps)


def rendered(items: Sequence[StepItem], render: Callable[[StepItem], list[str]]) -> tuple[list[str], list[int]]:
    """Every item's texts (`render`: one per view of its conversation), and the item each came from."""
    texts, owners = [], []
    for k, item in enumerate(items):
        for text in render(item):
            texts.append(text)
            owners.append(k)
    return texts, owners


def highest_per_item(scores: list[StepScore], owners: list[int], n: int) -> list[StepScore]:
    """Each of `n` items' highest-scoring text's score (an item's p_unsafe is its worst view's)."""
    best: dict[int, StepScore] = {}
    for owner, score in zip(owners, scores, strict=True):
        if owner not in best or score.p_unsafe > best[owner].p_unsafe:
            best[owner] = score
    return [best[k] for k in range(n)]


def render_item(item: StepItem, template: str = DEFAULT_TEMPLATE, reasoning_chars: int = 2000, prompt_chars: int = 4000) -> str:
    """`item` in `template`, its parts cut in characters (a remote scorer's budget is in characters)."""
    reasoning = tail(item.reasoning.strip(), reasoning_chars)
    return template.format(prompt=request_text(item, prompt_chars), reasoning=f"{reasoning}\n\n" if reasoning else "",
                           step=item.step.strip())


def unsafe_label_indices(id2label: dict[int, str], unsafe_labels: list[str] | None) -> list[int]:
    """Which output classes count towards p_unsafe.

    Explicit names or indices win; otherwise labels whose name says unsafe/toxic/harmful/jailbreak,
    and for an unnamed two-class head, class 1 (the usual "positive = flagged" convention)."""
    if unsafe_labels:
        out = []
        for label in unsafe_labels:
            if label.isdigit():
                out.append(int(label))
                continue
            matches = [i for i, name in id2label.items() if name.lower() == label.lower()]
            if not matches:
                raise ValueError(f"label {label!r} is not among the model's labels {sorted(id2label.values())}")
            out.extend(matches)
        return sorted(set(out))
    keywords = ("unsafe", "toxic", "harm", "jailbreak", "injection", "flagged")
    named = [i for i, name in id2label.items() if any(k in name.lower() for k in keywords) and "not" not in name.lower()]
    if named:
        return sorted(named)
    if len(id2label) == 2:
        return [1]
    raise ValueError(f"cannot tell which of the labels {sorted(id2label.values())} mean unsafe; pass --unsafe-labels")
