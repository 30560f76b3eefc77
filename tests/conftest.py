"""Shared test fixtures: tiny Llama-3-shaped checkpoints written by tools independent of ``llama3``.

The reference is always Hugging Face ``transformers``' ``LlamaForCausalLM`` with random weights.
Its weights are rounded to bfloat16-representable values (kept in float32), so a checkpoint stored
in bf16 (as Meta ships them) or fp32 holds exactly the same numbers and logits can be compared to 1e-4.

Fixtures (session-scoped, built on first use):

* ``tiny_reference`` -> ``LlamaForCausalLM``: a Llama 3.1 shape in miniature (dim 64, 2 layers, 4 query
  heads / 2 kv heads, head_dim 16, FFN 224 = Meta's rule with multiple_of 32 and ffn_dim_multiplier 1.3,
  the real vocabulary size 128256, rope_theta 500000, llama3 rope scaling with Meta's defaults,
  untied output). Embedding tables are 128256 x 64 (33 MB each in fp32).
* ``hf_llama_dir`` -> Path: ``tiny_reference`` saved by ``save_pretrained`` (model.safetensors, fp32) plus a
  copy of the real Llama 3 ``tokenizer.json``.
* ``meta_llama_dir`` -> Path: the same weights as a complete Meta download: ``params.json``
  (``use_scaled_rope: true``), ``consolidated.00.pth`` (bf16, Meta layout converted by this file, not by
  the reader) and the real Llama 3 ``tokenizer.model``.

Helper functions (importable with ``from conftest import ...``, and as the ``checkpoint_tools`` fixture):

* ``tiny_hf_config(**overrides)`` -> ``LlamaConfig`` of the tiny shape (small vocab unless overridden).
* ``make_reference_model(config, seed)`` -> eval-mode float32 ``LlamaForCausalLM`` with bf16-exact weights.
* ``save_hf_checkpoint(model, dir, max_shard_size=None, dtype=None)``: transformers' own writer.
* ``save_meta_checkpoint(model, dir, n_shards=1, multiple_of=32, ffn_dim_multiplier=1.3, tokenizer=False)``:
  converts HF names/rotary layout to Meta's with an explicit row permutation and splits by fairscale's rules.
* ``reference_logits(model, tokens)`` -> float32 logits from transformers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# The suite's parity tests compare against float references to float32 rounding. On a CPU with AVX512_BF16 or
# AMX the default level runs prefill GEMMs in bfloat16, which tests/test_cpu_levels.py checks against its own
# bounds (it sets every level itself); everything else runs on the float32 path, so the same assertions hold on
# every machine. Server processes the tests start inherit this. An explicit LLAMA3_CPU_LEVEL is kept.
if not os.environ.get("LLAMA3_CPU_LEVEL"):
    from llama3.quant import cpu as _cpu

    if _cpu.current().prefill_dtype != torch.float32:
        os.environ["LLAMA3_CPU_LEVEL"] = "avx512"

LLAMA3_VOCAB = 128256
# Meta's Llama 3.1 defaults: factor 8, low 1, high 4, original context 8192.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def tiny_hf_config(**overrides):
    """A tiny Llama-3-shaped ``LlamaConfig`` (GQA 4/2, head_dim 16, FFN 224); ``overrides`` are LlamaConfig kwargs."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_reference_model(config, seed: int = 0):
    """Random ``LlamaForCausalLM`` (float32, eval, eager attention) whose weights are exact in bfloat16."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm weights start at 1.0; perturb them so a swapped or dropped norm shows in the logits.
                param.add_(torch.randn_like(param) * 0.1)
            else:
                # Default init (std 0.02) makes tiny models nearly uniform; larger weights make logits discriminative.
                param.normal_(0.0, 0.08)
            param.copy_(param.to(torch.bfloat16).float())
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@torch.no_grad()
def reference_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


def save_hf_checkpoint(
    model, directory: Path, max_shard_size: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """``save_pretrained`` into ``directory`` (safetensors; sharded with an index when ``max_shard_size`` is small)."""
    directory = Path(directory)
    target = copy.deepcopy(model).to(dtype) if dtype is not None else model
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    target.save_pretrained(directory, **kwargs)
    return directory


def _interleave_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rotary rows -> Meta interleaved rows, by an explicit index list (independent of the reader)."""
    head_dim = weight.shape[0] // n_heads
    order = []
    for head in range(n_heads):
        for i in range(head_dim // 2):
            order += [head * head_dim + i, head * head_dim + head_dim // 2 + i]
    return weight[order]


def meta_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under Meta's names and layout (bf16), without output.weight when tied."""
    cfg = model.config
    hf = {k: v.detach() for k, v in model.state_dict().items()}
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        state["output.weight"] = hf["lm_head.weight"]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        state.update({
            f"layers.{i}.attention.wq.weight": _interleave_rows(hf[p + "self_attn.q_proj.weight"], heads),
            f"layers.{i}.attention.wk.weight": _interleave_rows(hf[p + "self_attn.k_proj.weight"], kv_heads),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    return {k: v.to(torch.bfloat16).clone() for k, v in state.items()}


def fairscale_split(state: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split a full Meta state into model-parallel shards: column-parallel on dim 0, row-parallel on dim 1."""
    column = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")
    row = ("wo", "w2")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in state.items():
        module = name.split(".")[-2]
        if module in column:
            pieces = tensor.chunk(n_shards, dim=0)
        elif module in row:
            pieces = tensor.chunk(n_shards, dim=1)
        else:
            pieces = [tensor] * n_shards  # norms are replicated on every rank
        assert len(pieces) == n_shards and all(p.shape == pieces[0].shape for p in pieces), name
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()  # clone: torch.save would otherwise store the whole parent tensor
    return shards


def meta_params(config, multiple_of: int, ffn_dim_multiplier: float | None) -> dict:
    """``params.json`` for a LlamaConfig; checks Meta's FFN rule reproduces intermediate_size."""
    hidden = int(2 * 4 * config.hidden_size / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    assert hidden == config.intermediate_size, (hidden, config.intermediate_size)
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": config.rms_norm_eps,
    }
    rope = dict(getattr(config, "rope_parameters", None) or {})
    params["rope_theta"] = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
        scaling = {k: rope[k] for k in LLAMA31_ROPE if k != "rope_type"}
        if scaling != {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_type"}:
            params["rope_scaling"] = scaling  # non-default values: the reader's documented extension
    return params


def save_meta_checkpoint(model, directory: Path, n_shards: int = 1, multiple_of: int = 32,
                         ffn_dim_multiplier: float | None = 1.3, tokenizer: bool = False) -> Path:
    """Write ``model`` as a Meta checkpoint: params.json + consolidated.NN.pth (bf16) [+ tokenizer.model]."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = meta_params(model.config, multiple_of, ffn_dim_multiplier)
    (directory / "params.json").write_text(json.dumps(params, indent=2))
    for rank, shard in enumerate(fairscale_split(meta_state(model), n_shards)):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    if tokenizer:
        from llama3.assets import llama3_tokenizer_model

        shutil.copy(llama3_tokenizer_model(), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def checkpoint_tools() -> SimpleNamespace:
    """The helper functions above, for test files that prefer a fixture to an import."""
    return SimpleNamespace(
        tiny_hf_config=tiny_hf_config,
        make_reference_model=make_reference_model,
        reference_logits=reference_logits,
        save_hf_checkpoint=save_hf_checkpoint,
        save_meta_checkpoint=save_meta_checkpoint,
        meta_state=meta_state,
        fairscale_split=fairscale_split,
    )


@pytest.fixture(scope="session")
def tiny_reference():
    """Llama-3.1-shaped tiny transformers model with the real vocabulary size (see module docstring)."""
    config = tiny_hf_config(vocab_size=LLAMA3_VOCAB, rope_scaling=dict(LLAMA31_ROPE),
                            bos_token_id=128000, eos_token_id=[128001, 128009])
    return make_reference_model(config, seed=1234)


@pytest.fixture(scope="session")
def hf_llama_dir(tiny_reference, tmp_path_factory) -> Path:
    """``tiny_reference`` as a transformers-saved HF directory (+ the real Llama 3 tokenizer.json)."""
    from llama3.assets import llama3_tokenizer_json

    directory = save_hf_checkpoint(tiny_reference, tmp_path_factory.mktemp("hf_llama"))
    shutil.copy(llama3_tokenizer_json(), directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def meta_llama_dir(tiny_reference, tmp_path_factory) -> Path:
    """``tiny_reference`` as a complete Meta download (params.json, consolidated.00.pth, tokenizer.model)."""
    return save_meta_checkpoint(tiny_reference, tmp_path_factory.mktemp("meta_llama"), tokenizer=True)
