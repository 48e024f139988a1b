"""How an item is rendered into text for models that read one sequence (classifiers, remote)."""

from __future__ import annotations

from typing import Any

from reward_models.base import StepItem
from reward_models.context import conversation_text, ends, omitted, tail

DEFAULT_TEMPLATE = "User: {prompt}\n\nAssistant reasoning: {reasoning}{step}"


def request_text(item: StepItem, max_chars: int) -> str:
    """The conversation within `max_chars`: whole where it fits, else its start and its end (where the
    latest turn is) with what is left out between them named."""
    return ends(conversation_text(item.prompt, item.history), max_chars)


def request_in_tokens(item: StepItem, tokenizer: Any, max_tokens: int) -> str:
    """`request_text` with the budget in a scorer's own tokens (a model's limit is)."""
    return ends_in_tokens(conversation_text(item.prompt, item.history), tokenizer, max_tokens)


def ends_in_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """`ends` with the budget in `tokenizer`'s tokens (a fast tokenizer's offsets place the cut)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer: about three characters a token
        return ends(text, 3 * max_tokens)
    if len(offsets) <= max_tokens:
        return text
    if max_tokens < 32:  # too small a budget for both ends and the note: the end alone
        return text[offsets[-max_tokens][0] :] if max_tokens > 0 else ""
    keep = max_tokens - 16  # room for the note that names the cut
    head_end = offsets[keep // 2 - 1][1]
    tail_start = offsets[len(offsets) - (keep - keep // 2)][0]
    return text[:head_end] + omitted(tail_start - head_end) + text[tail_start:]


def render_item(item: StepItem, template: str = DEFAULT_TEMPLATE, reasoning_chars: int = 2000, prompt_chars: int = 4000,
                request: str | None = None) -> str:
    """`request`: the conversation as already cut to a token budget (else cut to `prompt_chars`)."""
    reasoning = tail(item.reasoning.strip(), reasoning_chars)
    request = request if request is not None else request_text(item, prompt_chars)
    return template.format(prompt=request, reasoning=f"{reasoning}\n\n" if reasoning else "", step=item.step.strip())


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
