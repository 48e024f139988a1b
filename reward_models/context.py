"""What a scorer reads of a request: the whole conversation, in order, so that no span of it can be
pushed out of view by text around it.

A conversation is read as 'role: text' paragraphs (a message's content, its earlier reasoning and its
tool calls; the tool definitions first). Scorers that read one sequence of bounded length keep its
start and its end, and name what they leave out; the probe reads all of it in overlapping windows.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

WINDOW_CHARS = 384  # about 100 encoder tokens of English; a window of a denser script is cut further (`windows`)
WINDOW_STRIDE = 192  # any span of up to WINDOW_CHARS - WINDOW_STRIDE characters lies whole in one window


def _code_points(*categories: str) -> dict[str, list[int]]:
    """The code points of each category, in every plane."""
    found: dict[str, list[int]] = {c: [] for c in categories}
    for cp in range(0x110000):
        category = unicodedata.category(chr(cp))
        if category in found:
            found[category].append(cp)
    return found


_FORMAT_AND_MARKS = _code_points("Cf", "Mn")


# Text a model reads but an encoder would not: tag characters spell ASCII invisibly (mapped back to
# it), format characters (zero-width spaces and joiners, direction marks) are dropped, compatibility
# forms (fullwidth and mathematical letters, ligatures) become their plain letters (NFKC), and a run
# of combining marks keeps its first.
_INVISIBLE = {cp: None for cp in _FORMAT_AND_MARKS["Cf"]} | {cp: None for cp in range(0xE0000, 0xE0080)} | {
    cp: cp - 0xE0000 for cp in range(0xE0020, 0xE007F)}
_MARK_RUNS = re.compile("([{0}])[{0}]+".format("".join(re.escape(chr(cp)) for cp in _FORMAT_AND_MARKS["Mn"])))


def normalised(text: str) -> str:
    """`text` as the scorer reads it: what a model reads of it, in the letters an encoder knows."""
    if text.isascii():
        return text
    return _MARK_RUNS.sub(r"\1", unicodedata.normalize("NFKC", text.translate(_INVISIBLE)))


def conversation_view(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                      template_kwargs: Mapping[str, Any] | None = None, prefill: str | None = None) -> tuple[str, str]:
    """(the latest user turn, every other part of the request as 'role: text' paragraphs in order).

    Everything a client sent that the model reads is in one of the two: the tool definitions and the
    chat template's variables, system and developer text, earlier turns with their reasoning and tool
    calls, tool results, and the client's own start of the assistant turn (a prefill)."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    latest = users[-1] if users else len(messages) - 1
    paragraphs = [f"tools: {json.dumps(list(tools), ensure_ascii=False, default=str)}"] if tools else []
    if template_kwargs:
        paragraphs.append(f"template: {json.dumps(dict(template_kwargs), ensure_ascii=False, default=str)}")
    for i, message in enumerate(messages):  # the latest turn's content is read apart; the rest of it here
        text = message_text(message if i != latest else {k: v for k, v in message.items() if k != "content"})
        if text:
            paragraphs.append(text)
    if prefill and prefill.strip():
        paragraphs.append(f"assistant: {prefill}")
    latest_text = str(messages[latest].get("content") or "") if messages else ""
    return normalised(latest_text), normalised("\n\n".join(paragraphs))


def message_text(message: Mapping[str, Any]) -> str:
    """One message as a scorer reads it: 'role: text', every text field of it included (a name, a
    tool call id, its reasoning, its content, its tool calls as JSON)."""
    parts = [f"{key}: {value}" for key, value in message.items()
             if key not in _READ_APART and isinstance(value, str) and value.strip()]
    parts += [str(message.get(key) or "") for key in ("reasoning", "content")]
    calls = message.get("tool_calls")
    if calls:
        parts.append(json.dumps([arguments_as_read(call) for call in calls], ensure_ascii=False, default=str))
    text = "\n".join(p for p in parts if p.strip())
    return f"{message.get('role', 'user')}: {text}" if text else ""


def arguments_as_read(call: Any) -> Any:
    """A tool call with its arguments as the chat template reads them: the object a JSON string holds
    (so that escapes such as \\u0068 reach the scorer as the letters the model reads)."""
    try:
        function = dict(call["function"])
        function["arguments"] = json.loads(function["arguments"])
        return {**call, "function": function}
    except (KeyError, TypeError, ValueError):
        return call


_READ_APART = frozenset({"role", "content", "reasoning", "reasoning_content", "tool_calls"})  # reasoning_content: a copy


def conversation_text(prompt: str, history: str) -> str:
    """The request as one text: the rest of the conversation, then the latest user turn."""
    return "\n\n".join(t for t in (history.strip(), prompt.strip()) if t)


def windows(text: str, size: int = WINDOW_CHARS, stride: int = WINDOW_STRIDE, fits: Callable[[str], bool] | None = None) -> list[str]:
    """Overlapping windows that cover `text`: every character is in one, and every span of up to
    `size - stride` characters lies whole in one. A text of up to `size` characters is one window.
    A window that `fits` rejects (too many encoder tokens: some scripts take several a character)
    is itself cut into halves that overlap by half, until each fits."""
    if len(text) <= size:
        cut = [text]
    else:
        starts = list(range(0, len(text) - size, stride)) + [len(text) - size]
        cut = [text[s : s + size] for s in starts]
    if fits is None:
        return cut
    out: list[str] = []
    for window in cut:
        if len(window) <= 1 or fits(window):
            out.append(window)
        else:
            half = max(1, len(window) // 2)
            out += windows(window, half, max(1, half // 2), fits)
    return out


def lines(text: str, size: int = WINDOW_CHARS) -> list[str]:
    """The lines of `text` of up to `size` characters, each read alone as well: a request set apart
    from filler around it by a line break is then read without the filler."""
    return [line for line in (line.strip() for line in text.splitlines()) if line and len(line) <= size and line != text.strip()]


def ends(text: str, max_chars: int) -> str:
    """`text` within `max_chars`: whole where it fits, otherwise its start and its end with the number
    of characters left out between them named, so that neither end of a request can be pushed out."""
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(omitted(len(text))))
    head = keep // 2
    return text[:head] + omitted(len(text) - keep) + text[len(text) - (keep - head) :]


def omitted(count: int) -> str:
    """The note that stands where `count` characters were left out."""
    return f"\n[... {count} characters not shown ...]\n"


def tail(text: str, max_chars: int) -> str:
    """The last `max_chars` characters of `text`, cut at a word boundary when one is near."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < 40 else cut
