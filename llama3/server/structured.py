"""Structured output requests: which grammar a request asks for, from OpenAI's, vLLM's or llama.cpp's fields.

OpenAI's ``response_format``, vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``
and llama.cpp's ``grammar`` (GBNF) and top-level ``json_schema`` all become one ``Grammar`` that every choice
follows while decoding. A request naming two constraints, or one that cannot be enforced, is a 400 naming the
field: a constraint is never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..constraints.grammar import Grammar, GrammarError
from .errors import APIError
from .schemas import SamplingFields


def _guided_json(value: dict[str, Any] | str) -> Grammar:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"guided_json is not valid JSON: {exc}") from None
    return Grammar.json_schema(value)


def _any_grammar(text: str) -> Grammar:
    # vLLM takes GBNF (xgrammar) or Lark (guidance) here; GBNF rules are written with "::=".
    return Grammar.gbnf(text) if "::=" in text else Grammar.lark(text)


BUILDERS: dict[str, Callable[[Any], Grammar | None]] = {
    "response_format": Grammar.from_response_format,
    "guided_json": _guided_json,
    "guided_regex": Grammar.regex,
    "guided_choice": Grammar.choice,
    "guided_grammar": _any_grammar,
    "grammar": Grammar.gbnf,
    "json_schema": Grammar.json_schema,
}


def request_grammar(req: SamplingFields) -> Grammar | None:
    """The grammar ``req`` asks every choice to follow, or None; APIError 400 naming the field otherwise."""
    found: list[tuple[str, Grammar]] = []
    for field, build in BUILDERS.items():
        value = getattr(req, field, None)
        if value is None:
            continue
        try:
            grammar = build(value)
        except GrammarError as exc:
            raise APIError(400, f"{field}: {exc}", param=field) from None
        if grammar is not None:
            found.append((field, grammar))
    if len(found) > 1:
        names = ", ".join(field for field, _ in found)
        raise APIError(400, f"only one output constraint per request, got {names}", param=found[1][0])
    return found[0][1] if found else None
