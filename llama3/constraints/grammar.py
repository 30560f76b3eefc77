"""Grammar-constrained decoding through llguidance: JSON schemas, regular expressions, choices, Lark and
llama.cpp's GBNF, enforced token by token so the output always matches.

:class:`Grammar` is a checked, tokenizer-independent grammar (build it once per request); :class:`GrammarConstraint`
is the per-sequence logits processor that follows it. The vocabulary is handed to llguidance once per tokenizer
(:func:`grammar_tokenizer`) as each token's bytes, so every tokenizer family this engine loads (tiktoken, HF,
GGUF) is constrained the same way. Control tokens are never allowed inside a grammar; the tokenizer's stop tokens
are allowed exactly where the grammar may end.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from ..errors import GenerationError
from .tokens import TokenizerLike


class GrammarError(GenerationError):
    """A grammar, schema or pattern that cannot be enforced (the message names what and why, on one line:
    llguidance's multi-line parser reports are folded so a CLI error or an API message stays one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class _Vocabulary:
    """What llguidance's ``LLTokenizer`` asks of a tokenizer: each id's bytes, the special ids, EOS, encode."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer = tokenizer
        is_special = getattr(tokenizer, "is_special", lambda _id: False)
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(tokenizer.n_words):
            try:
                data = bytes(tokenizer.token_bytes(i))
            except Exception:  # an id the tokenizer cannot render (an unused slot): never allowed
                data = b""
            if i in tokenizer.stop_tokens or is_special(i):
                special.append(i)
                data = data or f"<[{i}]>".encode()
            tokens.append(data)
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = min(tokenizer.stop_tokens)
        self.bos_token_id = getattr(tokenizer, "bos_id", None)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, bos=False, eos=False)


JSON_STYLE: llguidance.JsonCompileOptions = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_LOCK = threading.Lock()
_TOKENIZERS: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: TokenizerLike) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (built once per tokenizer object: a pass over the vocabulary)."""
    with _LOCK:
        found = _TOKENIZERS.get(tokenizer)
        if found is None:
            vocabulary = _Vocabulary(tokenizer)
            found = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocabulary),
                n_vocab=tokenizer.n_words,
                eos_token=sorted(tokenizer.stop_tokens),
            )
            _TOKENIZERS[tokenizer] = found
        return found


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form, checked when built. ``kind`` says where it came from
    ("json_schema", "json_object", "regex", "choice", "lark", "gbnf") for messages and metrics."""

    kind: str
    spec: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> Grammar:
        """JSON matching ``schema`` (JSON Schema's meaning: unlisted properties are allowed unless
        ``additionalProperties`` says no). A keyword llguidance cannot enforce is an error that names it.

        Written as ``json.dumps`` writes (", " and ": ", no other whitespace): free whitespace lets a small
        model pad forever, and one spelling keeps outputs comparable.
        """
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object or a boolean, not {type(schema).__name__}")
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be enforced: {exc}") from None
        return cls._checked("json_schema", spec)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``json_object`` mode)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text matching the whole of ``pattern`` (Rust regex syntax, no look-around or back-references)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("a regular expression must be a non-empty string")
        try:
            spec = llguidance.LLMatcher.grammar_from_regex(pattern)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the regular expression cannot be enforced: {exc}") from None
        return cls._checked("regex", spec)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        """Exactly one of ``options``."""
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("choices must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
        return cls.lark(lark, kind="choice")

    @classmethod
    def lark(cls, grammar: str, *, kind: str = "lark") -> Grammar:
        """llguidance's Lark dialect (``start`` is the start rule; ``%json {...}`` embeds a schema)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("a grammar must be non-empty text")
        try:
            spec = llguidance.LLMatcher.grammar_from_lark(grammar)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the grammar cannot be enforced: {exc}") from None
        return cls._checked(kind, spec)

    @classmethod
    def gbnf(cls, grammar: str) -> Grammar:
        """llama.cpp's GBNF (``root ::= ...``), as llama.cpp's server and ``--grammar`` take it."""
        from llguidance.gbnf_to_lark import gbnf_to_lark

        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("a grammar must be non-empty text")
        try:
            lark = gbnf_to_lark(grammar)
        except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions on bad input
            raise GrammarError(f"the GBNF grammar cannot be read: {exc}") from None
        return cls.lark(lark, kind="gbnf")

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> Grammar | None:
        """The grammar of OpenAI's ``response_format`` (None for ``{"type": "text"}`` or no format).

        ``{"type": "json_object"}`` is any JSON object; ``{"type": "json_schema", "json_schema": {"schema": ...,
        "name": ..., "strict": ...}}`` is JSON matching the schema (enforced whatever ``strict`` says). As in
        llama.cpp's server, ``{"type": "json_object", "schema": ...}`` is accepted too.
        """
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise GrammarError("response_format must be an object such as {\"type\": \"json_object\"}")
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = response_format.get("schema")
            return cls.json_object() if schema is None else cls.json_schema(schema)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise GrammarError('response_format of type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
            schema = spec.get("schema")
            return cls.json_object() if schema is None else cls.json_schema(schema)
        raise GrammarError(f'response_format type {kind!r} is not supported (use "text", "json_object" or "json_schema")')

    @classmethod
    def _checked(cls, kind: str, spec: str) -> Grammar:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec)
        if failed:
            raise GrammarError(f"the {kind.replace('_', ' ')} cannot be enforced: {'; '.join(messages)}")
        return cls(kind, spec)


# Budget-aware closing: within this many tokens of max_tokens, the constraint estimates how many tokens the
# shortest way out of the grammar takes and, once that no longer fits with a small margin, allows only tokens
# that close what is open wherever the grammar allows any, in this order of preference: a quote first (inside a
# string only a quote closes it, while a bracket there is just text), then a closing bracket, then a comma (the
# way to an object's remaining keys), then a lone zero (the shortest number). Without it a small model that
# repeats itself inside a string, a number or an array is cut mid-JSON by max_tokens.
CLOSING_HORIZON = 64
CLOSING_MARGIN = 2
# Closing checks each allowed token exactly (a walk of up to ``remaining`` masks each) while candidates x remaining
# stays under this bound (a choice, a digit near the end); beyond it, it steers by token class.
EXACT_CLOSING_WORK = 128


def _closing_class(data: bytes, rank: int) -> bool:
    if not data:
        return False
    if rank == 0:
        return data[:1] == b'"' and set(data) <= set(b'"]}')
    if rank == 1:
        return set(data) <= set(b"]}")
    return data == (b"," if rank == 2 else b"0")


class _TokenFacts:
    """Per-tokenizer arrays the closing search needs: the closing classes of each token, and its length."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        vocabulary = _Vocabulary(tokenizer)
        special = set(vocabulary.special_token_ids)
        self.length = np.array([0 if i in special else len(b) for i, b in enumerate(vocabulary.tokens)], dtype=np.int32)
        self.classes = [
            np.array([i not in special and _closing_class(b, rank) for i, b in enumerate(vocabulary.tokens)], dtype=np.bool_)
            for rank in range(4)
        ]

    def closing(self, allowed: np.ndarray) -> np.ndarray | None:
        """The allowed tokens of the first closing class that has any, or None."""
        for members in self.classes:
            chosen = allowed & members
            if chosen.any():
                return chosen
        return None


_FACTS: weakref.WeakKeyDictionary[Any, _TokenFacts] = weakref.WeakKeyDictionary()


def _token_facts(tokenizer: TokenizerLike) -> _TokenFacts:
    with _LOCK:
        found = _FACTS.get(tokenizer)
        if found is None:
            found = _FACTS[tokenizer] = _TokenFacts(tokenizer)
        return found


class GrammarConstraint:
    """Allows only the tokens the grammar accepts next, and the stop tokens where it may end; near the end of
    the token budget it steers toward the shortest way to finish (see ``CLOSING_HORIZON``). One per sequence:
    it follows that sequence's output."""

    def __init__(self, grammar: Grammar, tokenizer: TokenizerLike) -> None:
        self.grammar = grammar
        self._vocab = tokenizer.n_words
        self._stops = sorted(tokenizer.stop_tokens)
        self._tokenizer = tokenizer
        self._facts: _TokenFacts | None = None
        self._matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer), grammar.spec, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the {grammar.kind} cannot be enforced: {self._matcher.get_error()}")
        self._consumed = 0

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self._matcher.is_stopped()

    def _allowed(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        if matcher.is_stopped():
            allowed = np.zeros(self._vocab, dtype=np.bool_)
            allowed[self._stops] = True
            return allowed
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if matcher.is_error():
            raise GrammarError(f"the {self.grammar.kind} failed: {matcher.get_error()}")
        return bits[: self._vocab].astype(np.bool_)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar accepts next (stop tokens where it may end)."""
        return torch.from_numpy(self._allowed(self._matcher))

    def tokens_to_finish(self, limit: int, matcher: llguidance.LLMatcher | None = None) -> int:
        """Tokens a greedy closing walk needs before a stop token is allowed (``limit + 1`` if more than
        ``limit``): at each step the longest token of the first closing class allowed, else the longest allowed."""
        facts = self._facts = self._facts or _token_facts(self._tokenizer)
        matcher = (matcher or self._matcher).deep_copy()
        for steps in range(limit + 1):
            if matcher.is_stopped() or matcher.is_accepting():
                return steps
            allowed = self._allowed(matcher)
            choice = facts.closing(allowed)
            lengths = np.where(allowed if choice is None else choice, facts.length, 0)
            if not lengths.any():
                return limit + 1
            matcher.consume_token(int(lengths.argmax()))
        return limit + 1

    def _finishing(self, allowed: np.ndarray, remaining: int) -> np.ndarray:
        """The allowed tokens after which the grammar can still end (by the closing walk) with room for the stop
        token within ``remaining`` tokens."""
        keep = np.zeros_like(allowed)
        for token in np.flatnonzero(allowed).tolist():
            matcher = self._matcher.deep_copy()
            if matcher.consume_token(token) and self.tokens_to_finish(remaining - 2, matcher) <= remaining - 2:
                keep[token] = True
        return keep

    def _closing_choice(self, allowed: np.ndarray, limit: int) -> np.ndarray | None:
        """Of the closing classes allowed now, the one whose longest token leads to the quickest finish (a
        quote closes a string but opens a key where a brace would close the object: one step of lookahead)."""
        facts = self._facts = self._facts or _token_facts(self._tokenizer)
        best, best_steps = None, limit + 2
        for members in facts.classes:
            chosen = allowed & members
            if not chosen.any():
                continue
            matcher = self._matcher.deep_copy()
            matcher.consume_token(int(np.where(chosen, facts.length, 0).argmax()))
            steps = 1 + self.tokens_to_finish(limit, matcher)
            if steps < best_steps:
                best, best_steps = chosen, steps
        return best

    def __call__(self, generated: Sequence[int], logits: torch.Tensor, remaining: int | None = None) -> torch.Tensor:
        """Mask ``logits`` (V,) in place to what may follow ``generated``; ``remaining`` is the token budget
        left (None: unlimited), which switches on closing near the end."""
        for token in generated[self._consumed :]:
            if not self._matcher.consume_token(token):
                raise GrammarError(f"token {token} breaks the {self.grammar.kind}: {self._matcher.get_error()}")
        self._consumed = len(generated)
        allowed = self._allowed(self._matcher)
        # An accepting grammar may simply stop (or run to the budget, reported as "length"): nothing to close.
        if remaining is not None and remaining <= CLOSING_HORIZON and not self._matcher.is_accepting():
            # The stop token itself must fit too: finishing in remaining - 1 tokens leaves one step for it.
            if self.tokens_to_finish(remaining) + CLOSING_MARGIN >= remaining - 1:
                # Few candidates (a choice, a digit): keep exactly those that can still finish in time, so the
                # model's preference among them stands. Many (inside a string or a number): steer by class.
                if int(allowed.sum()) * remaining <= EXACT_CLOSING_WORK:
                    finishing = self._finishing(allowed, remaining)
                    if finishing.any():
                        allowed = finishing
                else:
                    closing = self._closing_choice(allowed, remaining)
                    if closing is not None:
                        allowed = closing
        logits[self._vocab :] = -torch.inf  # padded embedding rows are never real tokens
        logits[: self._vocab].masked_fill_(torch.from_numpy(~allowed).to(logits.device), -torch.inf)
        return logits
