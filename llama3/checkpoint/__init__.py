"""Checkpoint loading: every format is read into one canonical state dict, then loaded strictly.

Canonical = Meta's parameter names (``tok_embeddings.weight``, ``layers.N.attention.wq.weight`` ...) with
q/k rows in the interleaved rotary layout. A reader returns ``(ModelConfig, state)`` where each value is a
``torch.Tensor`` or, for GGUF, a ``GGMLTensor`` still in its quantized blocks so that quantized linear
layers can keep it compressed in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer
from .state import GGMLTensor, StateDict, build_model


def detect_format(path: Path) -> str:
    """'gguf', 'hf' or 'meta' from what a path contains (never from its name alone)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}); pass a .gguf file or a checkpoint directory")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    ):
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"{path}: no recognised checkpoint (expected params.json + consolidated.NN.pth, "
        "config.json + *.safetensors, or a single .gguf file)"
    )


def read_checkpoint(path: str | Path, shard: tuple[int, int] | None = None) -> tuple[ModelConfig, StateDict]:
    """Read any supported checkpoint into ``(config, canonical state dict)``. With ``shard`` (rank, size) the
    state holds only that tensor-parallel rank's slices (``llama3.parallel.plan``), read without the rest."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    if fmt == "gguf":
        from .gguf import read_gguf

        if path.is_dir():
            path = next(path.glob("*.gguf"))
        return read_gguf(path, shard)
    if fmt == "meta":
        from .meta import read_meta

        return read_meta(path, shard)
    from .hf import read_hf

    return read_hf(path, shard)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    quantize: str | None = "auto",
) -> Transformer:
    """Load a ``.gguf`` file, a Hugging Face directory or a Meta directory as a ready ``Transformer``.

    ``device``/``dtype`` default to CUDA + bfloat16 when a GPU is present, else CPU + float32.
    ``quantize``: "auto" keeps GGUF weights in their quantized form where a fast kernel exists,
    None expands every weight to ``dtype`` (the exact float reference path).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    config, state = read_checkpoint(path)
    return build_model(config, state, device=device, dtype=dtype, quantize=quantize, source=str(path))


__all__ = ["GGMLTensor", "StateDict", "build_model", "detect_format", "load_model", "read_checkpoint"]
