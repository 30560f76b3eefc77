"""Bad Hugging Face / Meta checkpoints raise CheckpointError naming the file and the problem (never a raw
KeyError, pickle, JSON or safetensors error), and harmless variations are accepted.

Each test damages a fresh copy of a tiny valid checkpoint written by transformers or ``conftest``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_reference_model, reference_logits, save_hf_checkpoint, save_meta_checkpoint, tiny_hf_config
from safetensors import safe_open
from safetensors.torch import save_file

import llama3
from llama3 import CheckpointError
from llama3.model import rope_frequencies
from llama3.config import RopeScaling


@pytest.fixture(scope="module")
def reference():
    return make_reference_model(tiny_hf_config(), seed=3)


@pytest.fixture
def meta_dir(reference, tmp_path) -> Path:
    return save_meta_checkpoint(reference, tmp_path / "meta")


@pytest.fixture
def meta2_dir(reference, tmp_path) -> Path:
    return save_meta_checkpoint(reference, tmp_path / "meta2", n_shards=2)


@pytest.fixture
def hf_dir(reference, tmp_path) -> Path:
    return save_hf_checkpoint(reference, tmp_path / "hf")


@pytest.fixture
def hf_sharded_dir(reference, tmp_path) -> Path:
    path = save_hf_checkpoint(reference, tmp_path / "hfs", max_shard_size="100KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    return path


def load(path: Path):
    return llama3.load_model(path, device="cpu", dtype=torch.float32)


def fails(path: Path, *fragments: str) -> str:
    """Loading ``path`` raises CheckpointError whose message contains every fragment; returns the message."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def edit_shard(file: Path, fn) -> None:
    state = torch.load(file, weights_only=True)
    fn(state)
    torch.save(state, file)


# --- paths ----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    fails(tmp_path / "nowhere", "nowhere", "no such file")


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    fails(tmp_path, str(tmp_path), "no recognised checkpoint")


# --- Meta: params.json ------------------------------------------------------------------------------------


def test_params_invalid_json(meta_dir):
    (meta_dir / "params.json").write_text('{"dim": 64, "n_layers": ')
    fails(meta_dir, "params.json", "invalid JSON", "line 1")


def test_params_not_an_object(meta_dir):
    (meta_dir / "params.json").write_text("[64, 2]")
    fails(meta_dir, "params.json", "expected a JSON object")


def test_params_missing_required_keys(meta_dir):
    edit_json(meta_dir / "params.json", dim=None, vocab_size=None)
    fails(meta_dir, "params.json", "missing required key(s): dim, vocab_size")


def test_params_wrong_type(meta_dir):
    edit_json(meta_dir / "params.json", n_layers="two")
    fails(meta_dir, "params.json", "n_layers must be an integer", "'two'")


@pytest.mark.parametrize("key", ["n_kv_heads", "multiple_of", "rope_theta"])
def test_params_not_positive(meta_dir, key):
    edit_json(meta_dir / "params.json", **{key: 0})
    fails(meta_dir, "params.json", f"{key} must be positive, got 0")


def test_params_inconsistent(meta_dir):
    edit_json(meta_dir / "params.json", n_heads=3)
    fails(meta_dir, "params.json", "inconsistent parameters", "n_heads")


def test_params_use_scaled_rope_not_bool(meta_dir):
    edit_json(meta_dir / "params.json", use_scaled_rope="yes")
    fails(meta_dir, "params.json", "use_scaled_rope must be true or false")


def test_params_llama2_vocab(meta_dir):
    edit_json(meta_dir / "params.json", vocab_size=-1)
    fails(meta_dir, "params.json", "vocab_size must be positive")


# --- Meta: .pth files ------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call to os.makedirs: a loader that runs pickled code would create the marker directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pth_with_code_is_refused_not_executed(meta_dir, tmp_path):
    marker = tmp_path / "pwned"
    edit_shard(meta_dir / "consolidated.00.pth", lambda s: s.update(payload=_Payload(marker)))
    fails(meta_dir, "consolidated.00.pth", "not a weights-only", "os.makedirs")
    assert not marker.exists()


def test_pth_garbage(meta_dir):
    (meta_dir / "consolidated.00.pth").write_bytes(b"this is not a checkpoint\n" * 10)
    fails(meta_dir, "consolidated.00.pth", "not a PyTorch checkpoint")


def test_pth_truncated(meta_dir):
    file = meta_dir / "consolidated.00.pth"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    fails(meta_dir, "consolidated.00.pth", "truncated")


def test_pth_not_a_dict(meta_dir):
    torch.save([torch.zeros(3)], meta_dir / "consolidated.00.pth")
    fails(meta_dir, "consolidated.00.pth", "expected a dict of tensors, found list")


def test_pth_non_tensor_entry(meta_dir):
    edit_shard(meta_dir / "consolidated.00.pth", lambda s: s.update(step=3))
    fails(meta_dir, "consolidated.00.pth", "'step' is not a tensor (type int)")


def test_meta_shape_mismatch_with_params(meta_dir):
    # ffn_dim_multiplier 1.0 makes Meta's FFN rule give 192 instead of the stored 224.
    edit_json(meta_dir / "params.json", ffn_dim_multiplier=1.0)
    fails(meta_dir, "consolidated.00.pth: tensor layers.0.feed_forward.w1.weight has shape [224, 64]",
          "params.json implies [192, 64]")


def test_meta_missing_tensor(meta_dir):
    edit_shard(meta_dir / "consolidated.00.pth", lambda s: s.pop("layers.1.attention.wk.weight"))
    fails(meta_dir, str(meta_dir), "missing tensors: layers.1.attention.wk.weight")


def test_meta_unexpected_tensor(meta_dir):
    edit_shard(meta_dir / "consolidated.00.pth", lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(64)}))
    fails(meta_dir, str(meta_dir), "unexpected tensors: layers.0.attention.wq.bias")


def test_meta_extra_layer(meta_dir):
    edit_json(meta_dir / "params.json", n_layers=1)
    fails(meta_dir, "unexpected tensors: layers.1.")


# --- Meta: model-parallel shards ---------------------------------------------------------------------------


def test_meta_missing_last_shard(meta2_dir):
    (meta2_dir / "consolidated.01.pth").unlink()
    fails(meta2_dir, "consolidated.00.pth holds 1/2", "2 model-parallel shards", "missing consolidated.01.pth")


def test_meta_shard_numbering_gap(meta2_dir):
    (meta2_dir / "consolidated.01.pth").rename(meta2_dir / "consolidated.02.pth")
    fails(meta2_dir, "without gaps", "missing consolidated.01.pth")


def test_meta_shards_that_do_not_concatenate(meta2_dir):
    edit_shard(meta2_dir / "consolidated.01.pth",
               lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(16, 64, dtype=torch.bfloat16)}))
    fails(meta2_dir, "layers.0.attention.wq.weight", "different shapes",
          "consolidated.00.pth [32, 64]", "consolidated.01.pth [16, 64]")


def test_meta_shards_concatenate_to_wrong_shape(meta2_dir):
    # Both shards hold full-size copies: two shard files where one was meant.
    full = torch.load(meta2_dir / "consolidated.00.pth", weights_only=True)
    whole = {k: v for k, v in full.items()}
    other = torch.load(meta2_dir / "consolidated.01.pth", weights_only=True)
    for name, piece in full.items():
        if piece.ndim == 2:
            dim = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
            whole[name] = torch.cat([piece, other[name]], dim=dim)
    torch.save(whole, meta2_dir / "consolidated.00.pth")
    torch.save(whole, meta2_dir / "consolidated.01.pth")
    fails(meta2_dir, "consolidated.00.pth holds whole tensors", "2 consolidated.NN.pth file(s) were found")


def test_meta_shards_concatenate_to_other_shape_than_params(meta2_dir):
    edit_json(meta2_dir / "params.json", ffn_dim_multiplier=1.0)  # Meta's rule now gives 192, shards hold 2 x 112
    fails(meta2_dir, "tensor layers.0.feed_forward.w1.weight: 2 shards of [112, 64] concatenate on dim 0 to [224, 64]",
          "params.json implies [192, 64]")


def test_meta_shards_hold_different_tensors(meta2_dir):
    edit_shard(meta2_dir / "consolidated.01.pth", lambda s: s.pop("layers.0.ffn_norm.weight"))
    fails(meta2_dir, "consolidated.01.pth", "holds different tensors", "layers.0.ffn_norm.weight")


# --- Meta: rotary frequency tensors ----------------------------------------------------------------------


def _with_rope_freqs(meta_dir: Path, scaled: bool, values: torch.Tensor) -> None:
    if scaled:
        edit_json(meta_dir / "params.json", use_scaled_rope=True)
    edit_shard(meta_dir / "consolidated.00.pth", lambda s: s.update({"rope_freqs.weight": values.to(torch.bfloat16)}))


@pytest.mark.parametrize("form", ["inverse", "llama.cpp-divisors"])
def test_consistent_rope_freqs_are_dropped(meta_dir, reference, form):
    freqs = rope_frequencies(16, 500000.0, RopeScaling())
    values = freqs if form == "inverse" else rope_frequencies(16, 500000.0, None) / freqs
    _with_rope_freqs(meta_dir, True, values)
    config, state = llama3.checkpoint.read_checkpoint(meta_dir)
    assert "rope_freqs.weight" not in state and config.rope_scaling == RopeScaling()


def test_inconsistent_rope_freqs(meta_dir):
    # Divisors of a scaled model, but params.json has no use_scaled_rope.
    freqs = rope_frequencies(16, 500000.0, RopeScaling())
    _with_rope_freqs(meta_dir, False, rope_frequencies(16, 500000.0, None) / freqs)
    fails(meta_dir, "consolidated.00.pth", "rope frequencies disagree with params.json")


# --- Hugging Face: config.json -----------------------------------------------------------------------------


def test_config_invalid_json(hf_dir):
    (hf_dir / "config.json").write_text("{'hidden_size': 64}")
    fails(hf_dir, "config.json", "invalid JSON")


def test_config_missing_required_key(hf_dir):
    edit_json(hf_dir / "config.json", hidden_size=None)
    fails(hf_dir, "config.json", "missing required key(s): hidden_size")


@pytest.mark.parametrize("key", ["num_key_value_heads", "intermediate_size"])
def test_config_not_positive(hf_dir, key):
    edit_json(hf_dir / "config.json", **{key: 0})
    fails(hf_dir, "config.json", f"{key} must be positive, got 0")


def test_config_not_llama(hf_dir):
    edit_json(hf_dir / "config.json", model_type="mistral", architectures=["MistralForCausalLM"])
    fails(hf_dir, "config.json", "'mistral'", "not a Llama model")


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_config_biases_unsupported(hf_dir, flag):
    edit_json(hf_dir / "config.json", **{flag: True})
    fails(hf_dir, "config.json", f"{flag}=true is not supported")


def test_config_other_activation(hf_dir):
    edit_json(hf_dir / "config.json", hidden_act="gelu")
    fails(hf_dir, "config.json", "hidden_act 'gelu' is not supported")


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_config_other_rope_type(hf_dir, spelling):
    if spelling == "rope_parameters":
        change = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}
    else:  # transformers 4 spelling
        change = {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    edit_json(hf_dir / "config.json", **change)
    fails(hf_dir, "config.json", "rope type", "is not supported", "'llama3'")


def test_config_llama3_rope_incomplete(hf_dir):
    edit_json(hf_dir / "config.json", rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    fails(hf_dir, "config.json", "llama3 rope scaling lacks low_freq_factor, high_freq_factor")


def test_hf_shape_mismatch(hf_dir):
    edit_json(hf_dir / "config.json", intermediate_size=256)
    # Whichever FFN tensor comes first in the file is reported, with both shapes.
    message = fails(hf_dir, "model.safetensors", "tensor model.layers.0.mlp.", "config.json implies")
    assert ("[224, 64]" in message and "[256, 64]" in message) or ("[64, 224]" in message and "[64, 256]" in message)


# --- Hugging Face: safetensors files -----------------------------------------------------------------------


def test_safetensors_truncated(hf_dir):
    file = hf_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    fails(hf_dir, "model.safetensors", "not a readable safetensors file")


def test_safetensors_corrupt_header(hf_dir):
    file = hf_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\xff\xfe\x00{"
    file.write_bytes(bytes(data))
    fails(hf_dir, "model.safetensors", "not a readable safetensors file")


def _rewrite(file: Path, fn) -> None:
    with safe_open(file, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_hf_missing_lm_head(hf_dir):
    _rewrite(hf_dir / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    fails(hf_dir, "missing tensors", "lm_head.weight", "tie_word_embeddings=false")


def test_hf_missing_layer_tensor(hf_dir):
    _rewrite(hf_dir / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    fails(hf_dir, "model.safetensors", "missing tensors", "model.layers.1.self_attn.k_proj.weight")


def test_hf_unexpected_tensor(hf_dir):
    bias = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    _rewrite(hf_dir / "model.safetensors", lambda t: t.update(bias))
    fails(hf_dir, "model.safetensors", "unexpected tensor model.layers.0.self_attn.q_proj.bias")


def test_hf_more_layers_than_config(hf_dir):
    edit_json(hf_dir / "config.json", num_hidden_layers=1)
    fails(hf_dir, "unexpected tensor model.layers.1.", "config.json has 1 layers")


def test_hf_index_lists_missing_shard(hf_sharded_dir):
    victim = sorted(hf_sharded_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    fails(hf_sharded_dir, "model.safetensors.index.json", "do not exist", victim.name)


def test_hf_index_invalid_json(hf_sharded_dir):
    (hf_sharded_dir / "model.safetensors.index.json").write_text('{"weight_map": ')
    fails(hf_sharded_dir, "model.safetensors.index.json", "invalid JSON")


def test_hf_shards_without_index_incomplete(hf_sharded_dir):
    (hf_sharded_dir / "model.safetensors.index.json").unlink()
    victim = sorted(hf_sharded_dir.glob("model-*.safetensors"))[0]
    victim.unlink()
    number = victim.name.split("-")[1]
    fails(hf_sharded_dir, "incomplete shard set", f"{number}-of-")


def test_hf_corrupt_shard_is_named(hf_sharded_dir):
    victim = sorted(hf_sharded_dir.glob("model-*.safetensors"))[-1]
    victim.write_bytes(b"\x00" * 64)
    fails(hf_sharded_dir, victim.name, "not a readable safetensors file")


# --- accepted variations -----------------------------------------------------------------------------------


def test_tied_hf_with_stored_lm_head_and_inv_freq(reference, tmp_path):
    """A tied checkpoint that also stores lm_head (transformers ignores it) and old rotary buffers loads."""
    tied = make_reference_model(tiny_hf_config(tie_word_embeddings=True), seed=4)
    path = save_hf_checkpoint(tied, tmp_path / "tied")

    def add(tensors):
        tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _rewrite(path / "model.safetensors", add)
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    assert (load(path)(tokens) - reference_logits(tied, tokens)).abs().max().item() < 1e-4


def test_legacy_pth_serialization_loads(meta_dir, reference):
    """Pre-1.6 torch.save files (plain pickle, no zip) are read without mmap, still weights-only."""
    file = meta_dir / "consolidated.00.pth"
    torch.save(torch.load(file, weights_only=True), file, _use_new_zipfile_serialization=False)
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    assert (load(meta_dir)(tokens) - reference_logits(reference, tokens)).abs().max().item() < 1e-4
