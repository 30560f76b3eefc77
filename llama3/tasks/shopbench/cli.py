"""``llama3 eval shopbench``: run the ShopBench harness on a JSON Lines file and print/save the report.

The project CLI wires this in with ``add_arguments(subparser)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ...errors import Llama3Error
from .data import load_questions

__all__ = ["add_arguments", "format_report", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval shopbench`` options to ``parser`` (the model options are the project's usual ones)."""
    from ...options import add_model_arguments

    parser.add_argument("data", type=Path, help="ShopBench records, one JSON object per line")
    parser.add_argument("--batch-size", type=int, default=16, help="questions generated together (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--no-constrain", action="store_true",
                        help="free decoding, answers repaired by the seed's regex post-processing")
    parser.add_argument("--no-repair", action="store_true", help="with --no-constrain: score the raw answers")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N valid records")
    parser.add_argument("--max-gen-len", type=int, default=None,
                        help="cap on generated tokens for free-text answers (default 128; NER 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser, max_seq_len=2048)


def load_llm(args: argparse.Namespace) -> Any:
    """The generator for ``args`` (``Llama.build`` through the project CLI's model options)."""
    from ...options import build_llm

    args.max_batch_size = args.batch_size
    return build_llm(args)


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"


def format_report(report: dict[str, Any]) -> str:
    """Tables per task and per track, the overall score, routing accuracy, throughput and notes."""
    lines: list[str] = []
    if report["tasks"]:
        lines.append(f"{'task':<8} {'track':<30} {'type':<25} {'metric':<18} {'count':>5} {'score':>8}")
        for t in report["tasks"]:
            count = f"{t['scored']}/{t['count']}" if t["scored"] != t["count"] else str(t["count"])
            lines.append(f"{t['task']:<8} {t['track']:<30} {t['task_type'] or '?':<25} {t['metric']:<18} "
                         f"{count:>5} {_fmt(t['score']):>8}")
        lines.append("")
        lines.append(f"{'track':<39} {'tasks':>5} {'score':>8}")
        for t in report["tracks"]:
            lines.append(f"{t['track']:<39} {t['tasks']:>5} {_fmt(t['score']):>8}")
        lines.append(f"{'overall':<39} {'':>5} {_fmt(report['overall']):>8}")
        lines.append("")
    routing = report["routing"]
    if routing["accuracy"] is not None:
        lines.append(f"routing accuracy: {routing['accuracy']:.2%} ({routing['correct']}/{routing['total']})")
        for m in routing["mistakes"][:10]:
            lines.append(f"  line {m['line']} ({m['task_name']}): {m['task_type']} routed as {m['routed_type']}")
    lines.append("routed: " + ", ".join(f"{k} {v}" for k, v in sorted(routing["routed"].items())))
    tp = report["throughput"]
    lines.append(f"throughput: {tp['questions']} questions in {tp['seconds']:.1f} s = {tp['questions_per_s']:.2f} "
                 f"questions/s, {tp['generated_tokens_per_s']:.1f} generated tokens/s "
                 f"({tp['total_tokens_per_s']:.1f} tokens/s with prompts)")
    for metric, why in report["unavailable_metrics"].items():
        lines.append(f"note: metric {metric} unavailable: {why}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report["skipped_lines"]:
        lines.append(f"note: {len(report['skipped_lines'])} malformed line(s) skipped")
    return "\n".join(lines)


def run(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Run the evaluation described by ``args``; returns the process exit status."""
    from .harness import build_report, evaluate
    from .metrics import Scorer
    from .predictor import ShopBenchModel

    out = stdout or sys.stdout
    err = sys.stderr
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        print(f"error: --batch-size and --limit must be >= 1 (got {args.batch_size}, {args.limit})", file=err)
        return 2
    try:
        loaded = load_questions(args.data)
    except Llama3Error as e:
        print(f"error: {e}", file=err)
        return 2
    for p in loaded.problems:
        print(f"warning: {args.data}:{p.line}: skipped: {p.message}", file=err)
    questions = loaded.questions[: args.limit] if args.limit is not None else loaded.questions
    max_new = {"generation": args.max_gen_len, "named_entity_recognition": args.max_gen_len} if args.max_gen_len else None
    constrain = not args.no_constrain
    try:
        model = ShopBenchModel(load_llm(args), batch_size=args.batch_size, constrain=constrain,
                               repair=not args.no_repair, temperature=args.temperature, top_p=args.top_p,
                               max_new_tokens=max_new)
        evaluation = evaluate(model, questions, scorer=Scorer(), progress=not args.no_progress)
    except Llama3Error as e:
        print(f"error: {e}", file=err)
        return 1
    settings = {"data": str(args.data), "model": args.model or "default (SmolLM2-135M-Instruct Q4_1)",
                "batch_size": args.batch_size, "constrain": constrain, "repair": not args.no_repair,
                "temperature": args.temperature, "top_p": args.top_p, "max_seq_len": model.llm.max_seq_len,
                "limit": args.limit}
    report = build_report(evaluation, settings=settings, problems=loaded.problems)
    print(format_report(report), file=out)
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"error: cannot write report {args.out}: {e}", file=err)
            return 1
        print(f"report written to {args.out}", file=out)
    return 0
