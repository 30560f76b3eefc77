"""Prompt lookup: draft tokens for speculative decoding, copied from the sequence's own history.

When an answer repeats what is already in its context (extraction, quoting a document, editing code, a RAG
answer citing its sources, a JSON field copied from the prompt), the tokens after the last n-gram's previous
occurrence are a good guess at what comes next. The scheduler feeds those guesses through one decode step
together with the real next input and keeps the longest prefix the model itself would have chosen; so the
output is exactly plain decoding's, only sooner (see ``Scheduler``). No draft model, nothing to train.
"""

from __future__ import annotations

from collections.abc import Sequence

# Longest and shortest n-gram matched: longer matches first (they predict better); a single token still
# finds the continuation of a copied span after its first token diverged from an earlier copy.
MAX_NGRAM = 3
MIN_NGRAM = 2


class PromptLookup:
    """N-gram index over one sequence's tokens (prompt, then generated), grown as the sequence grows.

    ``draft(history, k)``: the up to ``k`` tokens that followed the most recent earlier occurrence of the
    history's last n-gram (n = ``max_ngram`` down to ``min_ngram``), or [] when it has none. ``history`` must
    only ever grow by appending between calls (the index covers what it has seen).
    """

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, latest occurrence
        self._indexed = 0  # n-grams ending before this index are in _last_end

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens to follow ``history``."""
        end = len(history)
        # Index n-grams ending at 0 .. end-2: one ending at end-1 is the query itself, not an earlier occurrence.
        for i in range(self._indexed, end - 1):
            for n in range(self.min_ngram, min(self.max_ngram, i + 1) + 1):
                self._last_end[tuple(history[i - n + 1 : i + 1])] = i
        self._indexed = max(self._indexed, end - 1)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            found = self._last_end.get(tuple(history[end - n :]))
            if found is not None:
                return list(history[found + 1 : found + 1 + k])
        return []
