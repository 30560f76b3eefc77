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
from .predictor import SCORINGS, Recipe
from .router import TASK_TYPES

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
    defaults = Recipe()
    parser.add_argument("--choice", choices=SCORINGS, default=defaults.choice,
                        help="multiple-choice answers: constrained generation, or the log-likelihood of each option's "
                             f"label, text (summed) or text-mean (per token) (default {defaults.choice})")
    parser.add_argument("--lists", choices=SCORINGS, default=defaults.lists,
                        help=f"ranking and retrieval answers, the same ways (default {defaults.lists})")
    parser.add_argument("--entities", choices=("generate", "spans"), default=defaults.entities,
                        help="NER answers: phrases copied under a constraint, or the most likely run of 1-3 words of "
                             f"the query (default {defaults.entities})")
    parser.add_argument("--cot", default=",".join(sorted(defaults.cot)) or "none", metavar="TYPES",
                        help="task types answered after a chain of thought: comma-separated among "
                             f"{', '.join(TASK_TYPES)}, 'all' or 'none' (default {','.join(sorted(defaults.cot)) or 'none'})")
    parser.add_argument("--cot-tokens", type=int, default=defaults.cot_tokens,
                        help=f"most reasoning tokens before the answer (default {defaults.cot_tokens})")
    parser.add_argument("--shots", type=int, default=defaults.shots,
                        help=f"few-shot examples per question, from --examples (default {defaults.shots})")
    parser.add_argument("--examples", type=Path, default=None,
                        help="labelled ShopBench records to draw few-shot examples from (default: the evaluated file, "
                             "leave-one-out: a question is never shown itself)")
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
    recipe = report.get("settings", {}).get("recipe")
    if recipe:
        lines.append(f"recipe: multiple-choice {recipe['choice']}, ranking/retrieval {recipe['lists']}, "
                     f"NER {recipe['entities']}, "
                     f"chain of thought {','.join(recipe['cot']) or 'none'}"
                     + (f" ({recipe['cot_tokens']} tokens)" if recipe["cot"] else "") + f", {recipe['shots']} shots")
    examples = report.get("settings", {}).get("examples")
    if examples:
        lines.append(f"few-shot examples from {examples['source']}: {examples['protocol']}")
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


def recipe_from(args: argparse.Namespace) -> Recipe:
    """The answering recipe of ``args``; ValueError names a bad option."""
    names = [t.strip() for t in args.cot.split(",") if t.strip()]
    cot = frozenset(TASK_TYPES) if names == ["all"] else frozenset() if names in ([], ["none"]) else frozenset(names)
    if not cot <= set(TASK_TYPES):
        raise ValueError(f"--cot: unknown task type(s) {', '.join(sorted(cot - set(TASK_TYPES)))} "
                         f"(expected {', '.join(TASK_TYPES)}, all or none)")
    return Recipe(choice=args.choice, lists=args.lists, entities=args.entities, cot=cot, cot_tokens=args.cot_tokens,
                  shots=args.shots)


def run(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Run the evaluation described by ``args``; returns the process exit status."""
    from .examples import ExamplePool, few_shot_protocol
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
    try:
        recipe = recipe_from(args)
    except ValueError as e:
        print(f"error: {e}", file=err)
        return 2
    pool = None
    if recipe.shots:
        source = args.examples or args.data
        try:
            pool = ExamplePool(loaded.questions if source == args.data else load_questions(source).questions)
        except Llama3Error as e:
            print(f"error: --examples: {e}", file=err)
            return 2
        if not len(pool):
            print(f"error: --shots {recipe.shots} needs labelled records in {source}", file=err)
            return 2
    max_new = {"generation": args.max_gen_len, "named_entity_recognition": args.max_gen_len} if args.max_gen_len else None
    constrain = not args.no_constrain
    try:
        llm = load_llm(args)
        try:
            model = ShopBenchModel(llm, batch_size=args.batch_size, constrain=constrain, repair=not args.no_repair,
                                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new,
                                   recipe=recipe, examples=pool)
        except ValueError as e:
            print(f"error: {e}", file=err)
            return 2
        evaluation = evaluate(model, questions, scorer=Scorer(), progress=not args.no_progress)
    except Llama3Error as e:
        print(f"error: {e}", file=err)
        return 1
    settings = {"data": str(args.data), "model": args.model or "default (SmolLM2-135M-Instruct Q4_1)",
                "batch_size": args.batch_size, "constrain": constrain, "repair": not args.no_repair,
                "temperature": args.temperature, "top_p": args.top_p, "max_seq_len": model.llm.max_seq_len,
                "limit": args.limit, "recipe": model.recipe.as_dict(),
                "examples": None if pool is None else {
                    "source": str(args.examples or args.data),
                    "protocol": few_shot_protocol(pool, [q.prompt for q in questions])}}
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
