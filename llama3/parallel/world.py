"""The process group of a tensor-parallel job: torchrun's environment -> ``torch.distributed``, with timeouts.

Every rank runs the same command (``torchrun --nproc-per-node N -m llama3 ...``). ``init_world()`` joins the
default process group (gloo on CPU, NCCL on CUDA) with a collective timeout, so a rank that dies or hangs ends
the job with a ``ParallelError`` on the others instead of a hang. Collectives go through ``World`` so that
every failure reads the same way, whichever layer or driver hit it.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ParallelError

T = TypeVar("T")

# Seconds a collective may wait for the other ranks before the job fails (LLAMA3_TP_TIMEOUT overrides). Idle
# servers send a heartbeat well within it, so it bounds only how long a hung rank goes unnoticed.
DEFAULT_TIMEOUT_S = 120.0

# All-reduces of at most this many gathered bytes run as one all-gather and a local sum on gloo (see
# ``World.all_reduce_``); larger ones (prefill activations) keep the ring's bandwidth.
GATHER_REDUCE_BYTES = 1 << 20

_world: World | None = None


@dataclass
class World:
    """This process's place in the job: ``rank`` of ``size``, the device its shard lives on, the timeout."""

    rank: int
    size: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def leader(self) -> bool:
        """Rank 0: the one that prints, reads standard input and serves HTTP."""
        return self.rank == 0

    def _run(self, what: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except ParallelError:
            raise
        except Exception as exc:  # gloo/NCCL raise RuntimeError (and subclasses) for dead peers and timeouts
            detail = " ".join(str(exc).split())[:300]
            raise ParallelError(
                f"tensor-parallel job failed during {what} on rank {self.rank} of {self.size}: another rank died or "
                f"stopped answering within {self.timeout_s:g} s ({type(exc).__name__}: {detail})"
            ) from None

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.backend == "gloo" and tensor.numel() * tensor.element_size() * self.size <= GATHER_REDUCE_BYTES:
            # Gloo's ring all-reduce takes 2(N-1) message rounds, and on CPUs each round's latency, not its
            # bytes, is the cost of a decode step's small activations. One all-gather and a local sum in
            # rank order is a single round, and gives every rank the same bits.
            flat = tensor.contiguous().view(-1)
            parts = torch.empty(self.size * flat.numel(), dtype=flat.dtype, device=flat.device)
            self._run("all_reduce", lambda: dist.all_gather_single(parts, flat))
            tensor.copy_(parts.view(self.size, -1).sum(0).view(tensor.shape))
            return tensor
        self._run("all_reduce", lambda: dist.all_reduce(tensor))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._run("all_gather", lambda: dist.all_gather(parts, tensor))
        return parts

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything; it is ignored)."""
        box = [pickle.dumps(obj) if self.leader else None]
        self._run("broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return pickle.loads(box[0])

    def barrier(self) -> None:
        self._run("barrier", lambda: dist.barrier())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ParallelError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_from_env() -> float:
    """``LLAMA3_TP_TIMEOUT`` in seconds (default ``DEFAULT_TIMEOUT_S``)."""
    text = os.environ.get("LLAMA3_TP_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ParallelError(f"LLAMA3_TP_TIMEOUT={text!r} must be a number of seconds > 0")
    return value


def launched_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 outside torchrun)."""
    size = _env_int("WORLD_SIZE")
    return 1 if size is None else size


def init_world(device: torch.device | str | None = None) -> World | None:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the
    environment), once per process; None when this is a single process. CUDA ranks take ``cuda:LOCAL_RANK``."""
    global _world
    if _world is not None:
        return _world
    size = launched_size()
    if size <= 1 and not dist.is_initialized():
        return None
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") or 0
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_from_env()
    if not dist.is_initialized():  # a script may have joined already (as Meta's reference does)
        if rank is None or any(os.environ.get(k) is None for k in ("MASTER_ADDR", "MASTER_PORT")):
            raise ParallelError(
                f"WORLD_SIZE={size} but RANK, MASTER_ADDR or MASTER_PORT is not set: start the job with "
                "torchrun (e.g. torchrun --nproc-per-node 2 -m llama3 ...)"
            )
        try:
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
        except Exception as exc:  # rendezvous failures: wrong address, port taken, peers that never came
            raise ParallelError(f"cannot join the tensor-parallel job as rank {rank} of {size}: {exc}") from None
        # A process group still alive at interpreter exit is torn down with its threads running, which aborts
        # the process (SIGABRT, "terminate called without an active exception") and fails the whole job.
        atexit.register(shutdown)
    _world = World(rank=dist.get_rank(), size=dist.get_world_size(), device=device,
                   backend=dist.get_backend(), timeout_s=timeout)
    return _world


def current() -> World | None:
    """The world ``init_world`` joined, or None."""
    return _world


def shutdown() -> None:
    """Leave the process group (at exit; safe to call when none was joined)."""
    global _world
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly; the process is ending
            pass
    _world = None
