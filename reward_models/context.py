"""What a scorer reads of a request: the whole conversation, in order, so that no span of it can be
pushed out of view by text around it.

A conversation is read as 'role: text' paragraphs (a message's content, its earlier reasoning and its
tool calls; the tool definitions first). Scorers that read one sequence of bounded length keep its
start and its end, and name what they leave out; the probe reads all of it in overlapping windows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

WINDOW_CHARS = 384  # at most one encoder token a character: a window always fits the encoder whole
WINDOW_STRIDE = 192  # any span of up to WINDOW_CHARS - WINDOW_STRIDE characters lies whole in one window


def conversation_view(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[str, str]:
    """(the latest user turn, every other part of the request as 'role: text' paragraphs in order).

    Everything a client sent that the model reads is in one of the two: system and developer text,
    earlier turns with their reasoning and tool calls, tool results, and the tool definitions."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    latest = users[-1] if users else len(messages) - 1
    paragraphs = [f"tools: {json.dumps(list(tools), ensure_ascii=False)}"] if tools else []
    for i, message in enumerate(messages):  # the latest turn's content is read apart; the rest of it here
        text = message_text(message if i != latest else {k: v for k, v in message.items() if k != "content"})
        if text:
            paragraphs.append(text)
    latest_text = str(messages[latest].get("content") or "") if messages else ""
    return latest_text, "\n\n".join(paragraphs)


def message_text(message: Mapping[str, Any]) -> str:
    """One message as a scorer reads it: 'role: text', with its reasoning and tool calls."""
    parts = [str(message.get(key) or "") for key in ("reasoning", "content")]
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {} if isinstance(call, Mapping) else {}
        parts.append(f"{function.get('name', '')}({function.get('arguments', '')})")
    text = "\n".join(p for p in parts if p.strip())
    return f"{message.get('role', 'user')}: {text}" if text else ""


def conversation_text(prompt: str, history: str) -> str:
    """The request as one text: the rest of the conversation, then the latest user turn."""
    return "\n\n".join(t for t in (history.strip(), prompt.strip()) if t)


def windows(text: str, size: int = WINDOW_CHARS, stride: int = WINDOW_STRIDE) -> list[str]:
    """Overlapping windows that cover `text`: every character is in one, and every span of up to
    `size - stride` characters lies whole in one. A text of up to `size` characters is one window."""
    if len(text) <= size:
        return [text]
    starts = list(range(0, len(text) - size, stride)) + [len(text) - size]
    return [text[s : s + size] for s in starts]


def ends(text: str, max_chars: int) -> str:
    """`text` within `max_chars`: whole where it fits, otherwise its start and its end with the number
    of characters left out between them named, so that neither end of a request can be pushed out."""
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(_omitted(len(text))))
    head = keep // 2
    return text[:head] + _omitted(len(text) - keep) + text[len(text) - (keep - head) :]


def _omitted(count: int) -> str:
    return f"\n[... {count} characters not shown ...]\n"


def tail(text: str, max_chars: int) -> str:
    """The last `max_chars` characters of `text`, cut at a word boundary when one is near."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < 40 else cut
