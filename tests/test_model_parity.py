"""Logit parity of HF- and Meta-format checkpoints with transformers' LlamaForCausalLM, and KV-cache decoding.

Every checkpoint here is written by transformers (``save_pretrained``) or by ``conftest.save_meta_checkpoint``
(its own HF -> Meta conversion and fairscale split), never by llama3; the oracle is transformers' forward.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    make_reference_model,
    reference_logits,
    save_hf_checkpoint,
    save_meta_checkpoint,
    tiny_hf_config,
)

import llama3
from llama3 import ModelConfig, RopeScaling
from llama3.checkpoint import build_model, read_checkpoint
from llama3.checkpoint.hf import hf_config_to_model_config
from llama3.checkpoint.meta import params_to_config

TOL = 1e-4
SEQ = 64  # longer than the scaled variants' 32-token "original" context, so rope scaling shapes the logits
# A short original context makes the llama3 band edges (8 and 32 positions) fall among head_dim 16's wavelengths.
SHORT_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
VARIANTS = {
    "untied": dict(tie_word_embeddings=False),
    "untied-scaled": dict(tie_word_embeddings=False, rope_scaling=SHORT_ROPE),
    "tied": dict(tie_word_embeddings=True),
    "tied-scaled": dict(tie_word_embeddings=True, rope_scaling=SHORT_ROPE),
}
FORMATS = ("hf", "hf-sharded", "meta-1", "meta-2")


@pytest.fixture(scope="session")
def references():
    """variant name -> (transformers model, tokens (3, SEQ), reference logits), built once per session."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model = make_reference_model(tiny_hf_config(rope_theta=10000.0, **VARIANTS[variant]), seed=7)
            tokens = torch.randint(0, model.config.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(3))
            cache[variant] = (model, tokens, reference_logits(model, tokens))
        return cache[variant]

    return get


def write(model, fmt: str, directory: Path) -> Path:
    if fmt == "hf":
        return save_hf_checkpoint(model, directory)
    if fmt == "hf-sharded":  # bf16, as hub checkpoints are, and small shards so the index is used
        path = save_hf_checkpoint(model, directory, max_shard_size="100KB", dtype=torch.bfloat16)
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
        return path
    return save_meta_checkpoint(model, directory, n_shards=int(fmt[-1]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(references, tmp_path, variant, fmt):
    model, tokens, expected = references(variant)
    path = write(model, fmt, tmp_path / fmt)
    config, _ = read_checkpoint(path)
    assert config.tie_embeddings == model.config.tie_word_embeddings
    assert (config.rope_scaling is not None) == ("scaled" in variant)
    ours = llama3.load_model(path, device="cpu", dtype=torch.float32)
    logits = ours(tokens)
    diff = (logits - expected).abs().max().item()
    print(f"max|logit diff| {variant:14s} {fmt:10s} {diff:.3g}")
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert diff < TOL


def test_rope_scaling_is_in_play(references):
    """The scaled variants would fail parity if scaling were ignored: same weights, no scaling, other logits."""
    model, tokens, expected = references("untied-scaled")
    unscaled = make_reference_model(tiny_hf_config(rope_theta=10000.0, tie_word_embeddings=False), seed=0)
    unscaled.load_state_dict(model.state_dict())
    assert (reference_logits(unscaled, tokens) - expected).abs().max().item() > 100 * TOL


def test_hf_head_dim_override(tmp_path):
    """HF's head_dim may differ from hidden_size / heads (here 32 vs 16)."""
    model = make_reference_model(tiny_hf_config(head_dim=32, rope_scaling=SHORT_ROPE, rope_theta=10000.0), seed=5)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = llama3.load_model(save_hf_checkpoint(model, tmp_path), device="cpu", dtype=torch.float32)
    assert ours.config.head_dim == 32
    assert (ours(tokens) - reference_logits(model, tokens)).abs().max().item() < TOL


@pytest.mark.parametrize("fixture", ["hf_llama_dir", "meta_llama_dir"])
def test_full_vocab_fixtures_match_transformers(request, tiny_reference, fixture):
    """The shared fixtures (vocab 128256, Llama 3.1 rope defaults) load and match their transformers model."""
    path = request.getfixturevalue(fixture)
    tokens = torch.randint(0, 128256, (2, 160), generator=torch.Generator().manual_seed(11))
    expected = reference_logits(tiny_reference, tokens)
    config, state = read_checkpoint(path)
    assert config.rope_scaling == RopeScaling() and config.max_seq_len == 131072
    ours = build_model(config, state, device="cpu", dtype=torch.float32)
    diff = (ours(tokens) - expected).abs().max().item()
    print(f"max|logit diff| full-vocab {fixture}: {diff:.3g}")
    assert diff < TOL
    # With the default 8192-token original context only the slow frequencies change; at 160 positions
    # that still moves the logits far beyond the tolerance, so the comparison above covers the scaling.
    plain = build_model(dataclasses.replace(config, rope_scaling=None), state, device="cpu", dtype=torch.float32)
    assert (plain(tokens) - expected).abs().max().item() > 10 * TOL


def test_meta_fixture_is_a_complete_download(meta_llama_dir):
    from llama3.assets import llama3_tokenizer_model

    assert {p.name for p in meta_llama_dir.iterdir()} == {"params.json", "consolidated.00.pth", "tokenizer.model"}
    assert (meta_llama_dir / "tokenizer.model").read_bytes() == llama3_tokenizer_model().read_bytes()
    assert json.loads((meta_llama_dir / "params.json").read_text())["use_scaled_rope"] is True


# --- KV-cache decoding --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(references, tmp_path_factory):
    model, _, _ = references("untied-scaled")
    path = save_meta_checkpoint(model, tmp_path_factory.mktemp("decode"), n_shards=2)
    return model, llama3.load_model(path, device="cpu", dtype=torch.float32)


def test_incremental_decoding_equals_full_forward(decoder):
    reference, ours = decoder
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(21))
    expected = reference_logits(reference, tokens)
    ours.clear_cache()
    full = ours(tokens)
    assert (full - expected).abs().max().item() < TOL
    ours.setup_cache(max_batch_size=3, max_seq_len=56)
    try:
        prefix = 10
        last = ours(tokens[:, :prefix], 0, last_only=True)
        assert last.shape == (2, 1, 512)
        assert (last[:, 0] - full[:, prefix - 1]).abs().max().item() < TOL
        for pos in range(prefix, tokens.shape[1]):
            step = ours(tokens[:, pos : pos + 1], pos)
            assert (step[:, 0] - full[:, pos]).abs().max().item() < TOL, pos
            assert (step[:, 0] - expected[:, pos]).abs().max().item() < TOL, pos
    finally:
        ours.clear_cache()


def test_per_row_start_positions(decoder):
    """Continuous batching: row 0 continues its sequence while row 1 restarts at position 0 over stale cache."""
    reference, ours = decoder
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, 512, (2, 44), generator=gen)
    c = torch.randint(0, 512, (1, 30), generator=gen)
    ours.clear_cache()
    full_a, full_c = ours(a), ours(c)
    ref_a, ref_c = reference_logits(reference, a), reference_logits(reference, c)
    ours.setup_cache(max_batch_size=2, max_seq_len=48)
    try:
        ours(a[:, :12], 0)  # both rows hold 12 positions of `a`
        # Row 0 advances 5 tokens from position 12; row 1 starts `c` at 0 (its old entries must be masked).
        chunk = ours(torch.stack([a[0, 12:17], c[0, 0:5]]), torch.tensor([12, 0]))
        assert (chunk[0] - full_a[0, 12:17]).abs().max().item() < TOL
        assert (chunk[1] - full_c[0, 0:5]).abs().max().item() < TOL
        for t in range(5, 30):
            step = ours(torch.stack([a[0, 12 + t : 13 + t], c[0, t : t + 1]]), torch.tensor([12 + t, t]))
            assert (step[0, 0] - full_a[0, 12 + t]).abs().max().item() < TOL, t
            assert (step[1, 0] - full_c[0, t]).abs().max().item() < TOL, t
            assert (step[0, 0] - ref_a[0, 12 + t]).abs().max().item() < TOL, t
            assert (step[1, 0] - ref_c[0, t]).abs().max().item() < TOL, t
    finally:
        ours.clear_cache()


# --- config mapping -----------------------------------------------------------------------------------


def test_meta_params_mapping():
    """Meta's 8B params.json: every key lands in ModelConfig; 3.1's use_scaled_rope gives the defaults."""
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "max_batch_size": 4, "some_future_key": [1, 2]}
    config = params_to_config(params, Path("params.json"))
    assert (config.dim, config.n_layers, config.n_heads, config.kv_heads) == (4096, 32, 32, 8)
    assert config.ffn_hidden_dim == 14336  # the reference's 8B FFN width
    assert config.norm_eps == 1e-5 and config.rope_theta == 500000.0 and not config.tie_embeddings
    assert config.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)
    assert config.extra == {"max_batch_size": 4, "some_future_key": [1, 2]}
    plain = params_to_config({k: v for k, v in params.items() if k != "use_scaled_rope"}, Path("params.json"))
    assert plain.rope_scaling is None and plain.max_seq_len == 8192
    # llama-models spells single overrides as rope_scaling_factor / rope_high_freq_factor.
    custom = params_to_config({**params, "rope_scaling_factor": 32.0, "rope_high_freq_factor": 4.0}, Path("p"))
    assert custom.rope_scaling == RopeScaling(factor=32.0)


def test_hf_config_mapping_both_transformers_spellings():
    """transformers 4 (rope_theta + rope_scaling with "type") and 5 (rope_parameters) configs mean the same."""
    base = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": 8192, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True, "max_position_embeddings": 131072, "head_dim": 64, "eos_token_id": 128001}
    rope = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v4 = hf_config_to_model_config(
        {**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **rope}}, Path("c"))
    v5 = hf_config_to_model_config(
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **rope}}, Path("c"))
    assert v4 == v5
    assert v5 == ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                             norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
                             tie_embeddings=True, max_seq_len=131072)
    assert v5.extra == {"eos_token_id": 128001}
    default = hf_config_to_model_config(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, Path("c"))
    assert default.rope_scaling is None and default.rope_theta == 1e4
