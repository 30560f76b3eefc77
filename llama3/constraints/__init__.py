"""Constrained decoding: logits processors that restrict or bias what a model may generate.

A logits processor is called once per generated token of one batch row,
``proc(generated, logits) -> logits``: ``generated`` holds the ids generated so far for that row
(prompt excluded) and ``logits`` is the row's 1-D float32 ``(vocab,)`` tensor before
temperature/top-p. Forbidden tokens get ``-inf``; "finish now" is expressed by allowing only the
tokenizer's stop tokens. Pass them as ``logits_processors=[[proc, ...], ...]`` (one list per row) to
``Llama.generate``, ``text_completion`` or ``chat_completion``.

Grammars (JSON schemas, regexes, choices, GBNF/Lark) go through llguidance (:mod:`.grammar`). What a grammar
cannot state compactly is written by hand: byte-level automata (:class:`NumberListAutomaton`: distinct numbers
from a set, comma-separated; :class:`CopyAutomaton`: phrases copied from a source text) driven by
:class:`AutomatonConstraint`. Soft processors edit scores: :class:`CopyBiasProcessor` favours a source's
tokens, :class:`LineLimitProcessor` ends after a line. Working on token *bytes* rather than decoded text makes
the same automaton correct for every vocabulary: GPT-2 byte BPE (SmolLM2: one token per digit, ``","`` and
``" "`` apart) and tiktoken (Llama 3: ``"12"`` or ``"100"`` may be one token, ``", "`` may be one token).
The allowed set of a step is found by walking the vocabulary's byte trie in lock-step with the automaton, so
only viable prefixes are visited.
"""

from __future__ import annotations

from .automata import ByteAutomaton, CopyAutomaton, NumberListAutomaton
from .grammar import Grammar, GrammarConstraint, GrammarError
from .processors import AutomatonConstraint, CopyBiasProcessor, LineLimitProcessor
from .tokens import TokenizerLike, TokenTable, token_table

__all__ = [
    "AutomatonConstraint",
    "ByteAutomaton",
    "CopyAutomaton",
    "CopyBiasProcessor",
    "Grammar",
    "GrammarConstraint",
    "GrammarError",
    "LineLimitProcessor",
    "NumberListAutomaton",
    "TokenTable",
    "TokenizerLike",
    "token_table",
]
