"""Write a model as a Hugging Face directory (config.json, model.safetensors, tokenizer files): the inverse of
``hf.read_hf``, used to export a model with a LoRA adapter merged in. This engine and transformers load the
weights; the tokenizer is a tokenizer.json wherever the source had one (GGUF and Hugging Face models), and Meta's
tokenizer.model otherwise (this engine reads it; transformers needs the tokenizer.json published with the model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError
from ..model import rope_frequencies
from .hf import hf_name, interleaved_to_half_split

_ROPE_CANDIDATES = (RopeScaling(), RopeScaling(factor=32.0))  # Llama 3.1 and Llama 3.2's published settings


def _rope_scaling(config: ModelConfig) -> RopeScaling | None:
    """The config's rope scaling; GGUF files store it as per-pair frequency divisors, matched to the published
    Llama 3.1 / 3.2 settings here (config.json has no way to state arbitrary divisors)."""
    if config.rope_freq_factors is None:
        return config.rope_scaling
    factors = torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    plain = rope_frequencies(config.head_dim, config.rope_theta, None)
    for candidate in _ROPE_CANDIDATES:
        scaled = rope_frequencies(config.head_dim, config.rope_theta, candidate)
        if torch.allclose(plain / scaled, factors, rtol=1e-3):
            return candidate
    raise CheckpointError("this model's rope frequency factors (GGUF rope_freqs) match no Llama 3.1/3.2 rope "
                          "scaling that config.json can state; it cannot be exported as a Hugging Face directory")


def hf_config(config: ModelConfig, *, bos_id: int | None, eos_ids: list[int]) -> dict[str, Any]:
    """config.json of a ``LlamaForCausalLM`` with ``config``'s architecture."""
    scaling = _rope_scaling(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        "max_position_embeddings": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "torch_dtype": "float32",
    }


def _write_tokenizer(tokenizer: Any, directory: Path) -> None:
    """The tokenizer files: Meta's tokenizer.model copied; a tokenizers-backed one saved as tokenizer.json with its
    special tokens, BOS habit and chat template in tokenizer_config.json."""
    source = getattr(tokenizer, "path", None)
    backend = getattr(tokenizer, "_backend", None)
    if backend is None:
        if source is None or not Path(source).is_file():
            raise CheckpointError(f"cannot export tokenizer {tokenizer!r}: no file to copy")
        shutil.copy(source, directory / "tokenizer.model")
        return
    backend.save(str(directory / "tokenizer.json"))

    def text(i: int | None) -> str | None:
        return None if i is None or i < 0 else backend.id_to_token(i)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(tokenizer.bos_id),
        "eos_token": text(tokenizer.eos_id),
        "pad_token": text(tokenizer.pad_id),
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_hf(directory: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Any) -> Path:
    """Write canonical ``state`` (Meta names, interleaved q/k rows) as a Hugging Face Llama directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        value = value.detach().float().cpu()
        if name.endswith("attention.wq.weight"):
            value = interleaved_to_half_split(value, config.n_heads, config.head_dim)
        elif name.endswith("attention.wk.weight"):
            value = interleaved_to_half_split(value, config.kv_heads, config.head_dim)
        tensors[hf_name(name)] = value.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    stops = sorted(tokenizer.stop_tokens)
    eos = [tokenizer.eos_id] + [i for i in stops if i != tokenizer.eos_id]
    cfg = hf_config(config, bos_id=tokenizer.bos_id, eos_ids=eos)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    _write_tokenizer(tokenizer, directory)
    return directory
