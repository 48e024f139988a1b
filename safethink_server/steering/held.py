"""A watched step held back until it is judged: its text, its deltas and the checkpoint to roll back to."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from safethink_server.schema import Section
from safethink_server.steering.output import Delta, OutputCheckpoint


@dataclass
class HeldStep:
    checkpoint: OutputCheckpoint
    tokens: int = 0
    text: str = ""
    deltas: list[Delta] = field(default_factory=list)
    sections: set[Section] = field(default_factory=set)
    began: float = field(default_factory=time.perf_counter)  # when the model began writing it

    def add(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            if not delta.marker:
                self.text += delta.text
                if delta.text.strip():
                    self.sections.add(delta.section)
        self.deltas += deltas

    @property
    def answer_text(self) -> str:
        return "".join(d.text for d in self.deltas if d.section == "answer" and not d.marker)

    @property
    def section(self) -> Section:
        """The section of the step's first text."""
        return next((d.section for d in self.deltas if d.text.strip() and not d.marker),
                    self.deltas[0].section if self.deltas else "reasoning")

    def ended_by_section(self, now: Section) -> bool:
        """A step ends where its section does: at the reasoning's end marker."""
        return len(self.sections) > 1 or (bool(self.text.strip()) and now != self.section)

    def opened_the_answer(self, now: Section) -> bool:
        """No text yet, but the model wrote the reasoning's end marker: the marker is judged with the
        answer text that follows it, and a breach rolls it back (the prefix then goes into the
        reasoning, and the client never learns that the model had ended it)."""
        return not self.text.strip() and now == "answer" and self.checkpoint.splitter[0] == "reasoning"
