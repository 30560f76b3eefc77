"""Per-task-type system instructions and the chat dialog sent to the model.

The question itself goes to the user turn unchanged (it carries its own task instructions); the
system turn states the answer format the parsers expect, in the model's own chat format (the
tokenizer's ``encode_dialog_prompt``).
"""

from __future__ import annotations

from .router import Route

__all__ = ["SYSTEM_PROMPTS", "build_dialog", "system_prompt"]

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


def system_prompt(task_type: str) -> str:
    """The system instruction for ``task_type`` (the generation one for an unknown type)."""
    return SYSTEM_PROMPTS.get(task_type, SYSTEM_PROMPTS[_DEFAULT])


def build_dialog(prompt: str, route: Route) -> list[dict[str, str]]:
    """System instruction for the routed type, then the question as the user turn."""
    instruction = system_prompt(route.task_type)
    if route.task_type == "retrieval" and route.pick:
        instruction += f" Output exactly {route.pick} different numbers."
    if route.task_type == "multiple-choice" and route.options:
        instruction += f" The options are {', '.join(map(str, route.options))}."
    return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt.strip()}]
