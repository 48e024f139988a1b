"""Step boundaries inside the reasoning section.

A step ends at the token that completes a delimiter ("\n\n" by default, or any of a list, or a
regex) once the step holds some non-blank text, or when it reaches `max_step_tokens`. Steps are
token-granular: the token that completes a delimiter belongs to the step it ends, so rolling a step
back is rolling back exactly its tokens.
"""

from __future__ import annotations

import re


class StepBoundaryDetector:
    def __init__(self, delimiters: list[str] | None = None, regex: str | None = None, max_step_tokens: int = 256) -> None:
        self.delimiters: list[str] | None = None
        if regex:
            self.pattern = re.compile(regex)
        else:
            self.delimiters = delimiters or ["\n\n"]
            if any(not d for d in self.delimiters):
                raise ValueError("step delimiters must be non-empty")
            self.pattern = re.compile("|".join(re.escape(d) for d in sorted(self.delimiters, key=len, reverse=True)))
        if max_step_tokens < 1:
            raise ValueError("max_step_tokens must be at least 1")
        self.max_step_tokens = max_step_tokens

    @property
    def monotone(self) -> bool:
        """Whether a step that has ended stays ended as text is added (true of delimiters and the token
        limit; a regex may stop matching, e.g. one anchored with `$`)."""
        return self.delimiters is not None

    def is_complete(self, step_text: str, step_tokens: int) -> bool:
        """Whether the step accumulated so far has ended."""
        if step_tokens >= self.max_step_tokens:
            return True
        if self.delimiters is not None:
            first_text = len(step_text) - len(step_text.lstrip())
            return first_text < len(step_text) and any(step_text.find(d, first_text + 1) >= 0 for d in self.delimiters)
        for match in self.pattern.finditer(step_text):
            if match.end() > match.start() and step_text[: match.start()].strip():
                return True
        return False
