"""A decode step compiled by ``torch.compile`` over the static KV cache: the GPU path (gpt-fast's recipe).

On a GPU a small decode step is bound by kernel launches, not arithmetic: dozens of ops per layer, each a few
microseconds to launch. Compiled with ``mode="reduce-overhead"`` the whole step becomes one CUDA graph that is
replayed. A graph needs fixed shapes, so the step here never changes shape with the batch or the position:

* the batch is padded to a power of two (at most the cache's rows): a handful of graphs, not one per width;
  padding rows are the cache rows just past the batch, which the scheduler's decode steps leave free, and they
  write their throwaway keys at the cache's last position, which no slot's cached prompt chunks reach;
* attention reads every cache position under a per-row position mask instead of slicing to the longest row.

It is a ``DecodeKernel`` (``Transformer.decode_kernel``): the model stays the same module and runs as written
wherever the kernel steps aside (prefill, explicit cache rows, training, LoRA). On CPU the quantized models'
own fused kernel is faster; there the compiled step serves float models (``--compile``), and it is how the
tests check this code without a GPU.
"""

from __future__ import annotations

import torch

from .model import Transformer


def _padded(rows: int, limit: int) -> int:
    """The next power of two >= ``rows``, capped at ``limit`` (the cache's rows)."""
    return min(1 << (rows - 1).bit_length(), limit)


class CompiledDecode:
    """One-token decode through every layer as a compiled graph of fixed shape."""

    def __init__(self, model: Transformer, mode: str | None = None) -> None:
        self.mode = mode or ("reduce-overhead" if model.device.type == "cuda" else "default")

        def step(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            pos = positions[:, None]  # (B, 1)
            rope = model.rope[pos]
            keys = torch.arange(model.cache_len, device=h.device)
            mask = (keys[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, S): each row its own prefix
            for layer in model.layers:
                h = layer(h, rope, pos, mask, None, None)
            return h

        self._step = torch.compile(step, mode=self.mode, dynamic=False)

    def usable(self, model: Transformer, h: torch.Tensor) -> bool:
        """Inference only (no graph for gradients), with a KV cache, and no LoRA adapter engaged (their per-row
        routing is not part of the graph)."""
        adapters = getattr(model, "adapters", None)
        return (
            not (torch.is_grad_enabled() and h.requires_grad)
            and model.layers[0].attention.cache is not None
            and (adapters is None or not adapters.engaged())
        )

    def __call__(
        self, model: Transformer, h: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor | None
    ) -> torch.Tensor:
        if cache_rows is not None:  # rows mapped to arbitrary cache rows: padding rows could hit a busy one
            return model.run_layers(h, positions, positions[:, None], None, cache_rows)
        rows = h.shape[0]
        padded = _padded(rows, model.cache_batch)
        if padded > rows:
            h = torch.cat([h, h.new_zeros(padded - rows, *h.shape[1:])])
            last = torch.full((padded - rows,), model.cache_len - 1, dtype=positions.dtype, device=positions.device)
            positions = torch.cat([positions, last])
        return self._step(h, positions)[:rows]


def enable(model: Transformer, mode: str | None = None) -> bool:
    """Install the compiled decode step on ``model`` unless it already has a decode kernel (the quantized CPU
    models' fused kernel is faster there); whether it was installed."""
    if model.decode_kernel is not None:
        return False
    model.decode_kernel = CompiledDecode(model, mode)
    return True
