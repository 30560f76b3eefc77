"""The fused single-token step (llama3/quant/decode.cpp) against the layers it replaces and the float model.

Both quantized paths code activations to int16 per block before the integer dot products, so they round at
different points; what must hold is that the fused path is as close to the float (dequantized) model as the
layer-by-layer quantized path is, that it writes the same cache entries, and that a row's result does not
depend on the other rows of its batch.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from conftest import tiny_hf_config
from gguf_utils import random_blocks, write_gguf
from transformers import LlamaForCausalLM

import llama3
from llama3.quant import native
from llama3.quant.fused import FusedDecode

pytestmark = pytest.mark.skipif(not native.available(), reason="native CPU kernels unavailable")

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [8, 1], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]


@pytest.fixture(scope="module")
def tiny_hf() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_hf_config(
        vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=3, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_hf_k() -> LlamaForCausalLM:
    """Rows of 256 weights, the K-quants' super-block (head_dim 64, as in Llama 3.2 1B)."""
    torch.manual_seed(1)
    cfg = tiny_hf_config(
        vocab_size=256, hidden_size=256, intermediate_size=512, max_position_embeddings=128, tie_word_embeddings=True
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=[Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def gguf_path(request, tmp_path_factory):
    # K-quant blocks are random valid bytes (gguf-py cannot quantize into them); the float reference
    # dequantizes the very same blocks.
    hf = request.getfixturevalue("tiny_hf_k" if request.param in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else "tiny_hf")
    return write_gguf(tmp_path_factory.mktemp("fused") / f"tiny-{request.param.name}.gguf", hf, request.param)


class Counting:
    """A decode kernel wrapper that counts the steps it actually ran (so a silently unusable kernel fails)."""

    def __init__(self, kernel: FusedDecode) -> None:
        self.kernel, self.calls = kernel, 0

    def usable(self, model, h):
        return self.kernel.usable(model, h)

    def __call__(self, *args):
        self.calls += 1
        return self.kernel(*args)


def decode(model, kernel, forced: torch.Tensor, prompts=PROMPTS, rows=None):
    """Prefill each prompt into its cache row, then decode len(forced) steps feeding the given tokens.

    Returns the per-step logits (steps, B, V) and the caches. A given kernel must run every step."""
    counting = Counting(kernel) if kernel is not None else None
    model.decode_kernel = counting
    model.setup_cache(len(PROMPTS), 64)
    rows = list(range(len(prompts))) if rows is None else rows
    with torch.inference_mode():
        for row, prompt in zip(rows, prompts):
            model(torch.tensor([prompt]), 0, last_only=True, cache_rows=torch.tensor([row]))
        positions = torch.tensor([len(p) for p in prompts])
        steps = []
        for tokens in forced:
            steps.append(model(tokens[:, None], positions, last_only=True, cache_rows=torch.tensor(rows))[:, -1])
            positions = positions + 1
    caches = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
    assert counting is None or counting.calls == len(forced)  # prompts go through the layers, steps do not
    model.decode_kernel = kernel
    return torch.stack(steps), caches


def test_fused_step_matches_layers_and_float_model(gguf_path):
    model = llama3.load_model(gguf_path, device="cpu", dtype=torch.float32)
    kernel = model.decode_kernel
    assert isinstance(kernel, FusedDecode)
    floats = llama3.load_model(gguf_path, device="cpu", dtype=torch.float32, quantize=None)
    assert floats.decode_kernel is None
    forced = torch.randint(0, 256, (10, len(PROMPTS)), generator=torch.Generator().manual_seed(1))

    fused, fused_cache = decode(model, kernel, forced)
    layers, layers_cache = decode(model, None, forced)
    reference, _ = decode(floats, None, forced)

    scale = reference.abs().max().item()
    err_fused = (fused - reference).abs().max().item()
    err_layers = (layers - reference).abs().max().item()
    assert err_fused <= 2 * err_layers + 1e-5 * scale, (err_fused, err_layers)
    assert (fused - layers).abs().max().item() <= 1e-3 * scale
    assert torch.equal(fused.argmax(-1), layers.argmax(-1))
    for (kf, vf), (kl, vl) in zip(fused_cache, layers_cache):
        assert torch.allclose(kf, kl, atol=1e-3 * kl.abs().max().item())
        assert torch.allclose(vf, vl, atol=1e-3 * vl.abs().max().item())


def test_rows_are_independent_of_their_batch(gguf_path):
    """Bit-identical logits for a row decoded alone and inside a batch, in another cache row."""
    model = llama3.load_model(gguf_path, device="cpu", dtype=torch.float32)
    forced = torch.randint(0, 256, (6, len(PROMPTS)), generator=torch.Generator().manual_seed(2))
    batch, _ = decode(model, model.decode_kernel, forced)
    alone, _ = decode(model, model.decode_kernel, forced[:, 2:3], prompts=PROMPTS[2:], rows=[0])
    assert torch.equal(batch[:, 2], alone[:, 0])


def test_not_used_where_it_does_not_apply(gguf_path, monkeypatch):
    assert llama3.load_model(gguf_path, device="cpu", dtype=torch.bfloat16).decode_kernel is None
    monkeypatch.setenv("LLAMA3_FUSED_DECODE", "0")
    assert llama3.load_model(gguf_path, device="cpu", dtype=torch.float32).decode_kernel is None


def test_usable_only_for_what_it_computes(gguf_path):
    model = llama3.load_model(gguf_path, device="cpu", dtype=torch.float32)
    model.setup_cache(1, 16)
    kernel = model.decode_kernel
    h = torch.zeros(1, 1, model.config.dim)
    assert kernel.usable(model, h)
    assert not kernel.usable(model, h.bfloat16())
    with torch.enable_grad():
        assert not kernel.usable(model, h.clone().requires_grad_())  # the native op has no backward
    attn = model.layers[0].attention
    blocks = attn.wq.blocks
    attn.wq.blocks = blocks.clone()  # weights replaced after loading: the kernel's copy is stale
    assert not kernel.usable(model, h)
    attn.wq.blocks = blocks
    model.clear_cache()
    assert not kernel.usable(model, h)  # no cache: nothing to attend to


def test_kernel_not_used_when_asked_for_more_cache_than_the_step(gguf_path):
    """With an int start and an explicit kv_len past the step, the layers attend to those slots too."""
    model = llama3.load_model(gguf_path, device="cpu", dtype=torch.float32)
    model.setup_cache(1, 16)
    counting = Counting(model.decode_kernel)
    model.decode_kernel = counting
    with torch.inference_mode():
        model(torch.tensor([[3, 4, 5]]), 0)
        model(torch.tensor([[6]]), 3, kv_len=4)
        assert counting.calls == 1
        model(torch.tensor([[7]]), 4, kv_len=9)
        assert counting.calls == 1


def test_mixed_block_types_in_a_layer(tiny_hf_k, tmp_path):
    """A Q4_K_M-style file: Q4_K matrices with Q6_K wv and w2 and a Q5_K wk (several kernel calls per projection)."""
    overrides = {}
    for i in range(tiny_hf_k.config.num_hidden_layers):
        for name, rows, cols, qtype in (("attn_v", 128, 256, Q.Q6_K), ("ffn_down", 256, 512, Q.Q6_K),
                                        ("attn_k", 128, 256, Q.Q5_K)):  # fmt: skip
            overrides[f"blk.{i}.{name}.weight"] = (random_blocks(rows, cols, qtype, seed=i), qtype)
    path = write_gguf(tmp_path / "mixed.gguf", tiny_hf_k, Q.Q4_K, drop=tuple(overrides), extra_tensors=overrides)
    model = llama3.load_model(path, device="cpu", dtype=torch.float32)
    assert {model.layers[0].attention.wv.ggml_type, model.layers[0].attention.wk.ggml_type} == {Q.Q6_K, Q.Q5_K}
    floats = llama3.load_model(path, device="cpu", dtype=torch.float32, quantize=None)
    forced = torch.randint(0, 256, (6, len(PROMPTS)), generator=torch.Generator().manual_seed(3))
    fused, _ = decode(model, model.decode_kernel, forced)
    layers, _ = decode(model, None, forced)
    reference, _ = decode(floats, None, forced)
    scale = reference.abs().max().item()
    assert (fused - reference).abs().max().item() <= 2 * (layers - reference).abs().max().item() + 1e-5 * scale
    assert torch.equal(fused.argmax(-1), layers.argmax(-1))


def test_op_rejects_positions_outside_the_cache(gguf_path):
    model = llama3.load_model(gguf_path, device="cpu", dtype=torch.float32)
    model.setup_cache(2, 16)
    kernel = model.decode_kernel
    h = torch.zeros(1, 1, model.config.dim)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(model, h, torch.tensor([16]), None)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(model, h, torch.tensor([3]), torch.tensor([2]))
