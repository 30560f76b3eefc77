"""Byte-level automata: which byte strings a constrained answer may be (a list of distinct numbers, phrases
copied from a source): what a grammar could state only by listing every permutation or every phrase."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


class ByteAutomaton(Protocol):
    """A deterministic automaton over bytes describing the complete answers that are allowed.

    It must be *trim*: every state that ``step`` returns (not None) can still reach an accepting
    state, so a constrained generation can always be completed.
    """

    alphabet: bytes  # the only bytes step() can ever accept
    max_len: int  # length in bytes of the longest accepted string (a bound for max_gen_len)

    def start(self) -> Any: ...

    def step(self, state: Any, byte: int) -> Any | None: ...

    def accepts(self, state: Any) -> bool: ...


@dataclass(frozen=True)
class _ListState:
    used: frozenset[int]  # numbers already completed (followed by a comma)
    digits: bytes  # the number being written; b"" when a number must start
    after_comma: bool  # a single space may follow


class NumberListAutomaton:
    """Accepts ``count`` distinct numbers from ``allowed`` separated by ``","`` or ``", "``.

    ``count=None`` means every allowed number once (a permutation, for ranking). Numbers are written
    in plain decimal without leading zeros; nothing precedes the first number or follows the last.
    """

    def __init__(self, allowed: Iterable[int], count: int | None = None, *, allow_space: bool = True) -> None:
        nums = sorted(set(int(n) for n in allowed))
        if not nums or nums[0] < 0:
            raise ValueError(f"NumberListAutomaton needs non-negative numbers, got {nums!r}")
        count = len(nums) if count is None else count
        if not 1 <= count <= len(nums):
            raise ValueError(f"count must be in 1..{len(nums)} (distinct numbers available), got {count}")
        self.allowed: dict[bytes, int] = {str(n).encode(): n for n in nums}
        self.count = count
        self.allow_space = allow_space
        self.alphabet = b"0123456789," + (b" " if allow_space else b"")
        longest = sorted((len(k) for k in self.allowed), reverse=True)[:count]
        self.max_len = sum(longest) + (count - 1) * (2 if allow_space else 1)

    def start(self) -> _ListState:
        return _ListState(frozenset(), b"", False)

    def _prefix_ok(self, digits: bytes, used: frozenset[int]) -> bool:
        return any(k.startswith(digits) and n not in used for k, n in self.allowed.items())

    def step(self, state: _ListState, byte: int) -> _ListState | None:
        if 48 <= byte <= 57:  # a digit extends (or starts) the current number
            digits = state.digits + bytes((byte,))
            return _ListState(state.used, digits, False) if self._prefix_ok(digits, state.used) else None
        if byte == 44:  # ',' closes a complete, unused number, if more numbers are still wanted
            n = self.allowed.get(state.digits)
            if n is None or n in state.used or len(state.used) + 1 >= self.count:
                return None
            return _ListState(state.used | {n}, b"", True)
        if byte == 32 and state.after_comma and self.allow_space:
            return _ListState(state.used, b"", False)
        return None

    def accepts(self, state: _ListState) -> bool:
        n = self.allowed.get(state.digits)
        return n is not None and n not in state.used and len(state.used) + 1 == self.count


def _is_word_byte(b: int) -> bool:
    # ASCII letters/digits, and every byte of a multi-byte UTF-8 character (non-Latin words, accents).
    return b >= 0x80 or 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122


@dataclass(frozen=True)
class _CopyState:
    positions: frozenset[int] | None  # where the current phrase may continue in the source; None: none started
    count: int  # phrases finished (followed by a comma)
    after_comma: bool


class CopyAutomaton:
    """Accepts 1..``max_items`` phrases copied verbatim from ``source``, separated by ``","``/``", "``.

    A phrase starts at the beginning of a word of the source and ends at the end of a word (it
    may span several words and the punctuation between them, but never a comma: the comma is the
    separator). For extraction tasks: entities of a query, a keyphrase of a review.
    """

    def __init__(self, source: str, max_items: int = 1) -> None:
        src = source.encode("utf-8")
        word = [_is_word_byte(b) for b in src]
        n = len(src)
        self.src = src
        self.max_items = max_items
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        ends = {q for q in range(1, n + 1) if word[q - 1] and (q == n or not word[q])}
        # finishable[p]: a phrase that has reached position p can still end at a word end without a comma.
        finishable = [False] * (n + 1)
        finishable[n] = n in ends
        for p in range(n - 1, -1, -1):
            finishable[p] = p in ends or (src[p] != 44 and finishable[p + 1])
        self.ends = frozenset(ends)
        self._finishable = finishable
        self.starts = frozenset(p for p in range(n) if word[p] and (p == 0 or not word[p - 1]) and finishable[p])
        if not self.starts:
            raise ValueError(f"CopyAutomaton: no word to copy in {source!r:.60}")
        self.alphabet = bytes(sorted((set(src) - {44}) | {44, 32}))
        longest, run = 0, 0
        for b in src:
            run = 0 if b == 44 else run + 1
            longest = max(longest, run)
        self.max_len = max_items * longest + (max_items - 1) * 2

    def start(self) -> _CopyState:
        return _CopyState(None, 0, False)

    def _advance(self, positions: frozenset[int] | Iterable[int], byte: int) -> frozenset[int] | None:
        src, ok = self.src, self._finishable
        nxt = frozenset(p + 1 for p in positions if p < len(src) and src[p] == byte and ok[p + 1])
        return nxt or None

    def step(self, state: _CopyState, byte: int) -> _CopyState | None:
        if state.positions is None:  # between phrases
            if byte == 32 and state.after_comma:
                return _CopyState(None, state.count, False)
            nxt = self._advance(self.starts, byte) if byte != 44 else None
            return _CopyState(nxt, state.count, False) if nxt else None
        if byte == 44:
            if state.count + 1 >= self.max_items or not (state.positions & self.ends):
                return None
            return _CopyState(None, state.count + 1, True)
        nxt = self._advance(state.positions, byte)
        return _CopyState(nxt, state.count, False) if nxt else None

    def accepts(self, state: _CopyState) -> bool:
        return state.positions is not None and bool(state.positions & self.ends)


# ---------------------------------------------------------------------------------------------
# Processors
