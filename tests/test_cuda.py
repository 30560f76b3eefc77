"""The CUDA path: GGUF weights dequantized once to bfloat16, the compiled decode step, the decoding core.

Skipped without a GPU (``benchmarks/gpu.sh`` runs these on one). Oracles: the CPU float32 path on the same
file, and the same generation without the compiled step.
"""

from __future__ import annotations

import pytest
import torch

from gguf_utils import write_tiny_gguf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("cuda") / "tiny.gguf", seed=7)


def test_gguf_on_cuda_is_dense_bfloat16_and_matches_the_cpu(tiny_gguf):
    from llama3.checkpoint import load_model

    gpu = load_model(tiny_gguf, device="cuda")
    cpu = load_model(tiny_gguf, device="cpu", quantize=None)
    assert gpu.norm.weight.dtype == torch.bfloat16 and gpu.decode_kernel is None
    assert all(type(m) is torch.nn.Linear for m in gpu.modules() if "Linear" in type(m).__name__)
    tokens = torch.randint(0, cpu.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = cpu(tokens)
        got = gpu(tokens.cuda()).cpu()
    # bfloat16 weights and activations: a few units of bfloat16's roundoff of the logits' scale.
    assert (got - want).abs().max() <= 0.05 * want.abs().max() + 0.05


def test_compiled_decode_on_cuda_matches_eager(tiny_gguf):
    from llama3.generation import Llama
    from llama3.sequence import GenerationSpec

    eager = Llama.build(tiny_gguf, max_seq_len=128, max_batch_size=4, device="cuda")
    fast = Llama.build(tiny_gguf, max_seq_len=128, max_batch_size=4, device="cuda", compile=True)
    assert type(fast.model.decode_kernel).__name__ == "CompiledDecode"
    prompts = [[1, 5, 9, 13], [1, 7, 7, 7, 7, 7, 2, 3], [1, 2]]
    specs = [GenerationSpec(p, 24, logprobs=True, top_logprobs=2) for p in prompts]
    for a, b in zip(eager.run(specs), fast.run(specs), strict=True):
        for k, (x, y) in enumerate(zip(a.generated, b.generated, strict=True)):
            if x != y:  # only where bfloat16 rounding can decide
                (_, first), (_, second) = a.entries[k].top
                assert first - second < 0.1, (k, first - second)
                break


def test_prefix_cache_and_batching_on_cuda(tiny_gguf):
    from llama3.generation import Llama

    llm = Llama.build(tiny_gguf, max_seq_len=256, max_batch_size=3, device="cuda", compile=True)
    prompt = [1] + list(range(10, 210))
    first = llm.generate([prompt], max_gen_len=8, temperature=0.0)[0]
    again = llm.generate([prompt, prompt[:50], [1, 4]], max_gen_len=8, temperature=0.0)[0]
    assert again[0] == first[0] and llm.scheduler.stats()["prefix_cache_hits"] >= 1
