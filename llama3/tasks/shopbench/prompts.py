"""Per-task-type system instructions and the chat dialog sent to the model.

The question itself goes to the user turn unchanged (it carries its own task instructions); the
system turn states the answer format the parsers expect, in the model's own chat format (the
tokenizer's ``encode_dialog_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .router import Route

__all__ = ["COT_CUE", "SYSTEM_PROMPTS", "build_dialog", "system_prompt"]

_ROLE = "You are a helpful online shopping assistant with deep knowledge of products, brands and customers."

SYSTEM_PROMPTS: dict[str, str] = {
    "multiple-choice": (
        f"{_ROLE} Answer the multiple-choice question with the number of the correct option only: "
        "a single digit, no words and no explanation."
    ),
    "ranking": (
        f"{_ROLE} Rank every listed item from most to least relevant. Answer only with the item numbers "
        "separated by commas, each number exactly once, e.g. 2,1,4,5,3. No words, no explanation."
    ),
    "retrieval": (
        f"{_ROLE} Select the requested number of items from the numbered list. Answer only with their "
        "numbers separated by commas, e.g. 3,7,12. No words, no explanation."
    ),
    "named_entity_recognition": (
        f"{_ROLE} Copy the requested phrases exactly as they are written in the text. If there are "
        "several, separate them with commas. Output only the phrases, no explanation."
    ),
    "generation": (
        f"{_ROLE} Answer briefly and precisely in one line, in the language the question asks for. "
        "Output only the answer, no explanation."
    ),
}

_DEFAULT = "generation"

# Chain of thought: the system turn asks for reasoning first; after the reasoning (cut at the recipe's budget)
# this cue closes it and the answer follows under the task's constraint or option scoring.
_COT = ("First think step by step in a few short sentences about the question. Then write 'Final answer:' on a "
        "new line followed by the answer in the required format.")
COT_CUE = "\nFinal answer:\n"


def system_prompt(task_type: str) -> str:
    """The system instruction for ``task_type`` (the generation one for an unknown type)."""
    return SYSTEM_PROMPTS.get(task_type, SYSTEM_PROMPTS[_DEFAULT])


def build_dialog(prompt: str, route: Route, *, examples: Sequence[tuple[str, str]] = (),
                 cot: bool = False) -> list[dict[str, str]]:
    """System instruction for the routed type, few-shot ``examples`` (prompt, answer) as earlier turns, then the
    question as the user turn. ``cot`` asks for reasoning before the answer."""
    instruction = system_prompt(route.task_type)
    if route.task_type == "retrieval" and route.pick:
        instruction += f" Output exactly {route.pick} different numbers."
    if route.task_type == "multiple-choice" and route.options:
        instruction += f" The options are {', '.join(map(str, route.options))}."
    if cot:
        instruction += " " + _COT
    dialog = [{"role": "system", "content": instruction}]
    for shown, answer in examples:
        dialog += [{"role": "user", "content": shown.strip()}, {"role": "assistant", "content": answer}]
    return dialog + [{"role": "user", "content": prompt.strip()}]
