"""Tensor-parallel layers as wrappers around the pure model's own modules (module swap, no model fork).

A rank's ``Transformer`` is built from ``ShardPlan.local_config``, so its linears already hold only the rank's
rows or columns (float ``nn.Linear`` or quantized ``QuantLinear`` alike) and its attention runs only the
rank's heads against a KV cache of only the rank's kv heads. What is left is communication, added here:

* ``RowParallel`` around ``wo`` and ``w2``: one all-reduce of the partial products (two per layer);
* ``VocabParallelEmbedding`` around ``tok_embeddings``: look up the rank's rows, zeros elsewhere, all-reduce;
* ``GatheredOutput`` around ``output``: the rank's logits columns, all-gathered into the full vocabulary.

Why not torch's DTensor ``parallelize_module``: its Colwise/RowwiseParallel styles shard ``nn.Linear`` and
``nn.Embedding`` parameters only, not the GGUF block tensors of ``QuantLinear``/``QuantEmbedding`` (uint8
blocks whose column split must fall on block boundaries); they distribute full tensors, where each rank
here reads only its slice from the file; and each DTensor op dispatches through Python on every decode step,
which on a CPU costs more than the arithmetic of a small layer. The plan and the collectives are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Transformer
from .plan import ShardPlan
from .world import World


class RowParallel(nn.Module):
    """``inner`` holds this rank's input columns; the sum of every rank's partial output is the full product."""

    def __init__(self, inner: nn.Module, world: World) -> None:
        super().__init__()
        self.inner, self.world = inner, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.world.all_reduce_(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """``inner`` holds vocabulary rows ``start:start + rows``; other ids contribute zeros to the sum."""

    def __init__(self, inner: nn.Module, start: int, rows: int, world: World) -> None:
        super().__init__()
        self.inner, self.start, self.rows, self.world = inner, start, rows, world

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.rows)
        h = self.inner(torch.where(inside, local, torch.zeros_like(local)))
        h = h * inside.unsqueeze(-1).to(h.dtype)  # exact: each id's row is added to zeros on the other ranks
        return self.world.all_reduce_(h)


class GatheredOutput(nn.Module):
    """``inner`` computes this rank's ``chunk`` logit columns (fewer on the last rank); all ranks get them all."""

    def __init__(self, inner: nn.Module, chunk: int, vocab_size: int, world: World) -> None:
        super().__init__()
        self.inner, self.chunk, self.vocab_size, self.world = inner, chunk, vocab_size, world

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.inner(h)
        if local.shape[-1] < self.chunk:  # equal shapes for the gather; the padding is cut below
            local = F.pad(local, (0, self.chunk - local.shape[-1]))
        return torch.cat(self.world.all_gather(local), dim=-1)[..., : self.vocab_size]


def parallelize(model: Transformer, plan: ShardPlan, world: World) -> Transformer:
    """Add the collectives to ``model``, a rank's share built from ``plan.local_config``; in place.

    The model then answers for the whole model: ``config`` is the full architecture, logits cover the whole
    vocabulary, and every rank computes the same logits from the same tokens.
    """
    for layer in model.layers:
        layer.attention.wo = RowParallel(layer.attention.wo, world)
        layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2, world)
    rows = plan.vocab_stop - plan.vocab_start
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, plan.vocab_start, rows, world)
    model.output = GatheredOutput(model.output, plan.vocab_chunk, plan.config.vocab_size, world)
    model.config = plan.config
    # A backend's whole-model decode kernel would skip the collectives: the layers run as written.
    model.decode_kernel = None
    model.world = world
    return model
