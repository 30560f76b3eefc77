"""GGUF (llama.cpp) reader: metadata -> ModelConfig, tensors -> canonical names, quantized blocks kept as-is.

llama.cpp's converter already stores q/k rows in the interleaved rotary layout (it undoes Hugging Face's
permutation), so GGUF weights need no reordering. Shapes in GGUF are listed in ggml's ``ne`` order
(fastest dimension first); torch order is the reverse.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..gguf_file import GGUFFile, GGUFFormatError, get_float, get_int, get_str, read_gguf_file
from ..parallel.plan import ShardPlan
from .state import GGMLTensor, StateDict, expected_shapes

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


# Bounds on header values, far above any real model: they keep the sizes a corrupt header can name (and their
# products, on the meta device in check_state) well inside int64. Layer counts are bounded by the tensors present.
_MAX_WIDTH = 1 << 20  # embedding, FFN and head widths, head counts
_MAX_VOCAB = (1 << 31) - 1  # token ids are int32 in llama.cpp
_MAX_CONTEXT = 1 << 24  # context_length (the largest models claim 10M); generation sizes its caches from it


def gguf_config(reader: GGUFFile, path: Path) -> ModelConfig:
    """ModelConfig from ``llama.*`` metadata (and tensor shapes where metadata is silent), every value type- and
    range-checked: a corrupt header raises CheckpointError naming the key."""
    try:
        return _config(reader, path)
    except GGUFFormatError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except ValueError as exc:  # ModelConfig's own consistency checks
        raise CheckpointError(f"{path}: inconsistent GGUF metadata: {exc}") from None


def _config(reader: GGUFFile, path: Path) -> ModelConfig:
    meta = reader.metadata
    arch = get_str(meta, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported architecture {arch!r} (only 'llama' models are supported)")

    def need(key: str, hi: int) -> int:
        value = get_int(meta, f"llama.{key}", lo=1, hi=hi)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    dim, n_heads = need("embedding_length", _MAX_WIDTH), need("attention.head_count", _MAX_WIDTH)
    n_kv_heads = get_int(meta, "llama.attention.head_count_kv", n_heads, lo=1, hi=n_heads)
    if n_heads % n_kv_heads:
        raise CheckpointError(
            f"{path}: llama.attention.head_count_kv ({n_kv_heads}) must divide llama.attention.head_count ({n_heads})"
        )
    vocab = get_int(meta, "llama.vocab_size", lo=1, hi=_MAX_VOCAB)
    if vocab is None:
        vocab = reader.array_lengths.get("tokenizer.ggml.tokens")
    if not vocab:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no llama.vocab_size nor tokenizer tokens)")
    # The head size: key_length, else (older files) the rotary dimension count; 0 in either means "not stated".
    head_dim = None
    for key in ("llama.attention.key_length", "llama.rope.dimension_count"):
        head_dim = get_int(meta, key, lo=0, hi=_MAX_WIDTH)
        if head_dim is not None and head_dim % 2:
            raise CheckpointError(f"{path}: {key} must be even (rotary embeddings rotate pairs), got {head_dim}")
        if head_dim:
            break
    tensor_names = {t.name for t in reader.tensors}
    name = get_str(meta, "general.name")
    return ModelConfig(
        dim=dim,
        n_layers=need("block_count", 2**32 - 1),  # check_state compares it with the layers present
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab,
        hidden_dim=need("feed_forward_length", _MAX_WIDTH),
        norm_eps=get_float(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get_float(meta, "llama.rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensor_names,
        head_dim_override=head_dim if head_dim and head_dim != dim // n_heads else None,
        max_seq_len=get_int(meta, "llama.context_length", 8192, lo=1, hi=_MAX_CONTEXT),
        extra={"name": name},
    )


def read_gguf(path: Path, shard: tuple[int, int] | None = None) -> tuple[ModelConfig, StateDict]:
    """Read a llama-architecture GGUF file into ``(config, canonical state)``; big tensors stay memory-mapped.
    With ``shard`` (rank, size), only that tensor-parallel rank's slices, quantized blocks kept as blocks."""
    from gguf import GGMLQuantizationType

    reader = open_gguf(path)
    config = gguf_config(reader, path)
    plan = ShardPlan(config, *shard) if shard is not None else None
    # Full shapes are checked before slicing (a slice of a wrong-shaped tensor could look right); the layer
    # count first, so that a corrupt one never builds a huge model on the meta device.
    shapes = _full_shapes(config, reader, path) if plan is not None else {}
    state: StateDict = {}
    rope_freqs = None
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.ggml_type).name
        if t.name == "rope_freqs.weight":  # Llama 3.1+ converts its rope scaling into per-pair divisors
            if kind not in ("F32", "F16"):
                raise CheckpointError(f"{path}: tensor rope_freqs.weight has type {kind}, expected F32 or F16")
            rope_freqs = torch.tensor(np.asarray(reader.tensor_data(t), dtype=np.float32)).flatten()
            continue
        name = canonical_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (not part of a llama model)")
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} uses unsupported quantization type {kind}")
        shape = t.shape
        region = None
        if plan is not None:
            plan.check_shape(name, shape, shapes, str(path))
            region = plan.region(name) if len(shape) == 2 else None
        if kind in ("F32", "F16"):
            # Copy out of the read-only memory map: these are the small norm vectors (or an f32 model).
            values = reader.tensor_data(t).reshape(shape)
            if region is not None:
                values = values.take(range(region.start, region.stop), axis=region.dim)
            state[name] = torch.from_numpy(np.array(values))
        else:
            tensor = GGMLTensor(name=t.name, ggml_type=t.ggml_type, shape=shape, data=reader.tensor_data(t))
            state[name] = tensor.narrow(region.dim, region.start, region.stop) if region is not None else tensor
    if rope_freqs is not None:
        expected = config.head_dim // 2
        if rope_freqs.numel() != expected:
            raise CheckpointError(f"{path}: rope_freqs has {rope_freqs.numel()} entries, expected {expected}")
        if not bool((rope_freqs.isfinite() & (rope_freqs > 0)).all()):
            raise CheckpointError(f"{path}: rope_freqs holds divisors that are not finite numbers > 0")
        config = _with_freq_factors(config, rope_freqs)
    return config, state


def _full_shapes(config: ModelConfig, reader: GGUFFile, path: Path) -> dict[str, tuple[int, ...]]:
    """The config's full tensor shapes, after checking the file's directory against them (names, counts,
    shapes: ``check_state``'s messages), as the unsliced load does after reading."""
    from .state import check_state

    stand_ins = {name: _Shape(t.shape) for t in reader.tensors if (name := canonical_name(t.name)) is not None}
    check_state(config, stand_ins, str(path))  # type: ignore[arg-type]
    return expected_shapes(config)


class _Shape:
    """A stand-in with only a ``shape``: check_state looks at nothing else."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _with_freq_factors(config: ModelConfig, factors: torch.Tensor) -> ModelConfig:
    from dataclasses import replace

    return replace(config, rope_freq_factors=tuple(float(f) for f in factors))
