"""The compiled decode step (``llama3.compiled``, the GPU path) computes what the layers compute, on the CPU.

Oracles: the same model run layer by layer (eager), the KV cache's untouched regions, and the same generation
without the compiled step. CUDA-only checks live in tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from llama3 import compiled
from llama3.config import ModelConfig
from llama3.model import Transformer
from llama3.sequence import GenerationSpec

pytestmark = pytest.mark.slow  # inductor compiles C++ for each padded batch shape (tens of seconds on 2 cores)


def tiny_model() -> Transformer:
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def test_padded_sizes():
    assert [compiled._padded(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert compiled._padded(5, 6) == 6


@torch.inference_mode()
def test_compiled_steps_match_the_layers_and_leave_free_rows_alone():
    eager, fast = tiny_model(), tiny_model()
    for m in (eager, fast):
        m.setup_cache(4, 48)
    assert compiled.enable(fast) and not compiled.enable(fast)  # once
    rng = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 97, (4, 20), generator=rng)
    for m in (eager, fast):
        for row in range(4):  # prefill every row (row 3 plays a free slot holding a cached prompt)
            m(prompts[row : row + 1, : 10 + row], 0, cache_rows=torch.tensor([row]))
    kept = fast.layers[0].attention.cache.k[3, :, :13].clone()
    positions = torch.tensor([10, 11, 12])
    for step in range(5):  # 3 busy rows: padded to 4, the pad row writes row 3's last position only
        tokens = torch.randint(0, 97, (3, 1), generator=rng)
        want = eager(tokens, positions + step, last_only=True)
        got = fast(tokens, positions + step, last_only=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    one = torch.randint(0, 97, (1, 1), generator=rng)
    torch.testing.assert_close(fast(one, torch.tensor([30]), last_only=True),
                               eager(one, torch.tensor([30]), last_only=True), rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.layers[0].attention.cache.k[3, :, :13], kept)
    for a, b in zip(eager.layers, fast.layers):  # every key and value the busy rows wrote agrees
        torch.testing.assert_close(b.attention.cache.k[:3, :, :40], a.attention.cache.k[:3, :, :40], rtol=1e-4, atol=1e-4)


def test_generation_with_the_compiled_step_matches():
    from llama3.assets import default_model_path
    from llama3.generation import Llama
    from llama3.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, hidden_dim=128,
                         max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompts = [tokenizer.encode(t, bos=True, eos=False) for t in ("Hello there", "A longer prompt about cats", "x")]
    specs = [GenerationSpec(p, 12, logprobs=True, top_logprobs=2) for p in prompts]
    plain = Llama(model, tokenizer, 96, 4).run(specs)
    compiled.enable(model)
    fast = Llama(model, tokenizer, 96, 4).run(specs)
    for a, b in zip(plain, fast, strict=True):
        # Greedy tokens agree except where the top two logits lie within the two paths' rounding.
        for k, (x, y) in enumerate(zip(a.generated, b.generated, strict=True)):
            if x != y:
                (_, first), (_, second) = a.entries[k].top
                assert first - second < 1e-4, (k, first - second)
                break
