"""Prompt-lookup speculative decoding gives plain decoding's output, token for token, in fewer steps.

Oracles: a brute-force scan of the history for the draft source, and the same requests decoded without
lookup (greedy and sampled, one and several sequences, stop strings, penalties, a grammar, the fused kernel
and the layer-by-layer path).
"""

from __future__ import annotations

import random

import pytest

from llama3.assets import default_model_path
from llama3.errors import GenerationError
from llama3.generation import Llama
from llama3.lookup import PromptLookup
from llama3.sampling import SamplingParams
from llama3.sequence import GenerationSpec
from llama3.tokenizer import load_tokenizer

DOC = ("Order #88213 was placed on 12 March 2024 by Jane Doe, 14 Elm Street, Springfield. Items: two USB-C cables "
       "(SKU CB-2231, $9.99 each), one wireless mouse (SKU MS-410, $24.50), and a 27-inch monitor (SKU MN-2700, "
       "$219.00). Shipping: express, $12.00. Payment: Visa ending 4421.")
QUESTIONS = ["Return a JSON object with keys order, customer, address, items.",
             "List every item with its SKU and price, one per line.",
             "Write a Python function that returns the nth Fibonacci number, then the same with a docstring."]


def reference_draft(history: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest matching tail n-gram, by scanning."""
    end = len(history)
    for n in range(min(max_n, end), min_n - 1, -1):
        tail = history[end - n :]
        for last in range(end - 2, n - 2, -1):  # index of an occurrence's last token, latest first
            if history[last - n + 1 : last + 1] == tail:
                return history[last + 1 : last + 1 + k]
    return []


@pytest.mark.parametrize("max_n, min_n", [(3, 2), (3, 1), (1, 1)])
def test_draft_equals_a_scan_of_the_history(max_n, min_n):
    rng = random.Random(max_n * 10 + min_n)
    for trial in range(40):
        lookup, history = PromptLookup(max_n, min_n), []
        for _ in range(rng.randrange(1, 60)):
            history += [rng.randrange(4) for _ in range(rng.randrange(1, 4))]  # grows by several tokens at times
            k = rng.randrange(0, 6)
            assert lookup.draft(history, k) == reference_draft(history, k, max_n, min_n), (trial, history, k)


def test_draft_sizes_are_checked():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(2, 3)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def model():
    from llama3.checkpoint import load_model

    return load_model(default_model_path(), device="cpu")


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode_dialog_prompt([{"role": "user", "content": f"{DOC}\n\n{q}"}]) for q in QUESTIONS]


def generate(model, tokenizer, specs, lookup: int, batch: int):
    llm = Llama(model, tokenizer, 1024, batch, prompt_lookup=lookup)
    seqs = llm.run(specs)
    return [(s.generated, s.text, s.finish_reason) for s in seqs], llm.scheduler.stats()


CASES = {
    "greedy": dict(params=SamplingParams(temperature=0.0)),
    "sampled": dict(params=SamplingParams(temperature=0.8, top_p=0.95, seed=11)),
    "penalties+stop": dict(params=SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.1,
                                                 frequency_penalty=0.2), stop=["Monitor", "}\n}"]),
}


# The fused kernel computes every row alone: logits are bit-identical whatever shares the step, so even sampled
# tokens match. The layer-by-layer path rounds attention differently with the step's key length (as plain
# batching does, ~1e-6): its greedy tokens match wherever the top two logits are not that close.
@pytest.mark.parametrize("path, case", [*(("fused", c) for c in sorted(CASES)), ("layers", "greedy")])
def test_lookup_output_is_plain_decodings(model, tokenizer, path, case):
    kernel = model.decode_kernel
    if path == "layers":
        model.decode_kernel = None  # every layer through the torch modules, per-row positions and cache rows
    try:
        specs = [GenerationSpec(p, 48, **CASES[case]) for p in prompts(tokenizer)]
        plain, plain_stats = generate(model, tokenizer, specs, 0, batch=2)
        fast, stats = generate(model, tokenizer, specs, 4, batch=2)
    finally:
        model.decode_kernel = kernel
    assert fast == plain
    assert stats["accepted_draft_tokens"] > 0, stats  # drafts were fed and taken: the path under test ran
    assert stats["decode_steps"] < plain_stats["decode_steps"]
    assert stats["generated_tokens"] == plain_stats["generated_tokens"]


def test_lookup_respects_budget_context_and_grammar(model, tokenizer):
    prompt = prompts(tokenizer)[0]
    schema = {"type": "object", "properties": {"order": {"type": "integer"}, "customer": {"type": "string"}},
              "required": ["order", "customer"]}
    from llama3.constraints.grammar import Grammar

    specs = [
        GenerationSpec(prompt, 1),  # no room for any draft
        GenerationSpec(prompt, 7),  # drafts cut to the budget
        GenerationSpec(prompt, 60, grammar=Grammar.json_schema(schema)),
    ]
    plain, _ = generate(model, tokenizer, specs, 0, batch=3)
    fast, _ = generate(model, tokenizer, specs, 8, batch=3)
    assert fast == plain
    assert [len(tokens) for tokens, _, _ in fast][:2] == [1, 7]
    # The context's end: a prompt that leaves 5 positions, with a budget that fills them.
    llm_plain = Llama(model, tokenizer, len(prompt) + 5, 1)
    llm_fast = Llama(model, tokenizer, len(prompt) + 5, 1, prompt_lookup=8)
    spec = [GenerationSpec(prompt, 5)]
    assert [s.generated for s in llm_fast.run(spec)] == [s.generated for s in llm_plain.run(spec)]


def test_negative_lookup_is_refused(model, tokenizer):
    with pytest.raises(GenerationError, match="prompt_lookup=-1"):
        Llama(model, tokenizer, 64, 1, prompt_lookup=-1)
