"""Output processing for one sequence: token ids to text, text to sections (reasoning / answer),
stop strings, and the token counts usage reports. Knows nothing about steering; it can return to a
checkpoint so that a rolled-back step leaves no trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safethink_server.engines.base import TokenLogprob
from safethink_server.schema import InsertedKind, ReasoningConfig, Section
from safethink_server.steering.text import IncrementalDetokenizer, SectionSplitter, Segment, StopMatcher


@dataclass
class Delta:
    """A released piece of one choice's output: all that a client may read of it."""

    section: Section  # "reasoning" or "answer"
    text: str
    inserted: InsertedKind | None = None  # the server's text (prefix, end marker, refusal), not the model's
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the model tokens released with it
    marker: bool = False  # a reasoning marker written out (raw text only): never part of a judged step's text

    @property
    def server(self) -> bool:
        return self.inserted is not None


def merged(deltas: list[Delta]) -> list[Delta]:
    """Consecutive deltas of one section and origin joined into one; empty ones dropped."""
    if len(deltas) == 1 and deltas[0].text:
        return deltas
    out: list[Delta] = []
    for delta in deltas:
        if not delta.text and not delta.logprobs:
            continue
        last = out[-1] if out else None
        if last is not None and (last.section, last.inserted, last.marker) == (delta.section, delta.inserted, delta.marker):
            out[-1] = Delta(delta.section, last.text + delta.text, delta.inserted, last.logprobs + delta.logprobs, delta.marker)
        else:
            out.append(delta)
    return out


@dataclass(frozen=True)
class OutputCheckpoint:
    detokenizer: tuple[int, int, int]
    splitter: tuple[Section, str, bool]
    output_tokens: int
    reasoning_tokens: int
    pre_tokens: int


class OutputProcessor:
    def __init__(self, tokenizer: Any, reasoning: ReasoningConfig, initial_section: Section, stop: list[str],
                 skip_special_tokens: bool = True, raw_text: bool = False, include_stop: bool = False,
                 spaces_between_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self.splitter = SectionSplitter(reasoning.start_marker, reasoning.end_marker, initial_section, raw_text)
        self.stop = StopMatcher(stop, include_stop)
        self.output_tokens = 0  # tokens of the final sequence: kept samples and injected ids
        self.reasoning_tokens = 0
        self.pre_tokens = 0  # before any section is known (a reasoning marker the model writes itself)
        self.stopped = False  # a stop string was hit: nothing more is released
        self._released: list[str] = []  # every text released so far, all sections, server texts included

    @property
    def section(self) -> Section:
        return self.splitter.section

    def push(self, token: int) -> list[Delta]:
        """Count one token of the sequence and return the text it completes, split by section."""
        self.output_tokens += 1
        section = self.splitter.section
        if section == "reasoning":
            self.reasoning_tokens += 1
        elif section == "pre":
            self.pre_tokens += 1
        text = self.detok.push(token)
        if not text:
            return []
        return _deltas(self.splitter.feed(text))

    def push_through(self, ids: list[int]) -> list[Delta] | None:
        """Several model tokens as one piece, when that changes nothing a token-by-token push would
        decide: the section stays the same (so the reasoning count is exact), no partial character is
        left (it could end in a marker) and no stop string is hit (so the count ends at the right
        token). Otherwise nothing is pushed and None is returned."""
        section, checkpoint = self.splitter.section, self.checkpoint()
        self.output_tokens += len(ids)
        if section == "reasoning":
            self.reasoning_tokens += len(ids)
        elif section == "pre":
            self.pre_tokens += len(ids)
        text = self.detok.push_many(ids)
        segments = self.splitter.feed(text) if text else []
        if (self.splitter.section != section or not self.detok.settled  # a partial character may hide a marker
                or self.stop.would_stop("".join(s.text for s in segments if s.section == "answer" and not s.marker))):
            self.restore(checkpoint)
            return None
        return _deltas(segments)

    def push_all(self, ids: list[int], inserted: InsertedKind) -> list[Delta]:
        """The server's tokens at once, their text merged per section."""
        return merged([Delta(d.section, d.text, inserted, marker=d.marker) for token in ids for d in self.push(token)])

    def checkpoint(self) -> OutputCheckpoint:
        return OutputCheckpoint(self.detok.checkpoint(), self.splitter.checkpoint(), self.output_tokens, self.reasoning_tokens,
                                self.pre_tokens)

    def restore(self, c: OutputCheckpoint) -> None:
        self.detok.restore(c.detokenizer)
        self.splitter.restore(c.splitter)
        self.output_tokens, self.reasoning_tokens, self.pre_tokens = c.output_tokens, c.reasoning_tokens, c.pre_tokens

    def release(self, deltas: list[Delta], final: bool = False) -> list[Delta]:
        """The texts that go to the client: answer text passes the stop strings (a partial match is
        held back until the next text or the end decides it)."""
        if not self.stop.stops and not final:  # no stop strings: every text goes out as it is
            self._released += [delta.text for delta in deltas if not delta.marker]
            return deltas
        out: list[Delta] = []
        for delta in deltas:
            if self.stopped:
                break
            if delta.section == "reasoning" or delta.marker:
                out.append(delta)
                continue
            pieces, self.stopped = self.stop.feed(delta.text, final=final, origin=delta.inserted)
            out += (Delta("answer", text, origin) for text, origin in pieces)  # type: ignore[arg-type]
        if final and not self.stopped:
            pieces, _ = self.stop.feed("", final=True)
            out += (Delta("answer", text, origin) for text, origin in pieces)  # type: ignore[arg-type]
        self._released += (delta.text for delta in out if not delta.marker)
        return out

    def add_released(self, text: str) -> None:
        """Text that goes to the client past the stop strings (the refusal)."""
        self._released.append(text)

    @property
    def released(self) -> str:
        """Everything released so far; joined only when read (while steps are judged), so that
        streaming past the window appends without copying the whole text each time."""
        if len(self._released) > 1:
            self._released[:] = ["".join(self._released)]
        return self._released[0] if self._released else ""

    @property
    def settled(self) -> bool:
        """No text is held back (a partial character, a possible marker): it is all in the deltas."""
        return self.detok.settled and not self.splitter.buffer

    def end_of_text(self) -> list[Delta]:
        """The text held back (a partial character, a possible marker), now that no model text follows."""
        return _deltas(self.splitter.feed(self.detok.flush(), final=True))


def _deltas(segments: list[Segment]) -> list[Delta]:
    return [Delta(s.section, s.text, marker=s.marker) for s in segments]  # type: ignore[arg-type]

