"""Keeping every rank's decoding core in step when only rank 0 hears the requests (the server).

Each rank owns an identical ``Scheduler`` over its share of the model. Before every step, rank 0 broadcasts
``Orders``: the sequences submitted since the last step (spec and seed), the ones cancelled, whether to end
everything (drain deadline) or stop. Every rank applies the same orders and then runs the same ``step()``, so
the forwards, and the collectives inside them, line up, and the same logits with the same per-sequence seeds
choose the same tokens on every rank. Only rank 0 hands text to clients. While idle, rank 0 sends empty
orders every quarter of the collective timeout, so a quiet server never trips it but a dead rank does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..scheduler import Scheduler
from ..sequence import GenerationSpec, Sequence
from ..tokenizer import Tokenizer
from .world import World

log = logging.getLogger("llama3.parallel")


@dataclass
class Orders:
    """What every rank does before its next step. ``add``: (id, spec, seed) of new sequences, in order;
    ``cancel``: ids to cancel; ``end_all``: (message, kind) to end every sequence with; ``stop``: leave."""

    add: list[tuple[int, GenerationSpec, int]] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    end_all: tuple[str, str] | None = None
    stop: bool = False


def heartbeat_s(world: World) -> float:
    """How long rank 0 may stay silent while idle."""
    return world.timeout_s / 4


def follow(scheduler: Scheduler, tokenizer: Tokenizer, world: World) -> None:
    """Run rank 0's orders on this rank's ``scheduler`` until it says stop (or the job fails:
    ``ParallelError``). Text is not emitted here; rank 0 alone talks to clients."""
    stop_tokens = frozenset(tokenizer.stop_tokens)
    running: dict[int, Sequence] = {}
    with torch.inference_mode():
        while True:
            orders: Orders = world.broadcast()
            if orders.stop:
                return
            for uid, spec, seed in orders.add:
                generator = torch.Generator(scheduler.device).manual_seed(seed)
                seq = Sequence(spec, tokenizer, generator, stop_tokens, tag=uid)
                running[uid] = seq
                scheduler.waiting.append(seq)  # rank 0 checked it before accepting the request
            for uid in orders.cancel:
                if uid in running:
                    running[uid].cancel()
            if orders.end_all is not None:
                for seq in scheduler.end_all(*orders.end_all):
                    running.pop(seq.tag, None)
            if scheduler.busy:
                for seq in scheduler.step():
                    if seq.done:
                        running.pop(seq.tag, None)
