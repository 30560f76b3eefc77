"""Few-shot examples for ShopBench prompts, chosen by a protocol that never shows a question its own answer.

The pool is a labelled ShopBench file (``--examples``). For a question, the candidates are the pool's
records routed to the same task type whose prompt is not the question's own (compared with whitespace runs
collapsed): evaluating the pool itself is therefore leave-one-out, and the report says so. Among the
candidates, those that share the question's instructions come first: ShopBench prompts of one task
start with the same template, so the longest common prefix (in characters) ranks them, then the share
of the question's words they contain, then their line number (deterministic). The chosen examples go
into the dialog as earlier user/assistant turns, each answer written as the official parser reads it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .data import Question
from .router import route

__all__ = ["ExamplePool", "few_shot_protocol", "gold_answer"]

_WORD = re.compile(r"\w+")


def gold_answer(question: Question) -> str:
    """The record's answer written the way the official parser of its task type reads it."""
    truth, kind = question.truth, question.task_type
    if kind == "multiple-choice" or kind is None:
        return str(truth)
    if kind == "retrieval":
        return ",".join(str(n) for n in truth)
    if kind == "ranking":
        # truth[k-1] is item k's relevance: the best answer lists the items by relevance, ties in label order.
        return ",".join(str(k + 1) for k in sorted(range(len(truth)), key=lambda k: (-truth[k], k)))
    if kind == "named_entity_recognition":
        return ", ".join(truth)
    return truth if isinstance(truth, str) else truth[0]


def _key(prompt: str) -> str:
    """What "the same question" means: the prompt with its whitespace runs collapsed (CRLF, spacing)."""
    return " ".join(prompt.split())


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class _Example:
    question: Question
    key: str  # the prompt, whitespace collapsed: what "the same question" means
    task_type: str
    words: frozenset[str]


class ExamplePool:
    """Labelled records to draw few-shot examples from (unlabelled ones are ignored)."""

    def __init__(self, questions: Sequence[Question]) -> None:
        self.examples = [
            _Example(q, _key(q.prompt), q.task_type or route(q.prompt, q.is_multiple_choice).task_type,
                     frozenset(w.lower() for w in _WORD.findall(q.prompt)))
            for q in questions if q.labelled
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def pick(self, prompt: str, task_type: str, k: int) -> list[Question]:
        """Up to ``k`` examples of routed type ``task_type`` for ``prompt``, never the prompt itself."""
        if k <= 0:
            return []
        key = _key(prompt)
        words = frozenset(w.lower() for w in _WORD.findall(prompt))
        candidates = [e for e in self.examples if e.task_type == task_type and e.key != key]
        candidates.sort(key=lambda e: (-_common_prefix(e.key, key), -len(e.words & words) / max(len(words), 1),
                                       e.question.line))
        return [e.question for e in candidates[:k]]

    def contains(self, prompt: str) -> bool:
        """Whether ``prompt`` is one of the pool's own records (its evaluation is then leave-one-out)."""
        key = _key(prompt)
        return any(e.key == key for e in self.examples)


def few_shot_protocol(pool: ExamplePool, prompts: Sequence[str]) -> str:
    """One sentence for the report: how examples were chosen and whether the evaluation is leave-one-out."""
    inside = sum(pool.contains(p) for p in prompts)
    how = ("examples of the same routed task type, the longest shared instruction prefix first, then word "
           "overlap; a question is never shown itself")
    if inside:
        return f"{how}; leave-one-out: {inside} of the {len(prompts)} evaluated questions are in the example pool"
    return f"{how}; the example pool and the evaluated questions are disjoint"
