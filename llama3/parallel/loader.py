"""Loading a checkpoint as one rank's share of a tensor-parallel model."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import build_model, read_checkpoint
from ..checkpoint import default_dtype as _default_dtype
from ..model import Transformer
from .layers import parallelize
from .plan import ShardPlan
from .world import World


def load_parallel_model(
    path: str | Path, world: World, dtype: torch.dtype | None = None, *, quantize: str | None = "auto"
) -> Transformer:
    """This rank's share of the checkpoint at ``path`` (any format), on ``world.device``, ready to run in
    step with the other ranks: every rank must call it, and then run the same forwards in the same order."""
    path = Path(path).expanduser()
    dtype = dtype or _default_dtype(world.device)
    config, state = read_checkpoint(path, shard=(world.rank, world.size))
    plan = ShardPlan(config, world.rank, world.size)
    model = build_model(plan.local_config, state, device=world.device, dtype=dtype, quantize=quantize,
                        source=f"{path} (rank {world.rank} of {world.size})")
    del state
    return parallelize(model, plan, world)
