"""Hugging Face format: ``config.json`` + ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``).

Tensors are renamed to Meta's names and the q/k projection rows are moved from Hugging Face's
half-split rotary layout (the first half of each head's rows pairs with the second half) to Meta's
interleaved layout (rows 2i and 2i+1 pair). Only ``LlamaForCausalLM`` checkpoints are accepted; options
the model does not implement (biases, rope types other than default/llama3...) are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError
from ..parallel.plan import ShardPlan
from .meta import number, read_json, rope_scaling_from
from .state import check_state, expected_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Older transformers versions saved the rotary buffer; it is recomputed from the config.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


def canonical_name(hf_name: str) -> str | None:
    """Meta's name for a Hugging Face Llama tensor name, or None if it is not a Llama weight."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_KEY.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def hf_name(canonical: str) -> str:
    """The Hugging Face name of a canonical tensor name (inverse of ``canonical_name``)."""
    for hf, meta in _GLOBAL_NAMES.items():
        if meta == canonical:
            return hf
    _, layer, rest = canonical.split(".", 2)
    module = next(hf for hf, meta in _LAYER_NAMES.items() if f"{meta}.weight" == rest)
    return f"model.layers.{layer}.{module}.weight"


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k projection rows from HF's half-split rotary layout to Meta's interleaved one.

    Per head, HF row i pairs with row i + D/2; Meta puts that pair at rows 2i, 2i+1.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of ``half_split_to_interleaved``: Meta's interleaved q/k rows in HF's half-split order."""
    rows, cols = weight.shape
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope(cfg: dict[str, Any], source: Path) -> tuple[float, RopeScaling | None]:
    """rope_theta and Llama 3.1 scaling from either transformers 4 (rope_theta + rope_scaling) or
    transformers 5 (rope_parameters) spelling."""
    params = cfg.get("rope_parameters")
    rope = params if isinstance(params, dict) and params else cfg.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise CheckpointError(f"{source}: rope_scaling must be an object, got {rope!r}")
    rope = rope or {}
    theta_from = rope if "rope_theta" in rope else cfg
    theta = number(theta_from, "rope_theta", float, source, positive=True) if "rope_theta" in theta_from else 10000.0
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(
            f"{source}: partial_rotary_factor {partial!r} is not supported (rotary on the whole head only)"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported (only 'default' and Llama 3.1's 'llama3')"
        )
    values = dict(rope)
    # transformers falls back to max_position_embeddings for the pre-training context.
    fallback = cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    values.setdefault("original_max_position_embeddings", fallback)
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [key for key in fields if values.get(key) is None]
    if absent:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {', '.join(absent)}")
    return theta, rope_scaling_from(values, source, "llama3 rope scaling")


def hf_config_to_model_config(cfg: dict[str, Any], source: Path) -> ModelConfig:
    """Map a Llama ``config.json`` (as a dict) to a ``ModelConfig``; ``source`` names the file in errors."""
    architectures = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in architectures:
        raise CheckpointError(
            f"{source}: model_type {cfg.get('model_type')!r} (architectures {architectures}) is not a Llama model; "
            "only model_type 'llama' / LlamaForCausalLM checkpoints are supported"
        )
    missing = [key for key in _REQUIRED if key not in cfg]
    if missing:
        raise CheckpointError(f"{source}: missing required key(s): {', '.join(missing)}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (Llama 3 layers have no biases)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")
    def count(key: str) -> int:
        return number(cfg, key, int, source, positive=True)

    dim, heads = count("hidden_size"), count("num_attention_heads")
    kv_heads = count("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
    head_dim = count("head_dim") if cfg.get("head_dim") is not None else None
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CheckpointError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")
    theta, scaling = _rope(cfg, source)
    max_pos = count("max_position_embeddings") if cfg.get("max_position_embeddings") is not None else 8192
    used = set(_REQUIRED) | {
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "tie_word_embeddings", "max_position_embeddings", "model_type", "architectures",
        "attention_bias", "mlp_bias", "hidden_act",
    }
    try:
        return ModelConfig(
            dim=dim,
            n_layers=count("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=kv_heads,
            vocab_size=count("vocab_size"),
            hidden_dim=count("intermediate_size"),
            norm_eps=number(cfg, "rms_norm_eps", float, source) if cfg.get("rms_norm_eps") is not None else 1e-6,
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=tie,
            # A head_dim equal to the default says nothing; keep the override for genuinely odd heads only.
            head_dim_override=head_dim if head_dim is not None and head_dim * heads != dim else None,
            max_seq_len=max_pos,
            extra={key: value for key, value in cfg.items() if key not in used},
        )
    except ValueError as exc:
        raise CheckpointError(f"{source}: inconsistent parameters: {exc}") from None


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: the index's, else model.safetensors, else a complete shard set."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: no weight_map object")
        names = sorted(set(weight_map.values()))
        absent = [name for name in names if not isinstance(name, str) or not (path / name).is_file()]
        if absent:
            raise CheckpointError(f"{index_file}: lists shard file(s) that do not exist: {', '.join(map(str, absent))}")
        return [path / name for name in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weight files")
    totals = {m.group(2) for f in files if (m := SHARD_NAME.search(f.name))}
    for total in totals:
        width, count = len(total), int(total)
        have = {int(m.group(1)) for f in files if (m := SHARD_NAME.search(f.name)) and m.group(2) == total}
        lacking = [f"{i:0{width}d}-of-{total}" for i in range(1, count + 1) if i not in have]
        if lacking:
            raise CheckpointError(
                f"{path}: incomplete shard set: no *-{', '.join(lacking)}.safetensors (and no {INDEX_FILE})"
            )
    return files


def _read_file(
    file: Path, config: ModelConfig, shapes: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor],
    plan: ShardPlan | None = None,
) -> None:
    """Add ``file``'s tensors to ``state`` under canonical names, checking each shape before any reshaping;
    with ``plan``, only the rank's region of each tensor is read from the file."""
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if _IGNORED.match(key):
                    continue
                name = canonical_name(key)
                if name is None:
                    raise CheckpointError(f"{file}: unexpected tensor {key} (not a LlamaForCausalLM weight)")
                if name == "output.weight" and config.tie_embeddings:
                    continue  # transformers ties lm_head to the embeddings whatever the file holds
                if name not in shapes:
                    raise CheckpointError(f"{file}: unexpected tensor {key} (config.json has {config.n_layers} layers)")
                if name in state:
                    raise CheckpointError(f"{file}: tensor {key} appears in more than one file")
                got = tuple(handle.get_slice(key).get_shape())
                if got != shapes[name]:
                    raise CheckpointError(
                        f"{file}: tensor {key} has shape {list(got)}, config.json implies {list(shapes[name])}"
                    )
                region = plan.region(name) if plan is not None else None
                if region is None:
                    tensor = handle.get_tensor(key)
                else:
                    index = (slice(None),) * region.dim + (slice(region.start, region.stop),)
                    tensor = handle.get_slice(key)[index]
                # q/k regions are whole heads, and the rotary reordering stays within a head.
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                    tensor = half_split_to_interleaved(tensor, tensor.shape[0] // config.head_dim, config.head_dim)
                state[name] = tensor
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError for damaged files
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_hf(path: Path, shard: tuple[int, int] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama directory into ``(config, canonical state dict)``; with ``shard`` (rank, size),
    only that tensor-parallel rank's slices, each read lazily from the safetensors files."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    config = hf_config_to_model_config(read_json(config_file), config_file)
    shapes = expected_shapes(config)
    plan = ShardPlan(config, *shard) if shard is not None else None
    state: dict[str, torch.Tensor] = {}
    files = safetensors_files(path)
    for file in files:
        _read_file(file, config, shapes, state, plan)
    missing = [hf_name(name) for name in shapes if name not in state]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        hint = " (config.json has tie_word_embeddings=false)" if "lm_head.weight" in missing else ""
        raise CheckpointError(
            f"{path}: missing tensors in {', '.join(f.name for f in files)}: {', '.join(missing[:8])}{more}{hint}"
        )
    check_state(plan.local_config if plan is not None else config, state, str(path))
    return config, state


__all__ = ["canonical_name", "half_split_to_interleaved", "hf_config_to_model_config", "hf_name", "interleaved_to_half_split",
           "read_hf"]
