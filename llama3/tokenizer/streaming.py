"""Text from a growing list of token ids: never half a UTF-8 character, never the beginning of a stop string.

Every driver of the decoding core (Meta's API, the server, the CLI's streams) shows text through these, so a
stream and a whole answer always agree.
"""

from __future__ import annotations

import codecs
import operator
from collections.abc import Iterable, Sequence

from .base import Tokenizer


class StreamDecoder:
    """Turns a growing list of ids into text increments, never emitting half of a UTF-8 character.

    ``push`` returns only complete characters; bytes of a character split over several tokens are held
    until the rest arrives. ``flush`` emits what is left (an incomplete tail becomes U+FFFD). The text of
    all pushes plus the flush equals ``tokenizer.decode(ids, skip_special=skip_special)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer.strips_leading_space

    def push(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; return the newly completed text (possibly "")."""
        try:
            ids = (operator.index(ids),)  # one id (int, numpy or 0-d torch integer)
        except TypeError:
            pass
        tok = self.tokenizer
        data = b"".join(
            tok.token_bytes(i) for i in ids if not (self.skip_special and tok.is_special(i))
        )
        return self._emit(self._utf8.decode(data))

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character becomes U+FFFD) and reset."""
        text = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return text

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            # Matches the SentencePiece decoder, which drops one space at the start of the output.
            self._at_start = False
            if text[0] == " ":
                text = text[1:]
        return text


class StopStringWatch:
    """Follows one row's text as tokens arrive and finds the first stop string in it.

    ``releasable`` is the text that can be shown now: it holds back any tail that could still grow into a
    stop string, so a stream never shows the beginning of one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], skip_special: bool = False) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special=skip_special)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.char_ends: list[int] = []  # len(text) after each token, to map a text cut back to tokens
        self.cut: int | None = None  # offset where the first stop string starts

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared."""
        before = len(self.text)
        self.text += self.decoder.push(token)
        self.char_ends.append(len(self.text))
        if self.stop:
            window = max(len(s) for s in self.stop) - 1
            start = max(0, before - window)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.cut = min(hits)
                self.text = self.text[: self.cut]
                return True
        return False

    def finish(self) -> None:
        if self.cut is None:
            self.text += self.decoder.flush()

    def releasable(self, final: bool) -> str:
        if final or self.cut is not None or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[: len(self.text) - hold]

    def tokens_before_cut(self) -> int:
        """How many tokens lie wholly before the stop string."""
        if self.cut is None:
            return len(self.char_ends)
        return sum(1 for end in self.char_ends if end <= self.cut)
