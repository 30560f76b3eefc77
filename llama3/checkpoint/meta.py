"""Meta's checkpoint format: ``params.json`` + ``consolidated.NN.pth`` (one file per model-parallel rank).

Meta already uses the canonical names and the interleaved rotary layout, so reading is: parse
``params.json`` into a ``ModelConfig``, load every shard as a weights-only pickle (memory-mapped,
never executing code), and merge model-parallel shards by fairscale's rules:

* column-parallel (split on dim 0): ``wq wk wv w1 w3 output tok_embeddings``
* row-parallel (split on dim 1): ``wo w2``
* replicated: the RMSNorm weights (taken from shard 0)

``params.json`` keys are Meta's ``ModelArgs`` fields. Llama 3.1's ``"use_scaled_rope": true`` selects
``RopeScaling()`` defaults; llama-models' ``rope_scaling_factor`` / ``rope_high_freq_factor`` (and the
``rope_low_freq_factor`` sibling) override single values, and a Hugging Face style ``"rope_scaling"``
object (``factor, low_freq_factor, high_freq_factor, original_max_position_embeddings``) states them all.
Keys this reader does not use are kept in ``ModelConfig.extra``.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError
from ..model import rope_frequencies
from ..parallel.plan import COLUMN_PARALLEL, ROW_PARALLEL, Region, ShardPlan, split_dim
from .state import check_state, expected_shapes

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
# Some exports carry the rotary frequencies as a tensor; the model recomputes them from the config.
ROPE_FREQ_NAMES = ("rope_freqs.weight", "rope.freqs")

_INT_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")
_FLOAT_KEYS = ("ffn_dim_multiplier", "norm_eps", "rope_theta")
_REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size")
_NULLABLE = ("n_kv_heads", "ffn_dim_multiplier")
_LLAMA_MODELS_ROPE_KEYS = {
    "rope_scaling_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
}
_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or ``CheckpointError`` naming the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def number(data: dict[str, Any], key: str, kind: type, source: Path, *, positive: bool = False) -> Any:
    """``data[key]`` as an int or float; JSON ``true`` is not a number and ``4096.0`` is a fine int."""
    value = data[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        raise CheckpointError(f"{source}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if positive and value <= 0:
        raise CheckpointError(f"{source}: {key} must be positive, got {value!r}")
    return kind(value)


def rope_scaling_from(values: dict[str, Any], source: Path, where: str) -> RopeScaling:
    """``RopeScaling`` from a dict with some of its field names; absent fields keep Meta's defaults."""
    kwargs = {}
    for key in _ROPE_FIELDS:
        if values.get(key) is not None:
            kwargs[key] = number(values, key, int if key == "original_max_position_embeddings" else float, source)
    scaling = RopeScaling(**kwargs)
    if scaling.factor <= 0 or scaling.original_max_position_embeddings <= 0:
        raise CheckpointError(f"{source}: {where}: factor and original_max_position_embeddings must be positive")
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise CheckpointError(
            f"{source}: {where}: high_freq_factor ({scaling.high_freq_factor}) must exceed "
            f"low_freq_factor ({scaling.low_freq_factor})"
        )
    return scaling


def params_to_config(params: dict[str, Any], source: Path, *, tie_embeddings: bool = False) -> ModelConfig:
    """Map Meta's ``params.json`` (as a dict) to a ``ModelConfig``; ``source`` names the file in errors."""
    missing = [key for key in _REQUIRED if key not in params]
    if missing:
        raise CheckpointError(f"{source}: missing required key(s): {', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    for keys, kind in ((_INT_KEYS, int), (_FLOAT_KEYS, float)):
        for key in keys:
            if key in params and not (key in _NULLABLE and params[key] is None):
                kwargs[key] = number(params, key, kind, source, positive=key not in ("vocab_size", "norm_eps"))
    if kwargs["vocab_size"] <= 0:
        raise CheckpointError(
            f"{source}: vocab_size must be positive, got {kwargs['vocab_size']} "
            "(Llama 2 style params with vocab_size -1 are not supported)"
        )

    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise CheckpointError(f"{source}: use_scaled_rope must be true or false, got {scaled!r}")
    explicit = params.get("rope_scaling")
    if explicit is not None and not isinstance(explicit, dict):
        raise CheckpointError(f"{source}: rope_scaling must be an object, got {explicit!r}")
    if explicit:
        kwargs["rope_scaling"] = rope_scaling_from(explicit, source, "rope_scaling")
    elif scaled:
        overrides = {field: params[key] for key, field in _LLAMA_MODELS_ROPE_KEYS.items() if key in params}
        kwargs["rope_scaling"] = rope_scaling_from(overrides, source, "use_scaled_rope")
    # Llama 3.1 and later (the scaled-rope models) are trained for 128k positions, Llama 3 for 8k.
    kwargs["max_seq_len"] = 131072 if "rope_scaling" in kwargs else 8192

    used = set(_INT_KEYS) | set(_FLOAT_KEYS) | set(_LLAMA_MODELS_ROPE_KEYS) | {"use_scaled_rope", "rope_scaling"}
    extra = {key: value for key, value in params.items() if key not in used}
    try:
        return ModelConfig(**kwargs, tie_embeddings=tie_embeddings, extra=extra)
    except ValueError as exc:
        raise CheckpointError(f"{source}: inconsistent parameters: {exc}") from None


def shard_files(path: Path) -> list[Path]:
    """``consolidated.NN.pth`` files in rank order; the ranks must run 00, 01, ... without gaps."""
    found = {}
    for file in path.glob("consolidated.*.pth"):
        match = SHARD_PATTERN.match(file.name)
        if match:
            found[int(match.group(1))] = file
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN.pth shard files")
    gaps = [f"consolidated.{rank:02d}.pth" for rank in range(max(found) + 1) if rank not in found]
    if gaps:
        raise CheckpointError(
            f"{path}: model-parallel shards must be numbered 00..{max(found):02d} without gaps; "
            f"missing {', '.join(gaps)}"
        )
    return [found[rank] for rank in sorted(found)]


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    """One ``.pth`` as a name -> tensor dict, through the weights-only unpickler (no code runs)."""
    # mmap keeps a 16 GB shard on disk until each tensor is used; it needs torch's zip format.
    mmap = zipfile.is_zipfile(file)
    if not mmap:
        with open(file, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            raise CheckpointError(f"{file}: damaged or truncated PyTorch checkpoint (its zip archive is incomplete)")
        if head[:1] != b"\x80":  # pickle protocol >= 2 opcode, how legacy torch.save files begin
            raise CheckpointError(f"{file}: not a PyTorch checkpoint (neither torch's zip format nor a pickle)")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        what = f"it references {unsafe.group(1)}" if unsafe else _first_line(exc)
        raise CheckpointError(
            f"{file}: refused: not a weights-only PyTorch checkpoint ({what}); nothing in it was executed"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError... for damaged files
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise CheckpointError(f"{file}: damaged PyTorch checkpoint ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(data).__name__}")
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name!r} is not a tensor (type {type(value).__name__})")
    return data


def _first_line(exc: Exception) -> str:
    """The gist of a library error: its first sentence, without the advice that follows."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:300]


def merge_shards(
    files: list[Path], shards: list[dict[str, torch.Tensor]], config: ModelConfig, plan: ShardPlan | None = None
) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel pieces into full tensors, checking names and shapes against ``config``;
    with ``plan``, only this rank's region of each (copied out of the pieces that hold it, nothing else read)."""
    names = set(shards[0])
    for file, shard in zip(files[1:], shards[1:]):
        if set(shard) != names:
            odd = sorted(set(shard) ^ names)
            listing = ", ".join(odd[:6]) + (" ..." if len(odd) > 6 else "")
            raise CheckpointError(f"{file}: holds different tensors from {files[0].name} ({listing})")
    wanted = {name: list(shape) for name, shape in expected_shapes(config).items() if name in names}
    _check_shard_count(files, shards[0], wanted)
    n = len(shards)
    state = {}
    for name, want in wanted.items():
        parts = [shard[name] for shard in shards]
        dim = split_dim(name)
        if dim is None:
            # Replicated; check_state checks its shape. A rank takes the copy in the file of its own slices.
            state[name] = parts[plan.rank * n // plan.size] if plan is not None else parts[0]
            continue
        shapes = [list(p.shape) for p in parts]
        if any(s != shapes[0] for s in shapes):
            listing = ", ".join(f"{f.name} {s}" for f, s in zip(files, shapes))
            raise CheckpointError(f"{files[0].parent}: shards of {name} have different shapes ({listing})")
        piece = shapes[0]
        merged = piece[:dim] + [piece[dim] * n] + piece[dim + 1 :] if len(piece) == len(want) else piece
        if merged != want:
            if n == 1:
                raise CheckpointError(f"{files[0]}: tensor {name} has shape {piece}, but params.json implies {want}")
            raise CheckpointError(
                f"{files[0].parent}: tensor {name}: {n} shards of {piece} concatenate on dim {dim} to {merged}, "
                f"but params.json implies {want}"
            )
        region = plan.region(name) if plan is not None else None
        if region is not None:
            state[name] = _take(parts, dim, region)
        else:
            state[name] = torch.cat(parts, dim=dim) if n > 1 else parts[0]
    state.update({name: shards[0][name] for name in names if name not in state})  # unexpected: check_state names them
    return state


def _take(parts: list[torch.Tensor], dim: int, region: Region) -> torch.Tensor:
    """``region`` of the tensor the ``parts`` (equal pieces along ``dim``) concatenate to, as a new tensor."""
    if region.dim != dim:
        return torch.cat([p.narrow(region.dim, region.start, region.stop - region.start) for p in parts], dim=dim)
    size = parts[0].shape[dim]
    pieces = []
    for index in range(region.start // size, (region.stop - 1) // size + 1):
        lo, hi = max(region.start, index * size), min(region.stop, (index + 1) * size)
        pieces.append(parts[index].narrow(dim, lo - index * size, hi - lo))
    # A copy either way: the memory-mapped shard files are released once loading ends.
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0].clone()


def _check_shard_count(files: list[Path], first: dict[str, torch.Tensor], wanted: dict[str, list[int]]) -> None:
    """Fail clearly when every split tensor of shard 0 is the same fraction 1/k of its full shape, k != #files."""
    ratios = set()
    for name, want in wanted.items():
        dim = split_dim(name)
        if dim is None:
            continue
        piece = list(first[name].shape)
        if len(piece) != len(want) or any(a != b for i, (a, b) in enumerate(zip(piece, want)) if i != dim):
            return
        if not piece[dim] or want[dim] % piece[dim]:
            return
        ratios.add(want[dim] // piece[dim])
    if len(ratios) == 1 and (ranks := ratios.pop()) != len(files):
        found = f"{len(files)} consolidated.NN.pth file(s) were found"
        if ranks == 1:
            raise CheckpointError(
                f"{files[0].parent}: {files[0].name} holds whole tensors (a 1-shard checkpoint), but {found}"
            )
        missing = ", ".join(f"consolidated.{r:02d}.pth" for r in range(len(files), ranks))
        raise CheckpointError(
            f"{files[0].parent}: {files[0].name} holds 1/{ranks} of each split tensor, so the checkpoint has {ranks} "
            f"model-parallel shards, but {found}" + (f"; missing {missing}" if missing else "")
        )


def check_rope_freqs(value: torch.Tensor, config: ModelConfig, source: Path) -> None:
    """Accept a stored frequency tensor only if it says what the config says (inverse frequencies or
    llama.cpp-style scaling divisors), so dropping it cannot change the model."""
    half = config.head_dim // 2
    if tuple(value.shape) != (half,):
        raise CheckpointError(f"{source}: rope frequencies have shape {list(value.shape)}, expected [{half}]")
    stored = value.double()
    scaled = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    base = rope_frequencies(config.head_dim, config.rope_theta, None)
    # Stored tensors are often bf16 (8 significant bits), hence the loose tolerance.
    if torch.allclose(stored, scaled, rtol=1e-2, atol=0) or torch.allclose(stored, base / scaled, rtol=1e-2, atol=0):
        return
    raise CheckpointError(
        f"{source}: the stored rope frequencies disagree with params.json's rope_theta/use_scaled_rope "
        f"(stored {_short(stored)}, params.json gives {_short(scaled)})"
    )


def _short(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values[:4].tolist()) + ", ...]"


def read_meta(path: Path, shard: tuple[int, int] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Meta checkpoint directory into ``(config, canonical state dict)``; with ``shard`` (rank, size),
    the state holds only that tensor-parallel rank's slices (``llama3.parallel.plan``), any shard count."""
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.is_file():
        raise CheckpointError(f"{path}: no params.json")
    params = read_json(params_file)
    files = shard_files(path)
    shards = [load_shard(file) for file in files]
    # Meta's 3.2 1B/3B share the embedding matrix with the output layer and simply omit output.weight.
    config = params_to_config(params, params_file, tie_embeddings="output.weight" not in shards[0])
    for name in ROPE_FREQ_NAMES:
        if name in shards[0]:
            check_rope_freqs(shards[0][name], config, files[0])
            for pieces in shards:
                pieces.pop(name, None)
    plan = ShardPlan(config, *shard) if shard is not None else None
    state = merge_shards(files, shards, config, plan)
    check_state(plan.local_config if plan is not None else config, state,
                f"{path} (params.json + {len(files)} consolidated.NN.pth)")
    return config, state


__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "params_to_config", "read_json", "read_meta", "split_dim"]
