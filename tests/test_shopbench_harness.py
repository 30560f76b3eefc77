"""Scoring and aggregation (per task, per track, overall) against hand-computed values; the report and table."""

from __future__ import annotations

import json

import pytest

from llama3.tasks.shopbench.cli import format_report
from llama3.tasks.shopbench.data import Question
from llama3.tasks.shopbench.harness import Throughput, aggregate, build_report, score_predictions
from llama3.tasks.shopbench.metrics import Scorer
from llama3.tasks.shopbench.predictor import Prediction
from llama3.tasks.shopbench.router import route

U, B, M = ("amazon-kdd-cup-24-understanding-shopping-concepts", "amazon-kdd-cup-24-user-behavior-alignment",
           "amazon-kdd-cup-24-multi-lingual-abilities")
MC = "Which one?\n0. a\n1. b\n2. c\n3. d\nAnswer: "
NER = "Please extract phrases that correspond to the entity type 'brand'.\nQuery: {}\nOutput: "
RANK = "Rank the products.\n" + "\n".join(f"{i}. p{i}" for i in range(1, 6)) + "\nOutput: "
RETR = "Select 3 products.\n" + "\n".join(f"{i}. p{i}" for i in range(1, 16)) + "\nOutput: "
GEN = "Translate the title to German.\nOutput: "

# (task, track, type, metric, prompt, mc, truth, response)
CASES = [
    ("task2", U, "multiple-choice", "accuracy", MC, True, 0, "0"),
    ("task2", U, "multiple-choice", "accuracy", MC, True, 3, "x"),  # parses to -1
    ("task4", U, "named_entity_recognition", "micro f1", NER.format("cadbury xmas"), False, ["cadbury"],
     "cadbury, xmas"),  # tp 1, fp 1, fn 0
    ("task4", U, "named_entity_recognition", "micro f1", NER.format("mens shirt"), False, ["mens"], "Mens"),
    ("task12", B, "ranking", "ndcg", RANK, False, [1, 0.01, 0.1, 1, 0], "1,4,3,2,5"),  # ideal: 1.0
    ("task14", B, "retrieval", "hit rate@3", RETR, False, [3, 8, 9], "3, 8, 1"),  # 2/3
    ("task17", M, "generation", "bleu", GEN, False, "Fimo Soft Starter Pack", "Fimo Soft Starter Pack"),
    ("task17", M, "generation", "multilingual-sent-transformer", GEN, False, "Titel", "Titel"),  # unavailable
    ("task19", M, "generation", "multilingual-sent-transformer", GEN, False, "Titel", "Titel"),  # unavailable
]


@pytest.fixture
def evaluation(monkeypatch):
    monkeypatch.delenv("SHOPBENCH_MULTILINGUAL_MODEL", raising=False)
    questions, predictions = [], []
    for line, (task, track, ttype, metric, prompt, mc, truth, response) in enumerate(CASES, start=1):
        questions.append(Question(line, prompt, mc, task, ttype, metric, track, truth))
        predictions.append(Prediction(route(prompt, mc), response, response, prompt_tokens=10, generated_tokens=2))
    stats = Throughput(questions=len(CASES), prompt_tokens=90, generated_tokens=18, seconds=2.0)
    return score_predictions(questions, predictions, Scorer(multilingual_model=None), stats)


def test_aggregation_hand_computed(evaluation):
    agg = aggregate(evaluation.results)
    tasks = {t["task"]: t for t in agg["tasks"]}
    assert [t["task"] for t in agg["tasks"]] == ["task2", "task4", "task12", "task14", "task17", "task19"]
    assert tasks["task2"]["score"] == pytest.approx(0.5)
    assert tasks["task4"]["score"] == pytest.approx(0.8)  # micro: tp 2, fp 1, fn 0 -> P 2/3, R 1
    assert tasks["task12"]["score"] == pytest.approx(1.0)
    assert tasks["task14"]["score"] == pytest.approx(2 / 3)
    assert tasks["task17"]["score"] == pytest.approx(1.0) and tasks["task17"]["scored"] == 1
    assert tasks["task17"]["count"] == 2 and tasks["task17"]["metric"] == "bleu+multilingual-sent-transformer"
    assert tasks["task19"]["score"] is None  # nothing scorable: out of its track, not zero
    tracks = {t["track"]: t["score"] for t in agg["tracks"]}
    assert tracks == pytest.approx({"understanding-shopping-concepts": 0.65, "user-behavior-alignment": 5 / 6,
                                    "multi-lingual-abilities": 1.0})
    assert agg["overall"] == pytest.approx((0.65 + 5 / 6 + 1.0) / 3)
    notes = " | ".join(agg["notes"])
    assert "task17: 1 record(s) scored with multilingual-sent-transformer left out" in notes
    assert "task19: no scorable record" in notes and "mean of 3 track(s)" in notes


def test_report_and_table(evaluation):
    report = build_report(evaluation, settings={"constrain": True})
    text = json.dumps(report)  # must be JSON-serialisable as is
    assert json.loads(text)["overall"] == pytest.approx(report["overall"])
    assert report["routing"]["accuracy"] == 1.0 and report["routing"]["total"] == len(CASES)
    rows = report["questions"]
    assert [r["line"] for r in rows] == list(range(1, len(CASES) + 1))
    assert rows[1]["parsed"] == -1 and rows[1]["score"] == 0.0
    assert rows[2]["counts"] == {"tp": 1, "fp": 1, "fn": 0} and rows[2]["score"] == pytest.approx(2 / 3)
    assert rows[7]["score"] is None and "paraphrase-multilingual" in rows[7]["unavailable"]
    assert all(len(r["prompt_id"]) == 12 and "raw_output" in r for r in rows)
    assert report["throughput"]["questions_per_s"] == pytest.approx(4.5)
    assert report["throughput"]["generated_tokens_per_s"] == pytest.approx(9.0)
    table = format_report(report)
    assert "task14" in table and "0.6667" in table and "overall" in table
    assert "routing accuracy: 100.00% (9/9)" in table
    assert "note: metric multilingual-sent-transformer unavailable" in table
    assert "1/2" in table  # task17: 1 of 2 records scored


def test_parsing_uses_the_true_task_type():
    # A generation question routed elsewhere is still parsed as generation, as the official evaluator does.
    q = Question(1, RANK, False, "task6", "generation", "rougel", U, "comfortable")
    p = Prediction(route(RANK, False), "comfortable", "comfortable", 5, 1)
    ev = score_predictions([q], [p], Scorer())
    assert ev.results[0].parsed == "comfortable" and ev.results[0].score == pytest.approx(1.0)
    assert build_report(ev)["routing"]["mistakes"] == [
        {"line": 1, "task_name": "task6", "task_type": "generation", "routed_type": "ranking"}]


def test_cli_rejects_empty_file_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import argparse

    from llama3.tasks.shopbench import cli

    def no_model(args):
        raise AssertionError("the model must not be loaded for an unusable data file")

    monkeypatch.setattr(cli, "load_llm", no_model)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.run(parser.parse_args([str(empty), "--batch-size", "16"])) == 2
    assert "empty" in capsys.readouterr().err
    assert cli.run(parser.parse_args([str(tmp_path / "nope.jsonl")])) == 2
    assert "no such file" in capsys.readouterr().err


def test_unlabelled_questions_are_answered_not_scored():
    # The hidden test format: only input_field and is_multiple_choice.
    q = Question(1, MC, True)
    p = Prediction(route(MC, True), "2", "2", 12, 1)
    report = build_report(score_predictions([q], [p], Scorer()))
    assert report["tasks"] == [] and report["overall"] is None and report["routing"]["accuracy"] is None
    assert report["questions"][0]["parsed"] == 2 and report["questions"][0]["score"] is None
    table = format_report(report)
    assert "routed: multiple-choice 1" in table and "routing accuracy" not in table
