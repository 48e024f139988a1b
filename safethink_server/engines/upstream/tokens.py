"""Token counts of the proxy's byte stream, where the upstream says how many tokens each event's text
is (vLLM's `return_token_ids`): usage and reasoning tokens are then counted, not estimated."""

from __future__ import annotations

from bisect import bisect_right


class TokenMarks:
    """(end byte, tokens up to it) over the kept text, ascending in both. Tokens that come without
    text (held back by the upstream) count at the position they came at."""

    def __init__(self) -> None:
        self._positions = [0]
        self._tokens = [0]
        self.complete = True  # every event so far said how many tokens it was

    def add(self, end: int, tokens: int) -> None:
        if end > self._positions[-1]:
            self._positions.append(end)
            self._tokens.append(self._tokens[-1] + tokens)
        else:
            self._tokens[-1] += tokens

    def add_estimated(self, end: int, n_bytes_per_token: int) -> None:
        """Bytes with no count from the upstream (text injected here, in chat mode): an estimate."""
        self.add(end, -(-(end - self._positions[-1]) // n_bytes_per_token))

    def rebase(self, end: int, tokens: int) -> None:
        """The kept text up to `end` is `tokens` tokens as the upstream tokenizes it now, for a
        continuation: that count replaces what the marks say (injected text included)."""
        self.cut(end)
        if self._positions[-1] < end:
            self._positions.append(end)
            self._tokens.append(self._tokens[-1])
        self._tokens[-1] = max(tokens, self._tokens[-2] if len(self._tokens) > 1 else 0)

    def cut(self, end: int) -> None:
        """Forget what lies past byte `end` (a rollback); a cut inside an event keeps its share."""
        if end >= self._positions[-1]:
            return
        count = self.at(end)
        keep = bisect_right(self._positions, end)
        del self._positions[keep:], self._tokens[keep:]
        if self._positions[-1] < end:
            self._positions.append(end)
            self._tokens.append(count)

    def at(self, position: int) -> int:
        """Tokens up to byte `position` (inside an event, its share by bytes)."""
        i = bisect_right(self._positions, position) - 1
        if i + 1 >= len(self._positions) or self._positions[i] == position:
            return self._tokens[min(i, len(self._tokens) - 1)]
        start, end = self._positions[i], self._positions[i + 1]
        return self._tokens[i] + round((self._tokens[i + 1] - self._tokens[i]) * (position - start) / (end - start))
