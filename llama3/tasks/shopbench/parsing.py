"""The official ShopBench response parsers, and the seed's regex repairs used when decoding is unconstrained.

Parsers turn a model's response string into the structure a metric scores; they reproduce the
official kit's behaviour, quirks included (a non-digit first character is answer -1; any
duplicate empties a ranking). Repairs rewrite a free-form response *before* parsing so that the
official parser can read it: they are the seed's post-processing, the fallback of
``--no-constrain``.
"""

from __future__ import annotations

import ast
import re
from typing import Any

__all__ = [
    "MAX_RESPONSE_CHARS",
    "parse_generation",
    "parse_multiple_choice",
    "parse_ner",
    "parse_ranking",
    "parse_response",
    "parse_retrieval",
    "repair_response",
]

MAX_RESPONSE_CHARS = 5000  # the official evaluator cuts every response to this length


def parse_multiple_choice(response: str) -> int:
    """``int`` of the first non-space character; -1 when that fails (non-digit or empty)."""
    try:
        return int(response.strip()[0])
    except (ValueError, IndexError):
        return -1


def _numbers(response: str) -> list[int]:
    # Keep digits, commas and spaces, split on commas; a field that is not one integer is dropped
    # (so "1 2" is dropped whole, as int() refuses it).
    cleaned = "".join(c for c in response if c.isnumeric() or c in ", ")
    out: list[int] = []
    for field in cleaned.split(","):
        try:
            out.append(int(field))
        except ValueError:
            pass
    return out


def parse_ranking(response: str) -> list[int]:
    """Ranked item labels: numbers <= 5, first five; any duplicate empties the list."""
    ranked = [n for n in _numbers(response) if n <= 5][:5]
    return ranked if len(ranked) == len(set(ranked)) else []


def parse_retrieval(response: str) -> list[int]:
    """Retrieved item labels: the first three numbers (no bound, duplicates kept)."""
    return _numbers(response)[:3]


def parse_ner(response: str) -> list[str]:
    """A Python list literal of strings if the response is one, else the comma-separated non-empty fields."""
    try:
        value = ast.literal_eval(response)
    except Exception:  # literal_eval raises SyntaxError, ValueError, TypeError, MemoryError, RecursionError...
        value = None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return [f.strip() for f in response.split(",") if f.strip()]


def parse_generation(response: str) -> str:
    """The response without surrounding whitespace."""
    return response.strip()


_PARSERS = {
    "multiple-choice": parse_multiple_choice,
    "ranking": parse_ranking,
    "retrieval": parse_retrieval,
    "named_entity_recognition": parse_ner,
    "generation": parse_generation,
}


def parse_response(task_type: str, response: str) -> Any:
    """Parse ``response`` (cut to 5,000 characters) with the official parser of ``task_type``.

    An unknown task type is parsed as generation.
    """
    return _PARSERS.get(task_type, parse_generation)(response[:MAX_RESPONSE_CHARS])


# ---------------------------------------------------------------------------------------------
# The seed's post-processing (find_first_digit / create_consecutive_digits_str / process_string)


def _first_digit(response: str) -> str:
    m = re.search(r"\d", response)
    return m.group(0) if m else response


def _permutation(response: str, n_items: int) -> str:
    # Labels in the order the model wrote them, each once, out-of-range ones dropped; the labels it
    # forgot are appended in order so the result is always a full permutation.
    seen: list[int] = []
    for tok in re.findall(r"\d+", response):
        k = int(tok)
        if 1 <= k <= n_items and k not in seen:
            seen.append(k)
    seen += [k for k in range(1, n_items + 1) if k not in seen]
    return ",".join(map(str, seen))


def _first_distinct(response: str, pick: int, n_items: int | None) -> str:
    seen: list[int] = []
    for tok in re.findall(r"\d+", response):
        k = int(tok)
        if (n_items is None or 1 <= k <= n_items) and k not in seen:
            seen.append(k)
        if len(seen) == pick:
            break
    return ",".join(map(str, seen)) if seen else response


def repair_response(task_type: str, response: str, *, n_items: int | None = None, pick: int = 3) -> str:
    """The seed's regex post-processing of a free-form response, per routed task type.

    multiple-choice: the first digit anywhere; ranking: a permutation of 1..n_items in the order
    the labels first appear (missing ones appended); retrieval: the first ``pick`` distinct labels;
    NER and generation: stripped only.
    """
    if task_type == "multiple-choice":
        return _first_digit(response)
    if task_type == "ranking":
        return _permutation(response, n_items or 5)
    if task_type == "retrieval":
        return _first_distinct(response, pick, n_items)
    return response.strip()
