"""What a session has released and not yet handed out: text deltas in order, the logprob entries of
judged text only, the pacing of stream events, and the report's list of the server's inserted texts
with where the client reads each."""

from __future__ import annotations

import dataclasses

from safethink_server.engines.base import Generation, TokenLogprob
from safethink_server.schema import InsertedText, SteeringReport
from safethink_server.steering.output import Delta, OutputProcessor, merged


class Outbox:
    def __init__(self, output: OutputProcessor, report: SteeringReport, logprobs: int | None, raw_text: bool,
                 stream_ids: int) -> None:
        self.output = output
        self.report = report
        self.logprobs = logprobs
        self.raw_text = raw_text
        # Ids that must come between two events (0: every batch's text goes out at once).
        self.stream_ids = stream_ids
        self.deltas: list[Delta] = []
        # Logprob entries go out with judged text only: those of output positions up to `entries_through`
        # (the end of the last step judged safe, or of text past the window); `entries_sent` have gone.
        # Inside the window (before `window_end`) an entry's alternatives are never released.
        self.entries_through = 0
        self.entries_sent = 0
        self.window_end: int | None = None
        self.shown: dict[str, int] = {}  # characters released so far, by section (one count for raw text)
        self.open_insert: InsertedText | None = None  # the inserted text the client's text ends in, if any
        self.yielded_at: int | None = None  # output ids when text last went out; None before the first

    def judged_so_far(self) -> None:
        """The output up to here is judged text (or past the window): its tokens' entries may go out."""
        self.entries_through = self.output.output_tokens

    def window_ended(self) -> None:
        """The watched window ends here: from here on entries go out whole."""
        if self.window_end is None:
            self.window_end = self.output.output_tokens

    def add(self, released: list[Delta]) -> None:
        """Released deltas go out; the server's are listed in the report where the client reads them."""
        for delta in released:
            if not delta.text:
                continue
            where = "text" if self.raw_text else delta.section
            at = self.shown.get(where, 0)
            self.shown[where] = at + len(delta.text)
            if delta.inserted is None:
                self.open_insert = None
                continue
            last = self.open_insert
            if last is not None and (last.kind, last.section) == (delta.inserted, delta.section):
                last.text += delta.text  # the rest of an inserted text held back for a stop string
            else:
                self.open_insert = InsertedText(kind=delta.inserted, section=delta.section, text=delta.text,  # type: ignore[arg-type]
                                                at=at)
                self.report.inserted.append(self.open_insert)
        self.deltas += released

    def due(self) -> bool:
        """Whether released text goes out now: the first at once, then once `stream_ids` ids have come
        since the last (fewer events, each with more text, for less cost per token)."""
        at = self.output.output_tokens
        if self.yielded_at is not None and at - self.yielded_at < self.stream_ids:
            return False
        self.yielded_at = at
        return True

    def take(self, generation: Generation | None) -> list[Delta]:
        """What goes out now: the released deltas, the last carrying the logprob entries released with them."""
        out, self.deltas = self.deltas, []
        entries = self._entries_due(generation)
        if entries:  # with the last model text, whose tokens they are (or a delta of their own)
            at = next((i for i in range(len(out) - 1, -1, -1) if out[i].inserted is None and not out[i].marker), None)
            if at is None:
                out.append(Delta("reasoning" if self.output.section == "reasoning" else "answer", ""))
                at = len(out) - 1
            out[at] = dataclasses.replace(out[at], logprobs=out[at].logprobs + entries)
        return merged(out)

    def _entries_due(self, generation: Generation | None) -> list[TokenLogprob]:
        """The logprob entries (where the sampling asked for them) of the model tokens released as judged
        text, or past the window, since the last call. Inside the window an entry's alternatives are
        dropped: they are candidates the model did not write, and no scorer judged them."""
        start, end = self.entries_sent, self.entries_through
        if generation is None or self.logprobs is None or end <= start:
            return []
        self.entries_sent = end
        window_end = self.window_end
        return [entry if not entry.top or (window_end is not None and first >= window_end) else entry.model_copy(update={"top": []})
                for first, entry in generation.logprob_entries(start, end)]
