"""Token ids to streamed text: incremental detokenization and stop strings.

`TextStream` turns a growing list of token ids into text deltas. It decodes only a short window (the tokens
since the last emitted boundary), compares it with the same window minus the newest tokens and emits the
difference; decoding both from the same start cancels tokenizer artefacts at a window's start (SentencePiece
drops the first token's leading space). A window that ends in U+FFFD (a character whose UTF-8 bytes span
several byte tokens) waits for the next token.

Stop strings: the output ends before the first occurrence of any of them; text that could still become one
(a suffix that is a prefix of a stop string) is held back until it cannot, so a stream never shows part of
a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Text deltas of one sequence's new tokens, with stop strings (see the module docstring)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (the stop strings not yet cut)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._prefix = 0  # the decode window starts here
        self._read = 0  # tokens before this are in `text`

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (may be empty). After a stop string, nothing more."""
        if self.stopped:
            return ""
        self.ids.append(token)
        if not self._absorb(final=False):
            return ""  # a character not yet complete
        return self._release(final=False)

    def finish(self) -> str:
        """The text held back (a partial stop string, or an incomplete character) when the sequence ends."""
        if not self.stopped and self._read < len(self.ids):  # an incomplete character at the very end
            self._absorb(final=True)
        return self._release(final=True)

    def _absorb(self, final: bool) -> bool:
        """Decode the tokens since the last boundary into `text`; False (nothing taken) while the window ends
        in an incomplete character, unless `final`."""
        window = self.tokenizer.decode(self.ids[self._prefix :])
        if window.endswith(REPLACEMENT) and not final:
            return False
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        self.text += window[len(before) :] if window.startswith(before) else window
        self._prefix, self._read = self._read, len(self.ids)
        return True

    @property
    def final_text(self) -> str:
        return self.text[: self.emitted]

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif not final:
            end -= self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if self.stopped:
            self.text = self.text[:end]
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
