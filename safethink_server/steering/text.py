"""Token ids to text, and text to sections (reasoning / answer), both incremental and both able to
return to a checkpoint, so a rolled-back step leaves no trace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from safethink_server.schema import Section


class IncrementalDetokenizer:
    """Decodes a growing id list without re-decoding it all (vLLM's prefix/read offsets), holding
    back bytes that do not form a whole character yet."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.decode = _decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._new_text(final=False)

    def push_many(self, token_ids: list[int]) -> str:
        self.ids += token_ids
        return self._new_text(final=False)

    def _new_text(self, final: bool) -> str:
        """The text the ids after `read_offset` add; unless `final`, none while it ends mid-character."""
        decode = self.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if final or (len(full) > len(prefix) and not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a character never completed comes out as U+FFFD), at the end."""
        return "" if self.settled else self._new_text(final=True)

    @property
    def settled(self) -> bool:
        """Every token pushed so far has come out as text (no partial character held back)."""
        return self.read_offset == len(self.ids)

    def checkpoint(self) -> tuple[int, int, int]:
        return len(self.ids), self.prefix_offset, self.read_offset

    def restore(self, state: tuple[int, int, int]) -> None:
        n, self.prefix_offset, self.read_offset = state
        del self.ids[n:]


def _decoder(tokenizer: Any, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """Decoding (without special tokens unless asked); straight through a fast tokenizer's Rust
    backend (a quarter of the wrapper's cost per call) where the wrapper adds nothing to it.
    `spaces_between_special_tokens` is read by slow tokenizers only, as in vLLM."""
    if not spaces_between_special_tokens:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=False)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass
class Segment:
    section: Section
    text: str
    marker: bool = False  # a reasoning marker (raw text only), in the section it opens


class SectionSplitter:
    """Splits streamed text at the reasoning markers (which are dropped from the output, as vLLM's
    reasoning parsers do). A text tail that could be the start of a marker is held back until the
    next piece decides it."""

    def __init__(self, start_marker: str, end_marker: str, section: Section, raw: bool = False) -> None:
        self.start_marker = start_marker
        self.end_marker = end_marker
        self.section: Section = section
        self.buffer = ""
        self.answer_started = False
        # The text as written (a raw completion's): the answer's leading whitespace kept (" Paris"), and
        # each marker as a segment of its own, so that it is released with the tokens that wrote it.
        self.raw = raw

    def feed(self, text: str, final: bool = False) -> list[Segment]:
        if self.section == "reasoning" and not self.buffer and self.end_marker[0] not in text:
            return [Segment("reasoning", text)] if text else []  # no marker, nor the start of one
        self.buffer += text
        out: list[Segment] = []
        while self.buffer:
            marker = {"pre": self.start_marker, "reasoning": self.end_marker, "answer": None}[self.section]
            if marker is None:
                text = self.buffer if self.answer_started or self.raw else self.buffer.lstrip()
                self.answer_started = self.answer_started or bool(text)
                if text:
                    out.append(Segment("answer", text))
                self.buffer = ""
                break
            at = self.buffer.find(marker)
            if at >= 0 and self.section == "pre" and self.buffer[:at].strip():
                self.section = "answer"  # text before the start marker: the model did not reason
                continue
            if at >= 0:
                if at and self.section == "reasoning":
                    out.append(Segment(self.section, self.buffer[:at]))
                written = self.buffer[: at + len(marker)] if self.section == "pre" else marker  # blank text before it
                self.buffer = self.buffer[at + len(marker) :]
                self.section = "reasoning" if self.section == "pre" else "answer"
                if self.raw:
                    out.append(Segment(self.section, written, marker=True))
                continue
            keep = 0 if final else _partial_suffix(self.buffer, marker)
            if self.section == "pre" and not final and self.buffer.strip() == "":
                keep = len(self.buffer)  # leading whitespace before a possible start marker
            emit = self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(emit) :]
            if emit and self.section == "pre":
                # Text before any start marker is the answer: the model did not reason.
                self.section = "answer"
                self.buffer = emit + self.buffer
                continue
            if emit:
                out.append(Segment(self.section, emit))
            break
        return out

    def checkpoint(self) -> tuple[Section, str, bool]:
        return self.section, self.buffer, self.answer_started

    def restore(self, state: tuple[Section, str, bool]) -> None:
        self.section, self.buffer, self.answer_started = state


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class StopMatcher:
    """Finds stop strings in streamed answer text, holding back a tail that may begin one. Each piece
    of text keeps its origin (None: the model's; else the kind of server text it is), so that a tail
    held back and flushed later is never passed off as another origin's. `include`: the stop string
    that is hit goes out too (vLLM's include_stop_str_in_output)."""

    def __init__(self, stops: list[str], include: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include
        self.pieces: list[Piece] = []  # the held-back tail, in order

    @property
    def buffer(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def would_stop(self, text: str) -> bool:
        """Whether feeding `text` next would hit a stop string."""
        if not self.stops or not text:
            return False
        tail = self.buffer + text
        return any(s in tail for s in self.stops)

    def feed(self, text: str, final: bool = False, origin: str | None = None) -> tuple[list[Piece], bool]:
        """([(text safe to release, its origin)], whether a stop string was hit)."""
        if not self.stops:
            return ([(text, origin)] if text else []), False
        if text:
            self.pieces.append((text, origin))
        buffer = self.buffer
        hits = [(buffer.find(s), len(s)) for s in self.stops if s in buffer]
        if hits:
            at, length = min(hits)  # the first to begin; of two beginning there, the shorter ends first
            out, _ = _cut(self.pieces, at + length if self.include else at)
            self.pieces = []
            return out, True
        keep = 0 if final else max(_partial_suffix(buffer, s) for s in self.stops)
        out, self.pieces = _cut(self.pieces, len(buffer) - keep)
        return out, False


Piece = tuple[str, "str | None"]  # text and its origin: None for the model's, else the kind of server text


def _cut(pieces: list[Piece], at: int) -> tuple[list[Piece], list[Piece]]:
    """The pieces split at character `at`: (before, after), each part keeping its origin."""
    before: list[Piece] = []

    def take(text: str, origin: str | None) -> None:
        if before and before[-1][1] == origin:
            before[-1] = (before[-1][0] + text, origin)
        else:
            before.append((text, origin))

    for i, (text, origin) in enumerate(pieces):
        if at >= len(text):
            take(text, origin)
            at -= len(text)
            continue
        if at:
            take(text[:at], origin)
        return before, [(text[at:], origin), *pieces[i + 1:]]
    return before, []
