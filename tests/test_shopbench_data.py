"""Loading ShopBench JSON Lines and routing every development record by its prompt alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llama3.errors import Llama3Error
from llama3.tasks.shopbench.data import load_questions
from llama3.tasks.shopbench.router import numbered_items, route

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "shopbench" / "development.jsonl"
if not DEV.is_file():
    DEV = Path("/work/shared/data/shopbench/development.jsonl")
needs_dev = pytest.mark.skipif(not DEV.is_file(), reason="ShopBench development set not present")

GOOD = {"input_field": "Which is a fruit?\n0. apple\n1. chair\nAnswer: ", "output_field": 0,
        "task_name": "task2", "task_type": "multiple-choice", "metric": "accuracy", "is_multiple_choice": True,
        "track": "amazon-kdd-cup-24-understanding-shopping-concepts"}


@needs_dev
def test_development_set_loads_cleanly():
    loaded = load_questions(DEV)
    assert loaded.problems == []
    assert len(loaded.questions) == 96
    counts = Counter(q.task_type for q in loaded.questions)
    assert counts == {"multiple-choice": 52, "generation": 17, "retrieval": 15, "named_entity_recognition": 8,
                      "ranking": 4}
    assert [q.line for q in loaded.questions] == list(range(1, 97))
    assert len({q.prompt_id for q in loaded.questions}) == 96


def test_malformed_lines_are_reported_and_skipped(tmp_path):
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({**GOOD, "input_field": ""}),
        json.dumps({**GOOD, "output_field": "zero"}),
        "",
        json.dumps({**GOOD, "is_multiple_choice": "yes"}),
        json.dumps([1, 2]),
        json.dumps({**GOOD, "task_type": "summarisation"}),
        json.dumps({"input_field": "hidden test style", "is_multiple_choice": False}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_questions(path)
    assert [q.line for q in loaded.questions] == [1, 9]
    assert [p.line for p in loaded.problems] == [2, 3, 4, 6, 7, 8]
    messages = {p.line: p.message for p in loaded.problems}
    assert "invalid JSON" in messages[2] and "input_field" in messages[3] and "output_field" in messages[4]
    assert "is_multiple_choice" in messages[6] and "JSON object" in messages[7] and "summarisation" in messages[8]
    assert not loaded.questions[1].labelled and loaded.questions[0].labelled


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(Llama3Error, match="empty"):
        load_questions(path)


def test_no_valid_record_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n[]\n")
    with pytest.raises(Llama3Error, match="no valid record.*line 1"):
        load_questions(path)
    with pytest.raises(Llama3Error, match="no such file"):
        load_questions(tmp_path / "missing.jsonl")


@needs_dev
def test_routing_is_exact_on_every_development_record():
    questions = load_questions(DEV).questions
    wrong = [(q.line, q.task_name, q.task_type, route(q.prompt, q.is_multiple_choice).task_type)
             for q in questions if route(q.prompt, q.is_multiple_choice).task_type != q.task_type]
    assert wrong == []


@needs_dev
def test_routes_carry_the_answer_shape():
    for q in load_questions(DEV).questions:
        r = route(q.prompt, q.is_multiple_choice)
        if q.task_type == "multiple-choice":
            assert q.truth in r.options
            assert r.options == ((1, 2, 3, 4, 5) if q.task_name == "task15" else (0, 1, 2, 3))
        elif q.task_type == "retrieval":
            assert r.pick == 3 and set(q.truth) <= set(r.items) and r.items == tuple(range(1, len(r.items) + 1))
            assert len(r.items) in (10, 15)
        elif q.task_type == "ranking":
            assert r.items == (1, 2, 3, 4, 5)
        elif q.task_type == "named_entity_recognition":
            assert all(t in r.source for t in q.truth)  # the query line, where entities are copied from


def test_router_rules_on_unseen_prompts():
    assert route("Write a haiku about shoes.", False).task_type == "generation"
    assert route("Rate this review on a scale of 1 to 5.\nAnswer: ", True).options == (1, 2, 3, 4, 5)
    assert route("Pick one.\nAnswer: ", True).options == tuple(range(10))
    listed = "Items:\n" + "\n".join(f"{i}. item {i}" for i in range(1, 8)) + "\nOutput: "
    assert route(listed, False).task_type == "retrieval"  # more than five listed items
    five = "Items:\n" + "\n".join(f"{i}. item {i}" for i in range(1, 6)) + "\nOutput: "
    assert route("Sort by price. " + five, False).task_type == "ranking"
    assert route("Select 2 items. " + five, False).pick == 2
    assert route("Extract all entities of type brand.\nQuery: nike air max\nOutput: ", False).source == "nike air max"
    assert numbered_items("intro 3. x\n0. a\n1. b\n2. c\n") == (0, 1, 2)
