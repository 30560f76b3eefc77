"""Evaluate a :class:`ShopBenchModel` on ShopBench questions: generate, parse, score, aggregate, report.

Aggregation follows the official kit: the mean score within each task (micro-F1 over the task for
NER), the unweighted mean of the tasks of a track, and the all-round score as the mean of the
tracks. Records whose metric is unavailable here are left out of every aggregate, and the report
says so.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .data import TRACK_PREFIX, LineProblem, Question
from .metrics import Scorer, micro_f1
from .parsing import parse_response
from .predictor import Prediction, ShopBenchModel

__all__ = ["QuestionResult", "aggregate", "build_report", "evaluate", "routing_summary"]


@dataclass
class QuestionResult:
    question: Question
    prediction: Prediction
    parsed: Any = None
    score: float | tuple[int, int, int] | None = None  # None: unlabelled, or metric unavailable
    unavailable: str | None = None


@dataclass
class Throughput:
    questions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {"questions": self.questions, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3),
                "questions_per_s": self.questions / s, "generated_tokens_per_s": self.generated_tokens / s,
                "total_tokens_per_s": (self.prompt_tokens + self.generated_tokens) / s}


@dataclass
class Evaluation:
    results: list[QuestionResult]
    throughput: Throughput
    unavailable: dict[str, str] = field(default_factory=dict)


def evaluate(model: ShopBenchModel, questions: list[Question], *, scorer: Scorer | None = None,
             progress: bool = True) -> Evaluation:
    """Answer every question in batches (with a tqdm bar), then parse and score the labelled ones."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(questions), unit="q", desc="shopbench", disable=not progress)
    stats = Throughput()
    start = time.perf_counter()

    def on_batch(n_questions: int, n_tokens: int) -> None:
        stats.generated_tokens += n_tokens
        bar.update(n_questions)
        bar.set_postfix(tok_s=f"{stats.generated_tokens / max(time.perf_counter() - start, 1e-9):.1f}")

    try:
        predictions = model.run([q.prompt for q in questions], [q.is_multiple_choice for q in questions], on_batch)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    stats.questions = len(questions)
    stats.prompt_tokens = sum(p.prompt_tokens for p in predictions)
    stats.generated_tokens = sum(p.generated_tokens for p in predictions)
    return score_predictions(questions, predictions, scorer or Scorer(), stats)


def score_predictions(questions: list[Question], predictions: list[Prediction], scorer: Scorer,
                      stats: Throughput | None = None) -> Evaluation:
    """Parse each response with the official parser of the question's true type and score it."""
    results: list[QuestionResult] = []
    unavailable: dict[str, str] = {}
    for q, p in zip(questions, predictions):
        task_type = q.task_type or p.route.task_type  # the evaluator parses by the true type when known
        r = QuestionResult(q, p, parse_response(task_type, p.response))
        if q.labelled:
            reason = scorer.unavailable(q.metric)  # type: ignore[arg-type]
            if reason is None:
                r.score = scorer.score(q.metric, r.parsed, q.truth)  # type: ignore[arg-type]
            else:
                r.unavailable = unavailable[q.metric] = reason  # type: ignore[index]
        results.append(r)
    return Evaluation(results, stats or Throughput(questions=len(results)), unavailable)


def _short_track(track: str | None) -> str:
    return (track or "unknown")[len(TRACK_PREFIX):] if (track or "").startswith(TRACK_PREFIX) else (track or "unknown")


def aggregate(results: list[QuestionResult]) -> dict[str, Any]:
    """Per-task, per-track and overall scores of the scored results, with notes on what was left out."""
    by_task: dict[str, list[QuestionResult]] = defaultdict(list)
    for r in results:
        if r.question.labelled:
            by_task[r.question.task_name].append(r)  # type: ignore[index]
    tasks: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in sorted(by_task, key=lambda n: (len(n), n)):  # task1, task2, ..., task10
        rs = by_task[name]
        scored = [r for r in rs if r.score is not None]
        metrics = sorted({r.question.metric for r in rs}, key=lambda m: [x.question.metric for x in rs].index(m))
        excluded = Counter(r.question.metric for r in rs if r.unavailable)
        for metric, n in excluded.items():
            notes.append(f"{name}: {n} record(s) scored with {metric} left out (unavailable)")
        if not scored:
            score = None
            notes.append(f"{name}: no scorable record; task left out of its track")
        elif all(isinstance(r.score, tuple) for r in scored):
            score = micro_f1([r.score for r in scored])  # type: ignore[misc]
        else:
            score = sum(float(r.score) for r in scored) / len(scored)  # type: ignore[arg-type]
        tasks.append({"task": name, "track": _short_track(rs[0].question.track), "task_type": rs[0].question.task_type,
                      "metric": "+".join(metrics), "count": len(rs), "scored": len(scored), "score": score})
    tracks: dict[str, list[float]] = defaultdict(list)
    for t in tasks:
        if t["score"] is not None:
            tracks[t["track"]].append(t["score"])
    track_rows = [{"track": k, "tasks": len(v), "score": sum(v) / len(v)} for k, v in sorted(tracks.items())]
    overall = sum(t["score"] for t in track_rows) / len(track_rows) if track_rows else None
    if track_rows and len(track_rows) != 4:
        notes.append(f"overall score is the mean of {len(track_rows)} track(s), not the official 4")
    return {"tasks": tasks, "tracks": track_rows, "overall": overall, "notes": notes}


def routing_summary(results: list[QuestionResult]) -> dict[str, Any]:
    """Routing accuracy against the records' ``task_type`` (when labelled) and the routed-type counts."""
    known = [r for r in results if r.question.task_type is not None]
    mistakes = [{"line": r.question.line, "task_name": r.question.task_name, "task_type": r.question.task_type,
                 "routed_type": r.prediction.route.task_type}
                for r in known if r.prediction.route.task_type != r.question.task_type]
    return {"accuracy": (len(known) - len(mistakes)) / len(known) if known else None,
            "correct": len(known) - len(mistakes), "total": len(known), "mistakes": mistakes,
            "routed": dict(Counter(r.prediction.route.task_type for r in results))}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _question_row(r: QuestionResult) -> dict[str, Any]:
    q, p = r.question, r.prediction
    row: dict[str, Any] = {"line": q.line, "prompt_id": q.prompt_id, "task_name": q.task_name,
                           "task_type": q.task_type, "routed_type": p.route.task_type, "metric": q.metric,
                           "raw_output": p.raw, "response": p.response, "parsed": _jsonable(r.parsed),
                           "truth": q.truth, "prompt_tokens": p.prompt_tokens,
                           "generated_tokens": p.generated_tokens, "truncated": p.truncated}
    if p.reasoning is not None:
        row["reasoning"] = p.reasoning
    if p.option_scores is not None:
        row["option_scores"] = [round(x, 4) for x in p.option_scores]
    if p.examples:
        row["examples"] = p.examples
    if isinstance(r.score, tuple):
        row["counts"] = {"tp": r.score[0], "fp": r.score[1], "fn": r.score[2]}
        row["score"] = micro_f1([r.score])
    else:
        row["score"] = _jsonable(r.score)
    if r.unavailable:
        row["unavailable"] = r.unavailable
    return row


def build_report(evaluation: Evaluation, *, settings: dict[str, Any] | None = None,
                 problems: list[LineProblem] | None = None) -> dict[str, Any]:
    """The full JSON-serialisable report: settings, skipped lines, routing, scores, throughput, questions."""
    agg = aggregate(evaluation.results)
    return {
        "settings": settings or {},
        "skipped_lines": [{"line": p.line, "message": p.message} for p in problems or []],
        "routing": routing_summary(evaluation.results),
        "tasks": agg["tasks"],
        "tracks": agg["tracks"],
        "overall": agg["overall"],
        "unavailable_metrics": evaluation.unavailable,
        "notes": agg["notes"],
        "throughput": evaluation.throughput.as_dict(),
        "questions": [_question_row(r) for r in evaluation.results],
    }
