"""A whole decoding step's layers in one native call, for CPU models whose matrices are native quantized blocks.

``FusedDecode.build(model)`` returns a kernel when every layer qualifies (all seven matrices are
``QuantLinear`` on the AVX2 path, float32 activations, head_dim a multiple of 8), else None. The model then
runs single-token steps through ``decode.cpp`` instead of ~40 PyTorch ops per layer; prompts (several tokens
per row) still go through the layers. The arithmetic is the layers' own, so the two paths agree to float32
rounding (tests/test_fused_decode.py); ``LLAMA3_FUSED_DECODE=0`` turns the fused path off, e.g. to compare.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from . import native
from .modules import QuantLinear

if TYPE_CHECKING:
    from ..model import Transformer

_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
             "feed_forward.w3", "feed_forward.w2")  # fmt: skip


class FusedDecode:
    """Callable ``(model, h (B, 1, dim), positions (B,), cache_rows (B,) | None) -> h`` after the last layer."""

    def __init__(self, weights: list[torch.Tensor], qtypes: list[int], n_heads: int, eps: float) -> None:
        self.weights, self.qtypes, self.n_heads, self.eps = weights, qtypes, n_heads, eps
        # The first wq's blocks: .to(...) replaces every buffer, so a changed identity means a stale kernel.
        # (Swapping single modules after loading is not supported: rebuild with FusedDecode.build.)
        self._anchor = weights[1]

    @classmethod
    def build(cls, model: Transformer) -> FusedDecode | None:
        """The fused kernel for ``model``, or None if any layer cannot use it (then the layers run as usual)."""
        if os.environ.get("LLAMA3_FUSED_DECODE", "1") == "0" or model.device.type != "cpu":
            return None
        if model.config.head_dim % 8 or not native.available():
            return None
        weights: list[torch.Tensor] = []
        qtypes: list[int] = []
        for layer in model.layers:
            norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
                return None
            mats = [layer.get_submodule(name) for name in _MATRICES]
            if not all(isinstance(m, QuantLinear) and m.native for m in mats):
                return None
            wq, wk, wv, wo, w1, w3, w2 = (m.blocks for m in mats)
            weights += [norms[0], wq, wk, wv, wo, norms[1], w1, w3, w2]
            qtypes += [m.ggml_type for m in mats]
        return cls(weights, qtypes, model.config.n_heads, model.config.norm_eps)

    def usable(self, model: Transformer, h: torch.Tensor) -> bool:
        """Whether this call can run fused: float32 rows, the same weights as at build, a float32 CPU cache,
        nothing to differentiate (the native op has no backward), and no LoRA adapter engaged."""
        cache = model.layers[0].attention.cache
        wq = model.layers[0].attention.wq
        # An adapter wrapper (llama3.lora) keeps the base module as ``base``: the kernel reads the base weights, so
        # it runs only while no adapter adds its term.
        adapters = getattr(model, "adapters", None)
        return (
            h.dtype == torch.float32
            and not (torch.is_grad_enabled() and (h.requires_grad or self.weights[0].requires_grad))
            and getattr(getattr(wq, "base", wq), "blocks", None) is self._anchor
            and (adapters is None or not adapters.engaged())
            and cache is not None
            and cache.k.dtype == torch.float32
            and cache.k.device.type == "cpu"
        )

    def __call__(
        self, model: Transformer, h: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor | None
    ) -> torch.Tensor:
        bsz = h.shape[0]
        rows = cache_rows if cache_rows is not None else torch.arange(bsz)
        caches = [layer.attention.cache for layer in model.layers]
        out = native.decode_layers(
            h.reshape(bsz, -1).contiguous(),
            self.weights,
            self.qtypes,
            [c.k for c in caches],
            [c.v for c in caches],
            model.rope,
            positions.to(torch.long).contiguous(),
            rows.to(torch.long).contiguous(),
            self.n_heads,
            self.eps,
        )
        return out.view(bsz, 1, -1)
