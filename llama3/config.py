"""The model architecture (and nothing else: batch size, sequence length, dtype and device are run-time arguments)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling ("llama3" rope type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Llama-architecture hyper-parameters; field names and defaults follow Meta's ``ModelArgs``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    # Per-pair divisors of the rotary frequencies, as GGUF files store Llama 3.1 scaling (``rope_freqs``).
    rope_freq_factors: tuple[float, ...] | None = None
    tie_embeddings: bool = False
    # Hugging Face and GGUF state the FFN width directly; Meta derives it (see ``ffn_hidden_dim``).
    hidden_dim: int | None = None
    # Head size when it is not dim / n_heads (allowed by HF's ``head_dim``).
    head_dim_override: int | None = None
    # The context length the model was trained for; generation may use less.
    max_seq_len: int = 8192
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            raise ValueError(f"dim, n_layers and n_heads must be positive (got {self.dim}, {self.n_layers}, {self.n_heads})")
        if self.kv_heads <= 0:
            raise ValueError(f"n_kv_heads must be positive (got {self.n_kv_heads})")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive (got {self.vocab_size})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override if self.head_dim_override is not None else self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """FFN width: explicit when the checkpoint states it, else Meta's rule (8B -> 14336)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)
