"""Constrained decoding: logits processors that restrict or bias what a model may generate.

A logits processor is called once per generated token of one batch row,
``proc(generated, logits) -> logits``: ``generated`` holds the ids generated so far for that row
(prompt excluded) and ``logits`` is the row's 1-D float32 ``(vocab,)`` tensor before
temperature/top-p. Forbidden tokens get ``-inf``; "finish now" is expressed by allowing only the
tokenizer's stop tokens. Pass them as ``logits_processors=[[proc, ...], ...]`` (one list per row) to
``Llama.generate``, ``text_completion`` or ``chat_completion``.

Hard constraints are byte-level automata (:class:`ChoiceAutomaton`: one of fixed strings;
:class:`NumberListAutomaton`: distinct numbers from a set, comma-separated; :class:`CopyAutomaton`:
phrases copied from a source text) driven by :class:`AutomatonConstraint`. Soft ones edit scores:
:class:`CopyBiasProcessor` favours a source's tokens, :class:`LineLimitProcessor` ends after a line. Working on token *bytes* rather than decoded text makes the
same automaton correct for every vocabulary: GPT-2 byte BPE (SmolLM2: one token per digit, ``","``
and ``" "`` apart) and tiktoken (Llama 3: ``"12"`` or ``"100"`` may be one token, ``", "`` may be
one token). The allowed set of a step is found by walking a byte trie of the candidate tokens in
lock-step with the automaton, so only viable prefixes are visited.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "AutomatonConstraint",
    "ByteAutomaton",
    "ChoiceAutomaton",
    "CopyAutomaton",
    "CopyBiasProcessor",
    "LineLimitProcessor",
    "NumberListAutomaton",
    "TokenTable",
    "TokenizerLike",
    "token_table",
]


class TokenizerLike(Protocol):
    """What the processors need from a tokenizer (``llama3.tokenizer.Tokenizer`` provides it)."""

    n_words: int
    stop_tokens: Collection[int]

    def token_bytes(self, token_id: int) -> bytes: ...

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...


# ---------------------------------------------------------------------------------------------
# Per-tokenizer tables (built once: a full pass over the vocabulary costs ~0.1-0.5 s)


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # tokens whose bytes end exactly here


class TokenTable:
    """The bytes of every ordinary token of one tokenizer, and byte tries over subsets of them."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.stop_tokens: tuple[int, ...] = tuple(sorted(tokenizer.stop_tokens))
        is_special = getattr(tokenizer, "is_special", None)
        table: list[bytes] = []
        for i in range(tokenizer.n_words):
            # Control tokens must never be produced by a text constraint; b"" keeps them out of every trie.
            if i in tokenizer.stop_tokens or (is_special is not None and is_special(i)):
                table.append(b"")
                continue
            try:
                table.append(bytes(tokenizer.token_bytes(i)))
            except Exception:  # an id the tokenizer cannot render (unused slot): never allowed
                table.append(b"")
        self.token_bytes: list[bytes] = table
        self._tries: OrderedDict[bytes, _TrieNode] = OrderedDict()
        self._by_bytes: dict[bytes, list[int]] | None = None

    MAX_TRIES = 8  # copy constraints bring a new alphabet per prompt: keep only the recent tries

    def trie(self, alphabet: bytes) -> _TrieNode:
        """Trie of all tokens made only of bytes in ``alphabet`` (cached per alphabet)."""
        key = bytes(sorted(set(alphabet)))
        root = self._tries.get(key)
        if root is not None:
            self._tries.move_to_end(key)
        else:
            root = _TrieNode()
            for i, b in enumerate(self.token_bytes):
                if b and not b.translate(None, key):  # every byte of the token is in the alphabet
                    node = root
                    for byte in b:
                        node = node.children.setdefault(byte, _TrieNode())
                    node.ids.append(i)
            self._tries[key] = root
            while len(self._tries) > self.MAX_TRIES:
                self._tries.popitem(last=False)
        return root

    def ids_of(self, text: bytes) -> list[int]:
        """All token ids whose bytes are exactly ``text``."""
        if self._by_bytes is None:
            by: dict[bytes, list[int]] = {}
            for i, b in enumerate(self.token_bytes):
                if b:
                    by.setdefault(b, []).append(i)
            self._by_bytes = by
        return list(self._by_bytes.get(text, ()))


_TABLES: weakref.WeakKeyDictionary[Any, TokenTable] = weakref.WeakKeyDictionary()
_TABLES_BY_ID: dict[int, tuple[Any, TokenTable]] = {}


def token_table(tokenizer: TokenizerLike) -> TokenTable:
    """The cached :class:`TokenTable` of ``tokenizer`` (one per tokenizer object)."""
    try:
        table = _TABLES.get(tokenizer)
        if table is None:
            table = _TABLES[tokenizer] = TokenTable(tokenizer)
        return table
    except TypeError:  # not weak-referenceable: keep the tokenizer alive alongside its table
        entry = _TABLES_BY_ID.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = _TABLES_BY_ID[id(tokenizer)] = (tokenizer, TokenTable(tokenizer))
        return entry[1]


# ---------------------------------------------------------------------------------------------
# Byte automata


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


class ChoiceAutomaton:
    """Accepts exactly one of a fixed set of strings (e.g. the option numbers ``"0"..."3"``)."""

    def __init__(self, choices: Iterable[str]) -> None:
        encoded = sorted({c.encode("utf-8") for c in choices})
        if not encoded or b"" in encoded:
            raise ValueError(f"ChoiceAutomaton needs non-empty choices, got {encoded!r}")
        self.choices: tuple[bytes, ...] = tuple(encoded)
        self.alphabet = bytes(sorted({b for c in encoded for b in c}))
        self.max_len = max(len(c) for c in encoded)

    def start(self) -> bytes:
        return b""

    def step(self, state: bytes, byte: int) -> bytes | None:
        nxt = state + bytes((byte,))
        return nxt if any(c.startswith(nxt) for c in self.choices) else None

    def accepts(self, state: bytes) -> bool:
        return state in self.choices


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


def _mask_to(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Keep ``logits`` at ``ids`` (a CPU or same-device index), ``-inf`` elsewhere."""
    if ids.device != logits.device:
        ids = ids.to(logits.device)
    out = torch.full_like(logits, float("-inf"))
    out[ids] = logits[ids]
    return out


class AutomatonConstraint:
    """Logits processor allowing only tokens that keep the output a prefix of an accepted string.

    Stop tokens are allowed exactly when the output so far is accepted; once nothing can follow,
    only stop tokens remain, so generation ends by itself (give ``max_gen_len >= max_tokens``).
    It follows one row's output incrementally: use one instance per row and generation.
    """

    def __init__(self, tokenizer: TokenizerLike, automaton: ByteAutomaton) -> None:
        self.table = token_table(tokenizer)
        self.automaton = automaton
        self._root = self.table.trie(automaton.alphabet)
        self._stop = torch.tensor(self.table.stop_tokens, dtype=torch.long)
        self._seen: list[int] = []
        self._state: Any = automaton.start()
        self._allowed_cache: dict[Any, torch.Tensor] = {}

    @property
    def max_tokens(self) -> int:
        """Upper bound on generated tokens including the final stop token (each token is >= 1 byte)."""
        return self.automaton.max_len + 1

    def _advance(self, generated: Sequence[int]) -> Any:
        n = len(self._seen)
        if len(generated) < n or list(generated[:n]) != self._seen:  # a different row history: restart
            self._seen, self._state, n = [], self.automaton.start(), 0
        state = self._state
        for tok in generated[n:]:
            tok = int(tok)
            self._seen.append(tok)
            if state is None:
                continue
            raw = self.table.token_bytes[tok] if 0 <= tok < len(self.table.token_bytes) else b""
            if not raw:
                state = None
                continue
            for byte in raw:
                state = self.automaton.step(state, byte)
                if state is None:
                    break
        self._state = state
        return state

    def allowed_ids(self, state: Any) -> torch.Tensor:
        """Token ids allowed in ``state`` (stop tokens only for a dead state)."""
        if state is None:
            return self._stop
        try:
            return self._allowed_cache[state]
        except (KeyError, TypeError):
            pass
        ids: list[int] = []
        stack = [(self._root, state)]
        step = self.automaton.step
        while stack:
            node, s = stack.pop()
            for byte, child in node.children.items():
                s2 = step(s, byte)
                if s2 is None:
                    continue
                ids.extend(child.ids)
                if child.children:
                    stack.append((child, s2))
        if self.automaton.accepts(state) or not ids:
            ids.extend(self.table.stop_tokens)
        result = torch.tensor(sorted(set(ids)), dtype=torch.long)
        try:
            self._allowed_cache[state] = result
        except TypeError:
            pass
        return result

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return _mask_to(logits, self.allowed_ids(self._advance(generated)))


class CopyBiasProcessor:
    """Soft copy constraint: adds ``bonus`` to tokens of ``source`` (and to separators and stop).

    Used for extraction (NER): answers should be words of the query, so tokens of the query's own
    encoding, and of each of its words with and without a leading space, are favoured. Separators
    (``","``, ``", "``) and stop tokens get the same bonus so that ending or listing is not
    penalised relative to copying. Nothing is forbidden.
    """

    def __init__(self, tokenizer: TokenizerLike, source: str, bonus: float = 5.0) -> None:
        table = token_table(tokenizer)
        ids: set[int] = set(tokenizer.encode(source, bos=False, eos=False))
        for word in source.split():
            for variant in (word, " " + word, word.lower(), " " + word.lower()):
                ids.update(tokenizer.encode(variant, bos=False, eos=False))
        for sep in (b",", b", ", b" ,"):
            ids.update(table.ids_of(sep))
        ids.update(table.stop_tokens)
        self.bonus = float(bonus)
        self.ids = torch.tensor(sorted(i for i in ids if 0 <= i < len(table.token_bytes)), dtype=torch.long)

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.ids.device != logits.device:
            self.ids = self.ids.to(logits.device)
        logits[self.ids] += self.bonus
        return logits


class LineLimitProcessor:
    """Ends the output after ``max_lines`` non-empty lines: a newline after text leaves only stop tokens."""

    def __init__(self, tokenizer: TokenizerLike, max_lines: int = 1) -> None:
        if max_lines < 1:
            raise ValueError(f"max_lines must be >= 1, got {max_lines}")
        self.table = token_table(tokenizer)
        self.max_lines = max_lines
        self._stop = torch.tensor(self.table.stop_tokens, dtype=torch.long)

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if not generated:
            return logits
        tb = self.table.token_bytes
        text = b"".join(tb[int(t)] if 0 <= int(t) < len(tb) else b"" for t in generated)
        lines = text.split(b"\n")
        # Lines already finished by a newline, counting only those with text in them.
        finished = sum(1 for line in lines[:-1] if line.strip())
        if finished >= self.max_lines:
            return _mask_to(logits, self._stop)
        return logits
