"""ShopBench answer recipes side by side on one labelled file: scores per track and overall, and time.

    python benchmarks/shopbench_recipes.py ../shared/data/shopbench/development.jsonl [--recipes a,b] [--out R.json]

The model is built once (the default model unless --model); every recipe then answers every question through
``ShopBenchModel`` and the official parsers and metrics (``llama3.tasks.shopbench``), in this process, so the
times compare. Few-shot recipes draw examples from the evaluated file itself, leave-one-out (a question is
never shown itself: ``ExamplePool.pick`` excludes its own prompt); their scores say so. Every recipe is chosen
and scored on the same file: on the 96-question development set, with 4 to 8 questions per task, a difference of
one answer moves a task by 0.12-0.25, so small gaps between recipes are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from llama3.tasks.shopbench import Scorer, ShopBenchModel, build_report, evaluate, load_questions
from llama3.tasks.shopbench.examples import ExamplePool, few_shot_protocol
from llama3.tasks.shopbench.predictor import Recipe

ALL_TYPES = frozenset({"multiple-choice", "ranking", "retrieval", "named_entity_recognition", "generation"})
RECIPES: dict[str, Recipe] = {
    # Constrained decoding everywhere: the harness's answers before option scoring (session 6).
    "generate": Recipe(choice="generate", lists="generate", entities="generate"),
    "label": Recipe(choice="label", lists="label", entities="generate"),
    "text": Recipe(choice="text", lists="text", entities="generate"),
    "text-mean": Recipe(choice="text-mean", lists="text-mean", entities="generate"),
    "text/generate": Recipe(choice="text", lists="generate", entities="generate"),
    "spans": Recipe(choice="text", lists="generate", entities="spans"),
    "cot-mc": Recipe(choice="generate", lists="generate", entities="generate", cot=frozenset({"multiple-choice"})),
    "cot-all": Recipe(choice="generate", lists="generate", entities="generate", cot=ALL_TYPES),
    "cot-text": Recipe(choice="text", lists="generate", entities="spans", cot=ALL_TYPES),
    "2-shot": Recipe(choice="generate", lists="generate", entities="generate", shots=2),
    "2-shot-spans": Recipe(choice="text", lists="generate", entities="spans", shots=2),
    "default": Recipe(),
}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    return " ".join(sorted(set(re.findall(r"avx512[a-z_0-9]*|avx_vnni|amx[a-z_]*", text)))) or "AVX2 only (none)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated among {', '.join(RECIPES)}")
    parser.add_argument("--model", default=None, help="checkpoint (default: the project's default model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--tasks", action="store_true", help="also print the score of every task")
    parser.add_argument("--out", type=Path, default=None, help="write every recipe's report here (JSON)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s): {', '.join(unknown)}")

    from llama3.generation import Llama

    questions = load_questions(args.data).questions
    pool = ExamplePool(questions)
    llm = Llama.build(ckpt_dir=args.model, max_seq_len=args.max_seq_len, max_batch_size=args.batch_size)
    scorer = Scorer()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags: {cpu_flags()}")
    print(f"{len(questions)} questions from {args.data}; model {args.model or 'default (SmolLM2-135M-Instruct Q4_1)'}")
    reports: dict[str, dict] = {}
    for name in names:
        recipe = RECIPES[name]
        model = ShopBenchModel(llm, batch_size=args.batch_size, recipe=recipe, examples=pool if recipe.shots else None)
        llm.scheduler.claim()  # every recipe starts with an empty prefix cache
        start = time.perf_counter()
        evaluation = evaluate(model, questions, scorer=scorer, progress=False)
        seconds = time.perf_counter() - start
        settings = {"recipe": recipe.as_dict(), "seconds": seconds}
        if recipe.shots:
            settings["examples"] = few_shot_protocol(pool, [q.prompt for q in questions])
        reports[name] = build_report(evaluation, settings=settings)
        print(f"  {name}: overall {reports[name]['overall']:.4f} in {seconds:.1f} s", file=sys.stderr, flush=True)

    tracks = sorted({t["track"] for r in reports.values() for t in r["tracks"]})
    short = {t: "".join(w[0] for w in t.split("-")) for t in tracks}
    print("\ntracks: " + ", ".join(f"{v} = {k}" for k, v in short.items()))
    header = f"{'recipe':<14}" + "".join(f"{short[t]:>8}" for t in tracks) + f"{'overall':>9}{'time':>8}"
    print(header)
    for name, report in reports.items():
        by_track = {t["track"]: t["score"] for t in report["tracks"]}
        print(f"{name:<14}" + "".join(f"{by_track.get(t, float('nan')):8.4f}" for t in tracks)
              + f"{report['overall']:9.4f}{report['settings']['seconds']:7.1f}s")
    if args.tasks:
        task_names = [t["task"] for t in next(iter(reports.values()))["tasks"]]
        print(f"\n{'recipe':<14}" + "".join(f"{t[4:]:>6}" for t in task_names))
        for name, report in reports.items():
            scores = {t["task"]: t["score"] for t in report["tasks"]}
            print(f"{name:<14}" + "".join(f"{scores[t]:6.2f}" for t in task_names))
    for name, report in reports.items():
        if report["unavailable_metrics"]:
            print(f"note ({name}): unavailable metrics: {report['unavailable_metrics']}")
            break
    if args.out is not None:
        args.out.write_text(json.dumps(reports, indent=1, ensure_ascii=False, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
