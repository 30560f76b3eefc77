"""Logits processors: hard constraints (an automaton walked in lock-step with the token tries) and soft ones
(favour a source's tokens, end after one line)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .automata import ByteAutomaton
from .tokens import TokenizerLike, token_table


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
        self._root = self.table.trie()
        self._alphabet = frozenset(automaton.alphabet)
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
        step, alphabet = self.automaton.step, self._alphabet
        while stack:
            node, s = stack.pop()
            for byte, child in node.children.items():
                if byte not in alphabet:
                    continue
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
