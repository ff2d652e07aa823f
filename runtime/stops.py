"""Stop strings on streamed text: hold back what could still become a stop string.

Text arrives in pieces (one token's worth at a time) and a stop string may span pieces, so a
piece cannot always be released at once: its tail might be the start of a stop string that the
next piece completes. `StopStrings.add` releases everything that can no longer be part of a
match and keeps the rest; when a stop string appears, the text before it is released and the
stream is over. What is released, joined, is the generated text cut where the first stop
string to be completed begins (or all of it, after `flush`), however the text was split:
tests/test_stops.py checks this on random splits.
"""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Feed text pieces with `add`; read back `(releasable text, stopped)`."""

    def __init__(self, stops: Sequence[str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops = list(dict.fromkeys(stops))
        self.held = ""        # text that might begin a stop string
        self.stopped = False

    def _hold_length(self, text: str) -> int:
        """The longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _first_completed(self, text: str) -> int | None:
        """Where the stop string that ends first in `text` begins (the longest, on a tie), so the
        cut does not depend on how the text was split into pieces."""
        best = None
        for stop in self.stops:
            i = text.find(stop)
            if i >= 0 and (best is None or (i + len(stop), i) < best):
                best = (i + len(stop), i)
        return None if best is None else best[1]

    def add(self, piece: str) -> tuple[str, bool]:
        """The text that is now safe to release, and whether a stop string was reached."""
        if self.stopped:
            return "", True
        text = self.held + piece
        cut = self._first_completed(text)
        if cut is not None:
            self.held, self.stopped = "", True
            return text[:cut], True
        keep = self._hold_length(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation: what was held back, released (no stop string came)."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text
