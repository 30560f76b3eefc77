"""GGUF (llama.cpp) reader: metadata -> ModelConfig, tensors -> canonical names, quantized blocks kept as-is.

llama.cpp's converter already stores q/k rows in the interleaved rotary layout (it undoes Hugging Face's
permutation), so GGUF weights need no reordering. Shapes in GGUF are listed in ggml's ``ne`` order
(fastest dimension first); torch order is the reverse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..gguf_file import GGUFFile, GGUFFormatError, read_gguf_file
from .state import GGMLTensor, StateDict

# Encodings we can read: float types directly, the rest through gguf's dequantizers (and llama3.quant kernels).
SUPPORTED_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
}  # fmt: skip

_LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def canonical_name(gguf_name: str) -> str | None:
    """Meta name for a GGUF tensor name, or None when it has no counterpart."""
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    base = gguf_name.removesuffix(".weight")
    if gguf_name.endswith(".weight") and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.weight"
    return None


def open_gguf(path: Path) -> GGUFFile:
    """The header of ``path`` (model metadata and tensor directory), with failures turned into CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        # The vocabulary arrays are the tokenizer's business: skipped here, only their lengths are kept.
        return read_gguf_file(path, lambda key: not key.startswith("tokenizer."))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except GGUFFormatError as exc:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({exc})") from None


def metadata(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The decoded value of a metadata field (scalars, strings, arrays), or ``default``."""
    return reader.metadata.get(key, default)


def gguf_config(reader, path: Path) -> ModelConfig:
    """ModelConfig from ``llama.*`` metadata (and tensor shapes where metadata is silent)."""
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported architecture {arch!r} (only 'llama' models are supported)")

    def need(key: str) -> Any:
        value = metadata(reader, f"llama.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = metadata(reader, "llama.vocab_size")
    if vocab is None:
        vocab = reader.array_lengths.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no llama.vocab_size nor tokenizer tokens)")
    head_dim = metadata(reader, "llama.attention.key_length") or metadata(reader, "llama.rope.dimension_count")
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(metadata(reader, "llama.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            hidden_dim=int(need("feed_forward_length")),
            norm_eps=float(metadata(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(metadata(reader, "llama.rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in tensor_names,
            head_dim_override=int(head_dim) if head_dim and int(head_dim) != dim // n_heads else None,
            max_seq_len=int(metadata(reader, "llama.context_length", 8192)),
            extra={"name": metadata(reader, "general.name")},
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: inconsistent GGUF metadata: {exc}") from None


def read_gguf(path: Path) -> tuple[ModelConfig, StateDict]:
    """Read a llama-architecture GGUF file into ``(config, canonical state)``; big tensors stay memory-mapped."""
    from gguf import GGMLQuantizationType

    reader = open_gguf(path)
    config = gguf_config(reader, path)
    state: StateDict = {}
    rope_freqs = None
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.ggml_type).name
        if t.name == "rope_freqs.weight":  # Llama 3.1+ converts its rope scaling into per-pair divisors
            rope_freqs = torch.tensor(np.asarray(reader.tensor_data(t), dtype=np.float32)).flatten()
            continue
        name = canonical_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (not part of a llama model)")
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} uses unsupported quantization type {kind}")
        shape = t.shape
        if kind in ("F32", "F16"):
            # Copy out of the read-only memory map: these are the small norm vectors (or an f32 model).
            state[name] = torch.from_numpy(np.array(reader.tensor_data(t))).reshape(shape)
        else:
            state[name] = GGMLTensor(name=t.name, ggml_type=t.ggml_type, shape=shape, data=reader.tensor_data(t))
    if rope_freqs is not None:
        expected = config.head_dim // 2
        if rope_freqs.numel() != expected:
            raise CheckpointError(f"{path}: rope_freqs has {rope_freqs.numel()} entries, expected {expected}")
        config = _with_freq_factors(config, rope_freqs)
    return config, state


def _with_freq_factors(config: ModelConfig, factors: torch.Tensor) -> ModelConfig:
    from dataclasses import replace

    return replace(config, rope_freq_factors=tuple(float(f) for f in factors))
