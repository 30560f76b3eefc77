"""ShopBench recipes: option scoring, chain of thought and few-shot examples, on a tiny random Llama.

Oracles: one cache-less forward per option over the exact chat prompt the predictor built (option scores),
constrained decoding of the same model (label scoring picks what greedy decoding over the offered digits
picks), the official parsers (chain-of-thought answers), and the development set itself (leave-one-out never
shows a question its own record).
"""

from __future__ import annotations

import pytest
import torch

from llama3.config import ModelConfig
from llama3.generation import Llama
from llama3.model import Transformer
from llama3.tasks.shopbench.data import load_questions
from llama3.tasks.shopbench.examples import ExamplePool, few_shot_protocol, gold_answer
from llama3.tasks.shopbench.parsing import parse_response
from llama3.tasks.shopbench.predictor import Recipe, ShopBenchModel
from llama3.tasks.shopbench.router import route

from test_shopbench_data import DEV, needs_dev
from test_shopbench_predictor import RandomLLM, assert_well_formed, smol_tokenizer  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny_llm(smol_tokenizer):  # noqa: F811
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=smol_tokenizer.n_words,
                         hidden_dim=128, max_seq_len=2048)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return Llama(model.eval(), smol_tokenizer, max_seq_len=2048, max_batch_size=4)


@pytest.fixture(scope="module")
def dev_questions():
    return load_questions(DEV).questions


def brute_force(llm, prompt: list[int], option: list[int]) -> float:
    with torch.inference_mode(), llm.model.cache_detached():
        logits = llm.model(torch.tensor([prompt + option]))[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option))


@needs_dev
@pytest.mark.parametrize("scoring", ["text", "text-mean"])
def test_option_scores_equal_one_forward_per_option(tiny_llm, dev_questions, scoring):
    """Multiple-choice option texts and ranking/retrieval item texts scored in the decoding core equal a full
    forward per option over the predictor's own chat prompt; the answer is the best option (the best 3 items,
    all items best first)."""
    picked = [q for q in dev_questions if q.task_name in ("task2", "task12", "task7")][:6]
    model = ShopBenchModel(tiny_llm, recipe=Recipe(choice=scoring, lists=scoring))
    preds = model.run([q.prompt for q in picked], [q.is_multiple_choice for q in picked])
    for q, p in zip(picked, preds):
        job = model._job(0, q.prompt, q.is_multiple_choice)
        assert job.options and len(p.option_scores) == len(job.labels) == len(p.route.texts)
        for option, got in zip(job.options, p.option_scores):
            want = brute_force(tiny_llm, job.tokens, option)
            if scoring == "text-mean":
                want /= len(option)
            assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (q.line, got, want)
        best = sorted(range(len(job.labels)), key=lambda i: -p.option_scores[i])
        expect = [job.labels[i] for i in best][: {"multiple-choice": 1, "retrieval": 3}.get(q.task_type, 99)]
        assert parse_response(q.task_type, p.response) == (expect[0] if q.task_type == "multiple-choice" else expect)
        assert p.generated_tokens == 0


@needs_dev
def test_label_scoring_picks_what_constrained_decoding_picks(tiny_llm, dev_questions):
    mc = [q for q in dev_questions if q.task_type == "multiple-choice"][::3]
    prompts, flags = [q.prompt for q in mc], [True] * len(mc)
    scored = ShopBenchModel(tiny_llm, recipe=Recipe(choice="label")).run(prompts, flags)
    generated = ShopBenchModel(tiny_llm, recipe=Recipe(choice="generate")).run(prompts, flags)
    assert [p.response for p in scored] == [p.response for p in generated]
    assert all(p.option_scores is not None for p in scored) and all(p.option_scores is None for p in generated)


@needs_dev
def test_leave_one_out_never_shows_a_question_its_own_record(dev_questions, smol_tokenizer):  # noqa: F811
    """Over the whole development set, 3 shots each: no question's examples include itself (by line or by
    prompt text), every example has the question's routed type, and the chat prompt built for the question
    holds each example's gold answer as an assistant turn but never the question's own gold as one."""
    pool = ExamplePool(dev_questions)
    assert len(pool) == 96
    assert few_shot_protocol(pool, [q.prompt for q in dev_questions]).endswith(
        "leave-one-out: 96 of the 96 evaluated questions are in the example pool")
    llm = RandomLLM(smol_tokenizer)
    model = ShopBenchModel(llm, recipe=Recipe(shots=3), examples=pool)
    preds = model.run([q.prompt for q in dev_questions], [q.is_multiple_choice for q in dev_questions])
    by_line = {q.line: q for q in dev_questions}
    for q, p in zip(dev_questions, preds):
        shown = [by_line[line] for line in p.examples]
        assert len(shown) == 3 and q.line not in p.examples
        assert all(e.prompt.strip() != q.prompt.strip() for e in shown)
        assert all(e.task_type == route(q.prompt, q.is_multiple_choice).task_type for e in shown)
        text = smol_tokenizer.decode(model._job(0, q.prompt, q.is_multiple_choice).tokens)
        assert text.count(q.prompt.strip()) == 1  # the question appears once: as the last user turn
        for e in shown:
            assert e.prompt.strip() in text and f"{gold_answer(e)}<|im_end|>" in text
    # A pool without the evaluated questions is reported as disjoint.
    other = ExamplePool(dev_questions[:48])
    assert few_shot_protocol(other, [q.prompt for q in dev_questions[48:]]).endswith("are disjoint")


def test_gold_answers_read_back_as_the_truth():
    """Each example's answer, parsed by the official parser, is its record's truth (ranking: the ideal order)."""
    from llama3.tasks.shopbench.data import Question

    cases = [("multiple-choice", 3, 3), ("retrieval", [4, 9, 1], [4, 9, 1]), ("ranking", [0.1, 1, 0, 1, 0.5],
             [2, 4, 5, 1, 3]), ("named_entity_recognition", ["asus", "tablette"], ["asus", "tablette"]),
             ("generation", "a toggle switch", "a toggle switch")]
    for kind, truth, parsed in cases:
        q = Question(line=1, prompt="x", is_multiple_choice=kind == "multiple-choice", task_name="t", task_type=kind,
                     metric="accuracy", truth=truth)
        assert parse_response(kind, gold_answer(q)) == parsed


@needs_dev
@pytest.mark.parametrize("scoring", ["generate", "text"])
def test_chain_of_thought_always_ends_in_a_parseable_answer(tiny_llm, dev_questions, scoring):
    """A random model reasons (free text, up to the budget), then its answer follows the cue under the task's
    constraint or scoring: every multiple-choice, ranking and retrieval response parses to a valid answer and
    holds nothing of the reasoning; NER answers are copied from the query."""
    picked = [q for q in dev_questions if q.task_type != "generation"][::4]
    recipe = Recipe(choice=scoring, lists=scoring, cot=frozenset({"multiple-choice", "ranking", "retrieval",
                                                                  "named_entity_recognition"}), cot_tokens=12)
    preds = ShopBenchModel(tiny_llm, recipe=recipe).run([q.prompt for q in picked], [q.is_multiple_choice for q in picked])
    for q, p in zip(picked, preds):
        assert p.reasoning is not None and p.reasoning not in ("",) and p.generated_tokens >= 1
        if q.task_type == "named_entity_recognition":
            assert all(x.strip() in p.route.source for x in p.response.split(",")), p.response
        else:
            assert_well_formed(q, p.response)


def test_recipe_and_cli_options_are_checked():
    from llama3.tasks.shopbench.cli import recipe_from
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="choice must be one of"):
        Recipe(choice="vote")
    with pytest.raises(ValueError, match="unknown task type"):
        Recipe(cot=frozenset({"poetry"}))
    args = SimpleNamespace(choice="text", lists="label", entities="spans", cot="all", cot_tokens=32, shots=2)
    assert recipe_from(args).cot == frozenset({"multiple-choice", "ranking", "retrieval", "named_entity_recognition",
                                               "generation"})
    with pytest.raises(ValueError, match="--cot: unknown task type"):
        recipe_from(SimpleNamespace(**{**vars(args), "cot": "ranking,poems"}))
    assert recipe_from(SimpleNamespace(**{**vars(args), "cot": "none"})).cot == frozenset()
    with pytest.raises(ValueError, match="cot_tokens=40 leaves too little of the context"):
        ShopBenchModel(SimpleNamespace(tokenizer=None, max_seq_len=64),
                       recipe=Recipe(cot=frozenset({"generation"}), cot_tokens=40))


def test_a_reformatted_copy_of_a_question_is_still_the_question(dev_questions):
    """The pool compares prompts with whitespace collapsed: the same record with CRLF line ends or doubled spaces
    is never an example for itself."""
    from dataclasses import replace

    q = dev_questions[0]
    pool = ExamplePool([replace(q, prompt=q.prompt.replace("\n", "\r\n").replace(" ", "  ")), *dev_questions[1:8]])
    assert pool.contains(q.prompt)
    assert all(e.line != q.line for e in pool.pick(q.prompt, "generation", 8))


@needs_dev
def test_entity_spans_are_runs_of_the_query_and_the_best_one_is_answered(tiny_llm, dev_questions):
    from llama3.tasks.shopbench.predictor import source_spans

    assert source_spans("tablette asus") == ["tablette", "asus", "tablette asus"]
    assert source_spans('3m "plastic" repair tape.', longest=2) == ["3m", "plastic", "repair", "tape", "3m plastic",
                                                                    "plastic repair", "repair tape"]
    ner = [q for q in dev_questions if q.task_type == "named_entity_recognition"]
    model = ShopBenchModel(tiny_llm, recipe=Recipe(entities="spans"))
    for q, p in zip(ner, model.run([q.prompt for q in ner], [False] * len(ner))):
        spans = source_spans(p.route.source)
        assert len(p.option_scores) == len(spans) and p.generated_tokens == 0
        assert p.response == spans[max(range(len(spans)), key=lambda i: p.option_scores[i])]
        assert parse_response("named_entity_recognition", p.response) == [p.response]


@needs_dev
def test_cli_refuses_bad_recipe_options_before_loading_a_model(tmp_path, capsys):
    from llama3.cli import main

    assert main(["eval", "shopbench", str(DEV), "--cot", "poems"]) == 2
    assert "error: --cot: unknown task type(s) poems" in capsys.readouterr().err
    assert main(["eval", "shopbench", str(DEV), "--shots", "2", "--examples", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "error: --examples: " in err and "no such file" in err
    unlabelled = tmp_path / "hidden.jsonl"
    unlabelled.write_text('{"input_field": "Pick one.\\n0. a\\n1. b\\nAnswer: ", "is_multiple_choice": true}\n')
    assert main(["eval", "shopbench", str(DEV), "--shots", "1", "--examples", str(unlabelled)]) == 2
    assert "needs labelled records" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "shopbench", str(DEV), "--choice", "vote"])
    assert "invalid choice: 'vote'" in capsys.readouterr().err
