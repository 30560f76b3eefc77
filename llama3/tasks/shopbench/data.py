"""Load ShopBench records (JSON Lines) and check each one; bad lines are reported and skipped."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import Llama3Error
from .metrics import METRICS
from .router import TASK_TYPES

__all__ = ["LineProblem", "Question", "load_questions", "parse_record"]

TRACK_PREFIX = "amazon-kdd-cup-24-"


@dataclass(frozen=True)
class Question:
    """One benchmark question. Labels (task, metric, truth) are None for the hidden test format."""

    line: int  # 1-based line number in the source file
    prompt: str
    is_multiple_choice: bool
    task_name: str | None = None
    task_type: str | None = None
    metric: str | None = None
    track: str | None = None
    truth: Any = None

    @property
    def prompt_id(self) -> str:
        """Stable id of the prompt text: the first 12 hex digits of its SHA-1."""
        return hashlib.sha1(self.prompt.encode("utf-8")).hexdigest()[:12]

    @property
    def labelled(self) -> bool:
        return self.task_name is not None and self.metric is not None and self.truth is not None


@dataclass(frozen=True)
class LineProblem:
    line: int
    message: str


@dataclass
class LoadResult:
    questions: list[Question] = field(default_factory=list)
    problems: list[LineProblem] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_truth(task_type: str, truth: Any) -> str | None:
    """Why ``truth`` cannot be scored for ``task_type``, or None when it can."""
    if task_type == "multiple-choice":
        ok = _is_int(truth)
        want = "an integer"
    elif task_type == "retrieval":
        ok = isinstance(truth, list) and bool(truth) and all(_is_int(v) for v in truth)
        want = "a non-empty list of integers"
    elif task_type == "ranking":
        ok = (isinstance(truth, list) and bool(truth)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in truth))
        want = "a non-empty list of numbers"
    elif task_type == "named_entity_recognition":
        ok = isinstance(truth, list) and all(isinstance(v, str) for v in truth)
        want = "a list of strings"
    else:  # generation: a string, or a list of reference strings for the embedding metrics
        ok = isinstance(truth, str) or (isinstance(truth, list) and bool(truth) and all(isinstance(v, str) for v in truth))
        want = "a string"
    return None if ok else f"output_field must be {want} for task_type {task_type!r}, got {truth!r:.80}"


def parse_record(obj: Any, line: int) -> Question:
    """Validate one decoded JSON value; raises ValueError naming the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("input_field")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("input_field is missing or not a non-empty string")
    mc = obj.get("is_multiple_choice")
    if not isinstance(mc, bool):
        raise ValueError(f"is_multiple_choice must be true or false, got {mc!r}")
    task_type = obj.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"unknown task_type {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
    metric = obj.get("metric")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
    for key in ("task_name", "track"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ValueError(f"{key} must be a string, got {obj[key]!r}")
    truth = obj.get("output_field")
    if truth is not None:
        if task_type is None:
            raise ValueError("output_field is given without a task_type")
        problem = _check_truth(task_type, truth)
        if problem:
            raise ValueError(problem)
    return Question(line=line, prompt=prompt, is_multiple_choice=mc, task_name=obj.get("task_name"),
                    task_type=task_type, metric=metric, track=obj.get("track"), truth=truth)


def load_questions(path: str | Path) -> LoadResult:
    """Read a JSON Lines file of ShopBench records.

    Blank lines are ignored; a line that is not valid JSON or not a valid record is reported as a
    :class:`LineProblem` (with its line number) and skipped. A missing, unreadable or empty file,
    or one without a single valid record, raises :class:`~llama3.errors.Llama3Error`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Llama3Error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Llama3Error(f"{path}: cannot read: {e}") from None
    result = LoadResult()
    seen_any = False
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        seen_any = True
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            result.problems.append(LineProblem(number, f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        try:
            result.questions.append(parse_record(obj, number))
        except ValueError as e:
            result.problems.append(LineProblem(number, str(e)))
    if not seen_any:
        raise Llama3Error(f"{path}: the file is empty (expected one JSON record per line)")
    if not result.questions:
        first = result.problems[0]
        raise Llama3Error(f"{path}: no valid record in {len(result.problems)} line(s); "
                          f"line {first.line}: {first.message}")
    return result
