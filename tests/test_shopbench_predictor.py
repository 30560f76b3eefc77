"""ShopBenchModel: routing, chat formatting, batching and constraints wired through the ``Llama.run`` contract.

Fast tests drive the predictor with ``RandomLLM``: the real tokenizer and chat format, the same
``run`` contract as ``llama3.Llama`` (per-sequence logits processors and grammars, stop tokens, budgets), but random
logits that favour letters, so only the constraints can make answers parseable. The slow tests use
the real default model.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llama3.constraints import GrammarConstraint
from llama3.tasks.shopbench.data import load_questions
from llama3.tasks.shopbench.parsing import parse_response
from llama3.tasks.shopbench.predictor import Recipe, ShopBenchModel

from test_shopbench_data import DEV, needs_dev

FORMATTED = ("multiple-choice", "ranking", "retrieval")


class RandomLLM:
    """Stands in for ``llama3.Llama``: the same ``run`` contract (specs in, finished sequences out, in order,
    ``on_finish`` as each ends), random logits instead of a model."""

    def __init__(self, tokenizer, max_seq_len: int = 4096, max_batch_size: int = 16, seed: int = 0) -> None:
        self.tokenizer, self.max_seq_len, self.max_batch_size = tokenizer, max_seq_len, max_batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.calls: list[list[int]] = []  # the budgets (max_tokens) of each call's specs
        self.letters = sorted(set(tokenizer.encode("The answer is option number", bos=False, eos=False)))

    def run(self, specs, *, on_finish=None):
        assert all(len(s.prompt) + s.max_tokens <= self.max_seq_len for s in specs)
        self.calls.append([s.max_tokens for s in specs])
        out = []
        for spec in specs:
            if spec.options:  # option scoring: a random logprob per option token
                scores = [(-torch.rand(len(o), generator=self.rng) * 5).tolist() for o in spec.options]
                seq = SimpleNamespace(generated=[], kept_tokens=list, option_logprobs=scores)
                if on_finish is not None:
                    on_finish(seq)
                out.append(seq)
                continue
            generated: list[int] = []
            grammar = GrammarConstraint(spec.grammar, self.tokenizer) if spec.grammar is not None else None
            for step in range(spec.max_tokens):
                logits = torch.randn(self.tokenizer.n_words, generator=self.rng)
                logits[self.letters] += 20.0  # a chatty model: constraints must override it
                for p in spec.processors:
                    logits = p(generated, logits)
                if grammar is not None:
                    logits = grammar(generated, logits, spec.max_tokens - step)
                t = int(torch.argmax(logits))
                if t in self.tokenizer.stop_tokens:
                    break
                generated.append(t)
            seq = SimpleNamespace(generated=generated, kept_tokens=lambda g=generated: list(g))
            if on_finish is not None:
                on_finish(seq)
            out.append(seq)
        return out


@pytest.fixture(scope="module")
def smol_tokenizer():
    tokenizer_mod = pytest.importorskip("llama3.tokenizer")
    if not hasattr(tokenizer_mod, "load_tokenizer"):
        pytest.skip("llama3.tokenizer.load_tokenizer not available yet")
    from llama3.assets import default_model_path

    return tokenizer_mod.load_tokenizer(default_model_path())


def assert_well_formed(question, response: str) -> None:
    parsed = parse_response(question.task_type, response)
    if question.task_type == "multiple-choice":
        allowed = {1, 2, 3, 4, 5} if question.task_name == "task15" else {0, 1, 2, 3}
        assert parsed in allowed, (question.line, response)
    elif question.task_type == "ranking":
        assert sorted(parsed) == [1, 2, 3, 4, 5], (question.line, response)
    else:
        n_items = 15 if question.task_name in ("task3", "task14") else 10
        assert len(set(parsed)) == 3 and set(parsed) <= set(range(1, n_items + 1)), (question.line, response)


@needs_dev
def test_constrained_answers_always_parse(smol_tokenizer):
    questions = [q for q in load_questions(DEV).questions if q.task_type in FORMATTED]
    llm = RandomLLM(smol_tokenizer)
    model = ShopBenchModel(llm, batch_size=16, recipe=Recipe(choice="generate", lists="generate"))
    preds = model.run([q.prompt for q in questions], [q.is_multiple_choice for q in questions])
    assert len(preds) == len(questions) == 71
    for q, p in zip(questions, preds):
        assert p.route.task_type == q.task_type  # input order restored after length sorting
        assert p.response == p.raw
        assert_well_formed(q, p.response)
    assert len(llm.calls) == 1 and len(llm.calls[0]) == 71  # every question submitted at once
    assert min(llm.calls[0]) == 2  # MC: one digit and the stop token, the budget of its own sequence


@needs_dev
def test_extraction_answers_are_copied_from_the_source(smol_tokenizer):
    questions = [q for q in load_questions(DEV).questions if q.task_name in ("task4", "task6")]
    copy = Recipe(entities="generate")  # NER phrases generated under the copy constraint (not scored spans)
    preds = ShopBenchModel(RandomLLM(smol_tokenizer, seed=2), recipe=copy).run([q.prompt for q in questions],
                                                                               [q.is_multiple_choice for q in questions])
    for q, p in zip(questions, preds):
        source = p.route.source
        assert source and source in q.prompt
        parts = [x.strip() for x in p.response.split(",")]
        if q.task_name == "task4":
            assert not source.startswith("Query") and 1 <= len(parts) <= 3
            assert all(x and x in source for x in parts), (source, p.response)
        else:  # one keyphrase from the review, at most 16 tokens
            assert p.response in source and p.response.strip() and p.generated_tokens <= 16
    bias = ShopBenchModel(RandomLLM(smol_tokenizer, seed=2), copy_mode="bias", recipe=copy)
    assert bias.run([questions[0].prompt], [False])[0].generated_tokens > 0


@needs_dev
def test_unconstrained_uses_seed_repairs(smol_tokenizer):
    questions = [q for q in load_questions(DEV).questions if q.task_type == "multiple-choice"][:20]
    llm = RandomLLM(smol_tokenizer, seed=1)
    model = ShopBenchModel(llm, batch_size=8, constrain=False, max_new_tokens={"multiple-choice": 4})
    preds = model.run([q.prompt for q in questions], [q.is_multiple_choice for q in questions])
    for p in preds:
        assert p.generated_tokens <= 4
        digits = [c for c in p.raw if c.isdigit()]
        assert p.response == (digits[0] if digits else p.raw)  # find_first_digit
    raw_model = ShopBenchModel(RandomLLM(smol_tokenizer, seed=1), batch_size=8, constrain=False, repair=False,
                               max_new_tokens={"multiple-choice": 4})
    assert [p.response for p in raw_model.run([q.prompt for q in questions], [True] * 20)] == [p.raw for p in preds]


def test_seed_interface_and_truncation(smol_tokenizer):
    llm = RandomLLM(smol_tokenizer, max_seq_len=64, max_batch_size=4)
    model = ShopBenchModel(llm, batch_size=4, recipe=Recipe(choice="generate"))
    long_prompt = "Which product is best? " + "filler words " * 200 + "\n0. a\n1. b\nAnswer: "
    assert model.predict(long_prompt, True) in ("0", "1")
    preds = model.run([long_prompt], [True])
    assert preds[0].truncated and preds[0].prompt_tokens == 64 - 2
    answers = model.batch_predict({"prompt": ["Pick.\n0. x\n1. y\nAnswer: "] * 5}, True)
    assert len(answers) == 5 and set(answers) <= {"0", "1"}
    assert [len(budgets) for budgets in llm.calls][-2:] == [1, 5]


# -- the real default model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_llm():
    generation = pytest.importorskip("llama3.generation")
    return generation.Llama.build(max_seq_len=2048, max_batch_size=16)


@pytest.mark.slow
@needs_dev
def test_real_model_constrained_answers_always_parse(default_llm):
    questions = [q for q in load_questions(DEV).questions if q.task_type in FORMATTED]
    preds = ShopBenchModel(default_llm, batch_size=16).run([q.prompt for q in questions],
                                                            [q.is_multiple_choice for q in questions])
    for q, p in zip(questions, preds):
        assert_well_formed(q, p.response)


@pytest.mark.slow
@needs_dev
def test_continuous_batching_answers_as_one_question_at_a_time(default_llm):
    """All questions at once through 16 slots (refilled as answers end) give exactly the answers of one
    question at a time: prefill alone per sequence, batch-invariant quantized decode."""
    from llama3.generation import Llama

    questions = load_questions(DEV).questions[::4]
    prompts, flags = [q.prompt for q in questions], [q.is_multiple_choice for q in questions]
    together = ShopBenchModel(default_llm).run(prompts, flags)
    single = Llama.build(max_seq_len=2048, max_batch_size=1, prefix_cache=False)
    alone = [ShopBenchModel(single).run([p], [f])[0] for p, f in zip(prompts, flags)]
    assert [p.raw for p in together] == [p.raw for p in alone]


@pytest.mark.slow  # loads the default model and runs a slice of the dev set through the CLI
@needs_dev
def test_cli_end_to_end_small_slice(tmp_path, capsys):
    """``llama3 eval shopbench`` on one record per task type plus a malformed line, with the default model."""
    from llama3.cli import main

    lines = DEV.read_text().splitlines()
    picked = [lines[i] for i in (0, 4, 8, 12, 64)] + ["{broken"]
    assert {json.loads(x)["task_type"] for x in picked[:-1]} == {"generation", "multiple-choice", "retrieval",
                                                                 "named_entity_recognition", "ranking"}
    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join(picked) + "\n")
    out = tmp_path / "report.json"
    assert main(["eval", "shopbench", str(data), "--batch-size", "4", "--out", str(out), "--max-gen-len", "24",
                 "--max-seq-len", "1024"]) == 0
    captured = capsys.readouterr()
    assert f"{data}:6: skipped: invalid JSON" in captured.err
    assert "overall" in captured.out and "questions/s" in captured.out and "routing accuracy: 100.00% (5/5)" in captured.out
    report = json.loads(out.read_text())
    assert [s["line"] for s in report["skipped_lines"]] == [6]
    assert report["overall"] is not None and report["throughput"]["generated_tokens"] > 0
    rows = {r["task_type"]: r for r in report["questions"]}
    assert len(report["questions"]) == 5 and all(r["score"] is not None for r in rows.values())
    assert rows["multiple-choice"]["parsed"] in (0, 1, 2, 3)
    assert sorted(rows["ranking"]["parsed"]) == [1, 2, 3, 4, 5]
    assert len(set(rows["retrieval"]["parsed"])) == 3
    # The default recipe is recorded, and the multiple-choice answer came from its option scores.
    assert report["settings"]["recipe"] == Recipe().as_dict() and "recipe: multiple-choice text" in captured.out
    mc = rows["multiple-choice"]
    assert len(mc["option_scores"]) == 4 and mc["parsed"] == max(range(4), key=lambda i: mc["option_scores"][i])
    assert rows["named_entity_recognition"]["parsed"] and all(
        e in "tablette asus" for e in rows["named_entity_recognition"]["parsed"])
