"""Route a ShopBench prompt to a task type from its text alone (the hidden test set has no labels).

The router also pulls out what the constraints need: the option numbers of a multiple-choice
question, the numbered list of a ranking/retrieval question and how many items to pick, and the
query of an extraction question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TASK_TYPES", "Route", "numbered_items", "numbered_lines", "route"]

MULTIPLE_CHOICE = "multiple-choice"
RETRIEVAL = "retrieval"
RANKING = "ranking"
NER = "named_entity_recognition"
GENERATION = "generation"
TASK_TYPES: tuple[str, ...] = (MULTIPLE_CHOICE, RETRIEVAL, RANKING, NER, GENERATION)

# "3. foo", "10.bar", "2) baz" at the start of a line; the number is an option/item label.
_ITEM = re.compile(r"^[ \t]*(\d{1,3})[.)][ \t]*(\S.*)$", re.MULTILINE)
_WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10}
_NUM = r"(\d+|one|two|three|four|five|six|seven|eight|nine|ten)"
# "output three numbers", "select 3 snippets", "choose three aspects", "Select three from the list".
_PICK = re.compile(rf"\b(?:output|select|choose|pick|recommend|return)\s+(?:only\s+|exactly\s+|the\s+top\s+)?{_NUM}\b",
                   re.IGNORECASE)
_RANK = re.compile(r"\brank(?:ing|ed)?\b|\bpermutation\b|\bre-?order\b|\bsort\b", re.IGNORECASE)
_NER = re.compile(r"\bentity type\b|\bentities\b|\bnamed entit", re.IGNORECASE)
_SCALE = re.compile(r"\bscale of (\d) to (\d)\b", re.IGNORECASE)
_SOURCE_LINE = re.compile(r"^(?:Query|Input|Text|Sentence|Product|Title|Review)\s*:[ \t]*(\S.*)$",
                          re.IGNORECASE | re.MULTILINE)
_EXTRACT = re.compile(r"\bextract\b", re.IGNORECASE)


@dataclass(frozen=True)
class Route:
    """Where a prompt goes and what its answer may be."""

    task_type: str
    options: tuple[int, ...] = ()  # MC: the single-digit option labels offered
    items: tuple[int, ...] = ()  # ranking/retrieval: the labels of the numbered list
    pick: int | None = None  # retrieval: how many items to output
    source: str | None = None  # NER / extractive generation: the text the answer is copied from
    texts: tuple[str, ...] = ()  # the text of each option (MC) or item (ranking/retrieval) when the prompt lists it


def numbered_lines(prompt: str) -> tuple[tuple[int, str], ...]:
    """(label, text) of the last consecutively numbered block of lines (``0.``/``1.`` upwards) in ``prompt``."""
    blocks: list[list[tuple[int, str]]] = []
    for m in _ITEM.finditer(prompt):
        n, text = int(m.group(1)), m.group(2).strip()
        if blocks and n == blocks[-1][-1][0] + 1:
            blocks[-1].append((n, text))
        elif n in (0, 1):
            blocks.append([(n, text)])
    return tuple(blocks[-1]) if blocks else ()


def numbered_items(prompt: str) -> tuple[int, ...]:
    """Labels of the last consecutively numbered block of lines (``0.``/``1.`` upwards) in ``prompt``."""
    return tuple(n for n, _ in numbered_lines(prompt))


def _pick_count(prompt: str) -> int | None:
    for m in _PICK.finditer(prompt):
        word = m.group(1).lower()
        n = int(word) if word.isdigit() else _WORD_NUMBERS[word]
        if n >= 1:
            return n
    return None


def _source_text(prompt: str) -> str | None:
    """The text an extraction answer is copied from: the last ``Query:``/``Review:``-like line with text."""
    found = _SOURCE_LINE.findall(prompt)
    return found[-1].strip() if found else None


def route(prompt: str, is_multiple_choice: bool) -> Route:
    """Decide the task type of ``prompt`` and collect the answer's shape.

    Multiple-choice comes from the flag. Otherwise a numbered list with an order word ("rank",
    "permutation") is ranking; a numbered list with "output/select N" or more than five items is
    retrieval; an "entity type" question is NER; anything else is generation (the safe default:
    free text is parsed and scored leniently). An extraction question ("extract ... from the
    review") keeps the labelled text it refers to as ``source``.
    """
    lines = numbered_lines(prompt)
    items = tuple(n for n, _ in lines)
    if is_multiple_choice:
        options = tuple(n for n in items if n <= 9)
        texts = tuple(text for n, text in lines if n <= 9)
        if not options:
            scale = _SCALE.search(prompt)
            lo, hi = (int(scale.group(1)), int(scale.group(2))) if scale else (0, 9)
            options = tuple(range(min(lo, hi), max(lo, hi) + 1))
        return Route(MULTIPLE_CHOICE, options=options, texts=texts)
    # A ranking/retrieval list has items labelled from 1 (a list from 0 is an option list).
    listed = items if items and items[0] == 1 and len(items) >= 2 else ()
    texts = tuple(text for _, text in lines) if listed else ()
    if listed:
        if _RANK.search(prompt):
            return Route(RANKING, items=listed, texts=texts)
        pick = _pick_count(prompt)
        if pick is not None and pick < len(listed):
            return Route(RETRIEVAL, items=listed, pick=pick, texts=texts)
        if len(listed) > 5:
            return Route(RETRIEVAL, items=listed, pick=3, texts=texts)
    if _NER.search(prompt):
        return Route(NER, source=_source_text(prompt) or prompt.strip())
    if listed and len(listed) <= 5:
        return Route(RANKING, items=listed, texts=texts)
    # "Extract the keyphrase from the review": a generation answer copied from the labelled text.
    return Route(GENERATION, source=_source_text(prompt) if _EXTRACT.search(prompt) else None)
