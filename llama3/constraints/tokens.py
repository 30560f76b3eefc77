"""The token side of constrained decoding: each token's bytes, and byte tries over the vocabulary."""

from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol



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
        self._trie: _TrieNode | None = None
        self._by_bytes: dict[bytes, list[int]] | None = None

    def trie(self) -> _TrieNode:
        """Byte trie of every ordinary token (built once per tokenizer). Walkers prune it by their automaton's
        alphabet as they go: cheaper than a trie per alphabet, since copy constraints bring a new one per prompt."""
        if self._trie is None:
            root = _TrieNode()
            for i, b in enumerate(self.token_bytes):
                if b:
                    node = root
                    for byte in b:
                        node = node.children.setdefault(byte, _TrieNode())
                    node.ids.append(i)
            self._trie = root
        return self._trie

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
