"""The decoding core: prefix-cache hits are exact, logits processors reach every driver, chats answer the same.

Oracles: a cold prefill of the same prompt (a scheduler without the prefix cache, on the same weights), the same
chat run with the cache off, and forced tokens for processors.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from llama3.assets import default_model_path
from llama3.engine import Engine
from llama3.errors import GenerationError
from llama3.generation import Llama
from llama3.sampling import SamplingParams
from llama3.scheduler import Scheduler
from llama3.sequence import GenerationSpec, Sequence
from llama3.tokenizer import load_tokenizer
from test_engine import make_model

GREEDY = SamplingParams(temperature=0.0)
CHUNK = 16


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def float_model(tokenizer):
    return make_model(tokenizer.n_words)


@pytest.fixture(scope="module")
def quantized_model():
    from llama3.checkpoint import load_model

    return load_model(default_model_path(), device="cpu")


class Recorder:
    """A logits processor that keeps a copy of every row it sees (and changes nothing)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, generated, logits):
        self.rows.append(logits.clone())
        return logits


def run(scheduler: Scheduler, tokenizer, prompt: list[int], steps: int, processors=()) -> Sequence:
    seq = Sequence(GenerationSpec(prompt, steps, GREEDY, processors=processors), tokenizer, torch.Generator(),
                   frozenset())
    scheduler.add(seq)
    while not seq.done:
        scheduler.step()
    return seq


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_a_prefix_cache_hit_gives_the_logits_of_a_cold_prefill(which, request, tokenizer):
    model = request.getfixturevalue(f"{which}_model")
    g = torch.Generator().manual_seed(1)
    first = torch.randint(100, 20000, (50,), generator=g).tolist()
    second = first[:40] + torch.randint(100, 20000, (21,), generator=g).tolist()  # shares 40 tokens: 2 chunks
    warm = Scheduler(model, max_batch_size=2, max_seq_len=128, chunk=CHUNK)
    run(warm, tokenizer, first, 3)
    hit = Recorder()
    warm_seq = run(warm, tokenizer, second, 5, (hit,))
    assert warm.stats()["prefix_cache_hits"] == 1 and warm.stats()["prefix_cache_tokens"] == 2 * CHUNK

    cold = Scheduler(model, max_batch_size=2, max_seq_len=128, chunk=CHUNK, prefix_cache=False)
    reference = Recorder()
    cold_seq = run(cold, tokenizer, second, 5, (reference,))
    assert cold.stats()["prefix_cache_hits"] == 0
    assert warm_seq.generated == cold_seq.generated
    assert len(hit.rows) == len(reference.rows) == 5
    for got, want in zip(hit.rows, reference.rows):
        assert torch.equal(got, want)  # bit for bit: the reused chunks are the cold prefill's own numbers


def test_another_front_end_on_the_same_model_invalidates_the_cache(float_model, tokenizer):
    prompt = list(range(200, 260))
    a = Scheduler(float_model, max_batch_size=1, max_seq_len=128, chunk=CHUNK)
    run(a, tokenizer, prompt, 2)
    other = Scheduler(float_model, max_batch_size=1, max_seq_len=128, chunk=CHUNK, prefix_cache=False)
    run(other, tokenizer, list(range(300, 360)), 2)  # overwrites the cache rows a's chunks were in
    run(a, tokenizer, prompt + [7], 2)
    assert a.stats()["prefix_cache_hits"] == 0  # a noticed and prefilled again


def test_a_logits_processor_reaches_the_server_engine(float_model, tokenizer):
    forced = tokenizer.encode(" yes", bos=False, eos=False)[0]

    def only_yes(generated, logits):
        out = torch.full_like(logits, -float("inf"))
        out[forced] = 0.0
        return out

    engine = Engine(float_model, tokenizer, max_batch_size=2, max_seq_len=128)
    engine.start()
    try:
        async def go():
            spec = GenerationSpec([5, 6, 7], 6, SamplingParams(temperature=1.0), processors=(only_yes,))
            submission = engine.submit([spec, GenerationSpec([5, 6, 7], 6, GREEDY)])
            texts = ["", ""]
            async for index, delta in submission.events():
                texts[index] += delta.text
            return texts

        constrained, free = asyncio.run(go())
    finally:
        engine.stop()
    assert constrained == tokenizer.decode([forced] * 6) and free != constrained


@pytest.mark.slow
def test_a_chat_answers_the_same_with_its_history_in_the_cache():
    """Four turns of one chat, greedy, with and without the prefix cache: the same answers, and with the cache
    every turn after the first reuses the history's whole chunks."""
    answers = {}
    for cache in (True, False):
        llm = Llama.build(max_seq_len=2048, max_batch_size=2, prefix_cache=cache)
        dialog = [{"role": "system", "content": "You are a helpful assistant. " * 40}]
        turns = []
        for question in ("Name a fruit.", "Why is it healthy?", "Give a recipe with it.", "Summarize that."):
            dialog.append({"role": "user", "content": question})
            reply = llm.chat_completion([dialog], temperature=0, max_gen_len=48)[0]["generation"]
            dialog.append(reply)
            turns.append(reply["content"])
        answers[cache] = turns
        stats = llm.scheduler.stats()
        assert (stats["prefix_cache_hits"] >= 3) if cache else stats["prefix_cache_hits"] == 0
    assert answers[True] == answers[False]


def brute_force_option_logprobs(model, prompt: list[int], option: list[int]) -> list[float]:
    """One cache-less forward over prompt + option: the logprob of each option token (the oracle)."""
    with torch.inference_mode(), model.cache_detached():
        logits = model(torch.tensor([prompt + option]))[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option)]


@pytest.mark.parametrize("which", ["float_model", "quantized_model"])
@pytest.mark.parametrize("branch_bytes", [None, 1])
def test_option_scoring_equals_one_forward_per_option(which, branch_bytes, request, tokenizer, monkeypatch):
    """Options of 1 to 6 tokens scored as branches of one prefilled prompt (prefix-cache hit included, and with a
    scratch budget that forces one branch per pass) equal a separate full forward per option; the KV cache's
    reusable chunks stay valid (a later greedy run with a hit equals a cold one)."""
    import llama3.scheduler as scheduler_module

    if branch_bytes is not None:
        monkeypatch.setattr(scheduler_module, "BRANCH_BYTES", branch_bytes)
    model = request.getfixturevalue(which)
    tol = 1e-4 if which == "float_model" else 2e-3
    prompt = tokenizer.encode("Which of these is a fruit? 0. car 1. apple 2. the moon 3. a chair. Answer:",
                              bos=True, eos=False)
    assert len(prompt) > CHUNK  # the second scoring reuses a cached chunk
    options = [tokenizer.encode(t, bos=False, eos=False) for t in
               (" 1", " apple", " the moon", " a wooden chair with four legs", " car")]
    assert sorted({len(o) for o in options})[0] == 1 and max(len(o) for o in options) >= 5
    scheduler = Scheduler(model, max_batch_size=2, max_seq_len=128, chunk=CHUNK)
    for attempt in range(2):
        seq = Sequence(GenerationSpec(prompt, 1, GREEDY, options=options), tokenizer, torch.Generator(), frozenset())
        scheduler.add(seq)
        while not seq.done:
            scheduler.step()
        assert seq.finish_reason == "stop" and seq.generated == []
        assert scheduler.prefix_hits == attempt
        for option, got in zip(options, seq.option_logprobs):
            want = brute_force_option_logprobs(model, prompt, option)
            assert len(got) == len(option)
            assert max(abs(a - b) for a, b in zip(got, want)) < tol, (option, got, want)
    warm = run(scheduler, tokenizer, prompt + options[1], 4)
    assert scheduler.prefix_hits == 2
    cold = run(Scheduler(model, max_batch_size=2, max_seq_len=128, chunk=CHUNK, prefix_cache=False), tokenizer,
               prompt + options[1], 4)
    assert warm.generated == cold.generated


def test_option_scoring_runs_beside_generation_and_rejects_bad_options(float_model, tokenizer):
    """A scoring sequence admitted while another generates leaves the other's greedy tokens unchanged; options
    that are empty, too long or outside the vocabulary are refused with a message that names them."""
    from llama3.errors import GenerationError

    prompt = tokenizer.encode("Pick a colour:", bos=True, eos=False)
    alone = run(Scheduler(float_model, max_batch_size=2, max_seq_len=64, chunk=CHUNK), tokenizer, prompt, 12)
    scheduler = Scheduler(float_model, max_batch_size=2, max_seq_len=64, chunk=CHUNK)
    gen = Sequence(GenerationSpec(prompt, 12, GREEDY), tokenizer, torch.Generator(), frozenset())
    scheduler.add(gen)
    scheduler.step()
    score = Sequence(GenerationSpec(prompt, 1, GREEDY, options=[[5, 6], [7]]), tokenizer, torch.Generator(),
                     frozenset())
    scheduler.add(score)
    while not gen.done or not score.done:
        scheduler.step()
    assert gen.generated == alone.generated
    assert [len(o) for o in score.option_logprobs] == [2, 1]
    for options, needle in (([[]], "option 0"), ([[1], [10**7]], "option 1"), ([[1] * 80], "at most")):
        bad = Sequence(GenerationSpec(prompt, 1, GREEDY, options=options), tokenizer, torch.Generator(), frozenset())
        with pytest.raises(GenerationError, match=needle):
            scheduler.add(bad)


@pytest.mark.parametrize("shared", [10, 21])
def test_a_declared_shared_prefix_shorter_than_a_chunk_is_reused_exactly(shared, float_model, tokenizer):
    """Prompts that declare the same shared prefix (10 tokens: inside the first chunk; 21: one whole chunk and 5
    more) reuse exactly its tokens; the logits equal a cold prefill of the same prompt with the same declaration
    bit for bit, and one without it within float rounding. A prompt declaring another prefix reuses only the
    chunks its own prefill would have computed."""
    def spec(prompt, declared):
        return GenerationSpec(prompt, 3, GREEDY, processors=(recorder := Recorder(),), shared_prefix=declared), recorder

    prefix = list(range(1000, 1000 + shared))
    first, second = prefix + list(range(2000, 2030)), prefix + list(range(3000, 3025))
    warm = Scheduler(float_model, max_batch_size=1, max_seq_len=128, chunk=CHUNK)
    for prompt in (first, second):
        s, _ = spec(prompt, shared)
        seq = Sequence(s, tokenizer, torch.Generator(), frozenset())
        warm.add(seq)
        while not seq.done:
            warm.step()
    assert warm.prefix_hits == 1 and warm.prefix_tokens == shared
    # The same prompt declaring no shared prefix: only the whole chunks at multiples of CHUNK are common.
    s, _ = spec(second, 0)
    third = Sequence(s, tokenizer, torch.Generator(), frozenset())  # (before the cold runs below claim the model)
    warm.add(third)
    while not third.done:
        warm.step()
    assert warm.prefix_tokens == shared + (CHUNK if shared > CHUNK else 0)
    hit_rows = seq.spec.processors[0].rows
    for declared, exact in ((shared, True), (0, False)):
        cold = Scheduler(float_model, max_batch_size=1, max_seq_len=128, chunk=CHUNK, prefix_cache=False)
        s, recorder = spec(second, declared)
        other = Sequence(s, tokenizer, torch.Generator(), frozenset())
        cold.add(other)
        while not other.done:
            cold.step()
        assert other.generated == seq.generated
        for a, b in zip(hit_rows, recorder.rows):
            assert (torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-3)), (exact, (a - b).abs().max())
    with pytest.raises(GenerationError, match="shared_prefix=99"):
        warm.add(Sequence(GenerationSpec(first, 2, GREEDY, shared_prefix=99), tokenizer, torch.Generator(), frozenset()))


def test_prompts_admitted_together_borrow_the_prefix_the_first_one_prefilled(float_model, tokenizer):
    """Three prompts with one declared shared prefix, queued at once into three slots: the first prefills it,
    the other two copy its chunks from that (still running) slot; the prefill's logits equal a cold prefill of
    the same prompt alone bit for bit, and the greedy tokens are the same."""
    prefix = list(range(1000, 1021))  # a whole chunk and 5 tokens
    prompts = [prefix + list(range(2000 + 100 * i, 2000 + 100 * i + 9 + i)) for i in range(3)]
    warm = Scheduler(float_model, max_batch_size=3, max_seq_len=128, chunk=CHUNK)
    seqs = []
    for prompt in prompts:
        seqs.append(Sequence(GenerationSpec(prompt, 4, GREEDY, processors=(Recorder(),), shared_prefix=21), tokenizer,
                             torch.Generator(), frozenset()))
        warm.add(seqs[-1])
    while not all(s.done for s in seqs):
        warm.step()
    assert warm.prefix_hits == 2 and warm.prefix_tokens == 2 * 21
    for prompt, seq in zip(prompts, seqs):
        cold = Scheduler(float_model, max_batch_size=1, max_seq_len=128, chunk=CHUNK, prefix_cache=False)
        alone = Sequence(GenerationSpec(prompt, 4, GREEDY, processors=(Recorder(),), shared_prefix=21), tokenizer,
                         torch.Generator(), frozenset())
        cold.add(alone)
        while not alone.done:
            cold.step()
        assert alone.generated == seq.generated
        rows, alone_rows = seq.spec.processors[0].rows, alone.spec.processors[0].rows
        assert torch.equal(rows[0], alone_rows[0])  # the prefill's logits: bit for bit
        # Later rows come from batched decode steps (three rows here, one alone): float GEMMs round per batch size.
        assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(rows[1:], alone_rows[1:]))


def test_branches_that_cannot_be_allocated_leave_the_cache_as_it_was(float_model, tokenizer, monkeypatch):
    """Running out of memory while the scratch caches are made fails that scoring alone: every layer keeps its
    real KV cache, and the next sequence answers as a cold one does."""
    import llama3.model as model_module

    scheduler = Scheduler(float_model, max_batch_size=2, max_seq_len=64, chunk=CHUNK)
    made = []
    real = model_module.KVCache

    def failing(*args, **kwargs):
        made.append(1)
        if len(made) == 2:
            raise MemoryError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "KVCache", failing)
    prompt = tokenizer.encode("Pick a colour:", bos=True, eos=False)
    score = Sequence(GenerationSpec(prompt, 1, GREEDY, options=[[5, 6], [7, 8, 9]]), tokenizer, torch.Generator(),
                     frozenset())
    scheduler.add(score)
    while not score.done:
        scheduler.step()
    assert score.finish_reason == "error" and "out of memory" in score.error
    monkeypatch.setattr(model_module, "KVCache", real)
    assert all(layer.attention.cache.k.shape == (2, 2, 64, 16) for layer in float_model.layers)
    assert (float_model.cache_batch, float_model.cache_len) == (2, 64)
    again = run(scheduler, tokenizer, prompt, 5)
    cold = run(Scheduler(float_model, max_batch_size=2, max_seq_len=64, chunk=CHUNK, prefix_cache=False), tokenizer,
               prompt, 5)
    assert again.generated == cold.generated
