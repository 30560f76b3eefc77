"""Continuous-batching engine on a tiny random Llama with the default model's real tokenizer.

Oracles: a second copy of the model run without any KV cache (full causal forward of the whole sequence at every
step), and ``Llama.generate`` (the fixed-batch DecodeBatch path) for seeded sampling with penalties.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

import llama3.scheduler as scheduler_module
from llama3.assets import default_model_path
from llama3.config import ModelConfig
from llama3.engine import Engine, GenerationSpec, QueueFullError
from llama3.errors import GenerationError
from llama3.generation import Llama
from llama3.model import Transformer
from llama3.sampling import SamplingParams
from llama3.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0.0)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


def make_model(vocab: int) -> Transformer:
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128, max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tokenizer):
    return make_model(tokenizer.n_words).state_dict()


def model_from(weights, vocab: int) -> Transformer:
    model = make_model(vocab)
    model.load_state_dict(weights)
    return model


@pytest.fixture
def oracle(weights, tokenizer):
    """Cache-less copy: logits of the last position of the whole sequence, recomputed from scratch."""
    model = model_from(weights, tokenizer.n_words)

    @torch.inference_mode()
    def last_logits(tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([tokens]))[0, -1]

    return last_logits


@pytest.fixture
def make_engine(weights, tokenizer):
    engines = []

    def build(**kwargs) -> Engine:
        kwargs.setdefault("max_seq_len", 128)
        engine = Engine(model_from(weights, tokenizer.n_words), tokenizer, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.stop()


@dataclass
class Result:
    text: str = ""
    entries: list = field(default_factory=list)
    deltas: list = field(default_factory=list)
    finish: str | None = None
    tokens: int = 0
    error: str | None = None
    error_kind: str | None = None

    @property
    def ids(self) -> list[int]:
        return [e.token for e in self.entries]


async def collect(submission, on_delta=None) -> list[Result]:
    results = [Result() for _ in submission.sequences]

    async def run():
        async for index, delta in submission.events():
            r = results[index]
            r.text += delta.text
            r.entries += delta.logprobs
            r.deltas.append(delta.text)
            if delta.finish_reason:
                r.finish, r.tokens, r.error = delta.finish_reason, delta.completion_tokens, delta.error
                r.error_kind = delta.error_kind
            if on_delta is not None:
                await on_delta(index, delta)

    await asyncio.wait_for(run(), TIMEOUT)
    return results


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    words = ["alpha", "bravo charlie", "delta echo foxtrot golf", "hotel", "india juliet kilo lima mike november"]
    return [tokenizer.encode(f"{words[i % len(words)]} {i} " * (1 + i), bos=False, eos=False) for i in range(n)]


def check_greedy(oracle, prompt, result: Result, max_tokens: int, stop_tokens) -> None:
    """Every token is the oracle's argmax (to rounding) with its logprob; the end is a stop token or the budget."""
    seq = list(prompt)
    for entry in result.entries:
        logits = oracle(seq)
        assert logits[entry.token] >= logits.max() - 1e-4
        assert entry.logprob == pytest.approx(torch.log_softmax(logits, -1)[entry.token].item(), abs=1e-4)
        seq.append(entry.token)
    assert result.tokens == len(result.entries)
    if result.finish == "length":
        assert len(result.entries) == max_tokens
    else:
        assert result.finish == "stop"
        logits = oracle(seq)
        assert any(logits[t] >= logits.max() - 1e-4 for t in stop_tokens)


@pytest.mark.parametrize("chunk, per_step", [(256, 256), (8, 12)], ids=["whole-prompts", "chunked-interleaved"])
def test_staggered_greedy_requests_match_cacheless_oracle(make_engine, oracle, tokenizer, monkeypatch, chunk, per_step):
    """Sequences join a running batch at different times, wait for slots (3 slots, 6 sequences), and leave it;
    each must decode exactly as if it ran alone without a cache. With small chunks, prompts are prefilled a few
    tokens per iteration between decode steps of the others."""
    monkeypatch.setattr(scheduler_module, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS_PER_STEP", per_step)
    engine = make_engine(max_batch_size=3)
    prompts = prompts_for(tokenizer, 6)
    budgets = [5, 20, 9, 14, 3, 11]

    def spec(i):
        return GenerationSpec(prompts[i], budgets[i], GREEDY, logprobs=True)

    async def main():
        first = engine.submit([spec(0), spec(1)])
        later = []

        async def join(index, delta):
            if index == 1 and not later:  # sequence 1 is mid-generation: add four more
                later.append(engine.submit([spec(2), spec(3)]))
                later.append(engine.submit([spec(4), spec(5)]))

        head = await collect(first, join)
        tails = await asyncio.gather(*(collect(s) for s in later))
        return head + tails[0] + tails[1]

    results = asyncio.run(main())
    for i, result in enumerate(results):
        check_greedy(oracle, prompts[i], result, budgets[i], engine.stop_tokens)
        assert result.text == tokenizer.decode(result.ids, skip_special=True)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_llama_generate_decodes_at_the_right_positions(weights, oracle, tokenizer):
    """Regression: DecodeBatch wrote the first generated token one position too far (a hole in the KV cache)."""
    llm = Llama(model_from(weights, tokenizer.n_words), tokenizer, max_seq_len=128, max_batch_size=2)
    prompts = prompts_for(tokenizer, 2)
    tokens, _ = llm.generate(prompts, 6, temperature=0.0, logprobs=True)
    for prompt, out in zip(prompts, tokens):
        seq = list(prompt)
        for token in out:
            logits = oracle(seq)
            assert logits[token] >= logits.max() - 1e-4
            seq.append(token)


def test_seeded_sampling_matches_llama_generate_alone_and_batched(make_engine, weights, tokenizer):
    """Seed + penalties + bias: the engine equals Llama.generate (DecodeBatch) alone, and the same alongside others."""
    sampling = dict(temperature=0.9, top_p=0.95, presence_penalty=0.4, frequency_penalty=0.3,
                    logit_bias={17: 2.0}, seed=1234)
    prompt = prompts_for(tokenizer, 3)[2]
    llm = Llama(model_from(weights, tokenizer.n_words), tokenizer, max_seq_len=128, max_batch_size=1)
    sampling_kwargs = {k: v for k, v in sampling.items() if k not in ("temperature", "top_p")}
    expected = llm.generate([prompt], 16, sampling["temperature"], sampling["top_p"], **sampling_kwargs)[0][0]
    spec = GenerationSpec(prompt, 16, SamplingParams(**sampling), logprobs=True)

    engine = make_engine(max_batch_size=4)
    alone = asyncio.run(_one(engine, [spec]))[0]
    others = [GenerationSpec(p, 20, SamplingParams(temperature=1.0)) for p in prompts_for(tokenizer, 5)[1:]]

    async def crowded():
        noise = engine.submit(others[:2])
        await asyncio.sleep(0.05)
        target = engine.submit([spec])
        more = engine.submit(others[2:])
        out = await asyncio.gather(collect(target), collect(noise), collect(more))
        return out[0][0]

    batched = asyncio.run(crowded())
    assert alone.ids == expected
    assert batched.ids == alone.ids and batched.text == alone.text


async def _one(engine, specs):
    return await collect(engine.submit(specs))


def test_stop_strings_cut_text_and_hold_back_partial_matches(make_engine, tokenizer):
    engine = make_engine(max_batch_size=2)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog", bos=False, eos=False)
    budget = 30
    plain = asyncio.run(_one(engine, [GenerationSpec(prompt, budget, GREEDY, logprobs=True)]))[0]
    text = plain.text
    assert len(text) > 8, text
    start = len(text) // 2
    stop = text[start : start + 3]
    expected = text[: text.find(stop)]
    spec = GenerationSpec(prompt, budget, GREEDY, stop=[stop, "\x00never"], logprobs=True)
    cut = asyncio.run(_one(engine, [spec]))[0]
    assert cut.finish == "stop" and cut.text == expected
    # Logprob entries cover whole tokens before the stop string, and their texts concatenate into the output.
    assert "".join(e.text for e in cut.entries) == expected[: len("".join(e.text for e in cut.entries))]
    assert cut.ids == plain.ids[: len(cut.ids)]

    # A stop string whose beginning ends the output but which never completes: held back, then released.
    dangling = text[-1] + "\x00"
    held = asyncio.run(_one(engine, [GenerationSpec(prompt, budget, GREEDY, stop=[dangling])]))[0]
    assert held.text == text and held.finish == plain.finish
    if plain.finish == "length":
        assert held.deltas[-1].endswith(text[-1])  # released only by the final delta


def test_cancel_frees_the_slot_for_the_next_request(make_engine, tokenizer):
    engine = make_engine(max_batch_size=1, max_queue=2)
    prompt = prompts_for(tokenizer, 1)[0]
    never_stop = SamplingParams(temperature=0.0, logit_bias={t: -100.0 for t in engine.stop_tokens})
    long = GenerationSpec(prompt, 120, never_stop)

    async def main():
        first = engine.submit([long])
        waiting = engine.submit([long])  # queued behind it; cancelled while waiting
        seen = []

        async def cancel_after_two(index, delta):
            seen.append(delta)
            if len(seen) == 2:
                first.cancel()

        waiting.cancel()
        r_first = await collect(first, cancel_after_two)
        r_waiting = await collect(waiting)
        r_next = await collect(engine.submit([GenerationSpec(prompt, 4, GREEDY)]))
        return r_first[0], r_waiting[0], r_next[0]

    first, waiting, fresh = asyncio.run(main())
    assert first.finish == "cancelled" and first.tokens < 120
    assert waiting.finish == "cancelled" and waiting.tokens == 0
    assert fresh.finish == "length" and fresh.tokens == 4
    assert engine.stats()["running"] == 0


def test_queue_bound_rejects_beyond_slots_plus_queue(make_engine, tokenizer):
    engine = make_engine(max_batch_size=1, max_queue=1)
    prompt = prompts_for(tokenizer, 1)[0]
    never_stop = SamplingParams(temperature=0.0, logit_bias={t: -100.0 for t in engine.stop_tokens})
    spec = GenerationSpec(prompt, 100, never_stop)

    async def main():
        accepted = [engine.submit([spec]), engine.submit([spec])]  # one slot + one queue place
        with pytest.raises(QueueFullError, match="max-queue 1"):
            engine.submit([spec])
        with pytest.raises(QueueFullError):
            engine.submit([spec, spec])
        for s in accepted:
            s.cancel()
        return await asyncio.gather(*(collect(s) for s in accepted))

    results = asyncio.run(main())
    assert all(r[0].finish == "cancelled" for r in results)


def test_logit_bias_top_logprobs_and_budget(make_engine, oracle, tokenizer):
    engine = make_engine(max_batch_size=2)
    prompt = prompts_for(tokenizer, 2)[1]
    forced = tokenizer.encode("!", bos=False, eos=False)[0]
    spec_forced = GenerationSpec(prompt, 6, SamplingParams(temperature=0.0, logit_bias={forced: 100.0}))
    spec_top = GenerationSpec(prompt, 4, GREEDY, logprobs=True, top_logprobs=5)
    forced_r, top_r = asyncio.run(_one(engine, [spec_forced, spec_top]))
    assert forced_r.text == "!" * 6 and forced_r.finish == "length" and forced_r.tokens == 6
    seq = list(prompt)
    for entry in top_r.entries:
        expected = torch.log_softmax(oracle(seq), -1)
        values, ids = torch.topk(expected, 5)
        assert [t for t, _ in entry.top][:1] == ids.tolist()[:1]
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        seq.append(entry.token)


def test_invalid_specs_raise_generation_error(make_engine, tokenizer):
    engine = make_engine(max_batch_size=1, max_seq_len=32)

    async def submit(spec):
        return engine.submit([spec])

    with pytest.raises(GenerationError, match="at most 2 "):
        asyncio.run(submit(GenerationSpec([5] * 30, 8)))
    with pytest.raises(GenerationError, match="the prompt has 32 tokens"):
        asyncio.run(submit(GenerationSpec([5] * 32, 1)))
    with pytest.raises(GenerationError, match="empty"):
        asyncio.run(submit(GenerationSpec([], 1)))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        asyncio.run(submit(GenerationSpec([tokenizer.n_words], 1)))


def test_a_failing_forward_fails_only_its_request(make_engine, tokenizer, monkeypatch):
    engine = make_engine(max_batch_size=2)
    real_forward = engine.model.forward

    def flaky(tokens, *args, **kwargs):
        if tokens.shape[1] == 7:  # the prefill of the 7-token prompt below
            raise RuntimeError("simulated kernel failure")
        return real_forward(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", flaky)
    bad, good = asyncio.run(_one(engine, [GenerationSpec([5] * 7, 4, GREEDY), GenerationSpec([5] * 5, 4, GREEDY)]))
    assert bad.finish == "error" and "simulated kernel failure" in bad.error
    assert good.finish == "length" and good.tokens == 4
    assert engine.alive


def test_one_requests_failure_or_extreme_values_never_touch_the_others(make_engine, tokenizer):
    """Values at the edge of what the API accepts run (a vanishing temperature is greedy), a sequence that cannot
    go on (every token forbidden) fails alone with a request error, and the innocent sequences beside them give
    what they give alone: the same ids and text, logprobs to float rounding (this float model's batched matmuls
    round differently per batch size; the quantized kernels are bit-exact, see test_server)."""
    prompts = prompts_for(tokenizer, 4)
    innocent = [GenerationSpec(p, 12, SamplingParams(temperature=0.8, seed=i), logprobs=True, top_logprobs=2)
                for i, p in enumerate(prompts[:3])]
    forbid_all = {t: -1e300 for t in range(tokenizer.n_words)}  # -inf in float32
    extreme = [
        GenerationSpec(prompts[3], 12, SamplingParams(temperature=1e-37, seed=7)),
        GenerationSpec(prompts[3], 12, SamplingParams(temperature=5e-324, seed=7)),
        GenerationSpec(prompts[3], 12, SamplingParams(temperature=1.0, repetition_penalty=1e-300, seed=7)),
        GenerationSpec(prompts[3], 12, SamplingParams(temperature=1.0, repetition_penalty=1e300, seed=7)),
    ]
    bad = GenerationSpec(prompts[3], 12, SamplingParams(temperature=1.0, logit_bias=forbid_all, seed=7))
    engine = make_engine(max_batch_size=8)
    alone = [asyncio.run(_one(engine, [spec]))[0] for spec in innocent]
    greedy = asyncio.run(_one(engine, [GenerationSpec(prompts[3], 12, GREEDY)]))[0]

    async def crowded():
        subs = [engine.submit([spec]) for spec in [innocent[0], bad, innocent[1], *extreme, innocent[2]]]
        return [r[0] for r in await asyncio.gather(*(collect(s) for s in subs))]

    together = asyncio.run(crowded())
    failed, tiny_t, tinier_t, small_rep, big_rep = together[1], together[3], together[4], together[5], together[6]
    assert failed.finish == "error" and "forbids every token" in failed.error and failed.tokens == 0
    assert failed.error_kind == "request"
    for result, reference in zip([together[0], together[2], together[7]], alone):
        assert result.finish == reference.finish and result.ids == reference.ids and result.text == reference.text
        for got, want in zip(result.entries, reference.entries):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
    assert tiny_t.text == tinier_t.text == greedy.text  # a vanishing temperature is the greedy limit
    for result in (small_rep, big_rep):
        assert result.finish in ("stop", "length") and result.error is None
    assert engine.alive
