"""The canonical state dict and its strict loading into a ``Transformer``."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer, rope_table

log = logging.getLogger("llama3.checkpoint")


@dataclass
class GGMLTensor:
    """A GGUF tensor still in its file encoding (``data``: raw blocks, memory-mapped), shape in torch order."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of ``shape`` (the reference expansion, by the ``gguf`` package)."""
        from gguf import quants

        try:
            values = quants.dequantize(self.data, self.ggml_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"tensor {self.name}: cannot dequantize type {self.type_name}: {exc}") from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape)

    def narrow(self, dim: int, start: int, stop: int) -> GGMLTensor | torch.Tensor:
        """Indices ``start:stop`` along ``dim`` of this 2-D matrix, still in its blocks (a view of the file)
        when the cut falls on block boundaries, which rows always do; else the slice expanded to float32."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        rows, cols = self.shape
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        data = self.data.reshape(rows, -1)
        if dim == 0:
            return GGMLTensor(self.name, self.ggml_type, (stop - start, cols), data[start:stop])
        if start % block_size == 0 and stop % block_size == 0:
            columns = data[:, start // block_size * block_bytes : stop // block_size * block_bytes]
            return GGMLTensor(self.name, self.ggml_type, (rows, stop - start), columns)
        log.warning("tensor %s: columns %d:%d do not fall on %s block boundaries (%d values); this rank holds "
                    "them in float", self.name, start, stop, self.type_name, block_size)
        return self.dequantize()[:, start:stop].clone()


StateDict = dict[str, Union[torch.Tensor, GGMLTensor]]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes for ``config`` (tied models have no ``output.weight``)."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_embeddings:
        del shapes["output.weight"]
    return shapes


_LAYER = re.compile(r"layers\.(\d{1,9})\.")  # (longer digit strings are not layers: unexpected tensors)


def _names(names: list[str]) -> str:
    return f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"


def _spans(indices: set[int]) -> str:
    """Sorted integers as ranges: {0, 1, 2, 5} -> "0-2, 5" (the first few ranges)."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = [str(a) if a == b else f"{a}-{b}" for a, b in spans[:6]]
    return ", ".join(text) + (" ..." if len(spans) > 6 else "")


def _check_layer_count(config: ModelConfig, state: StateDict, source: str) -> None:
    """Refuse a config whose layer count is not the checkpoint's (layers 0..n_layers-1 all present), before
    anything is built from it: a corrupt count (2**32-1) must not make ``expected_shapes`` build that many layers."""
    found = {int(m.group(1)) for m in map(_LAYER.match, state) if m}
    if len(found) == config.n_layers and max(found, default=-1) == config.n_layers - 1:  # found is 0..n_layers-1
        return
    parts = [f"the config has {config.n_layers} layers, the checkpoint tensors for {len(found)}"
             + (f" (layers {_spans(found)})" if found else "")]  # fmt: skip
    unexpected = sorted(name for name in state if (m := _LAYER.match(name)) and int(m.group(1)) >= config.n_layers)
    if unexpected:
        parts.append(f"unexpected tensors: {_names(unexpected)}")
    raise CheckpointError(f"{source}: checkpoint does not match its config ({'; '.join(parts)})")


def check_state(config: ModelConfig, state: StateDict, source: str) -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected or mis-shaped tensor (the layer count is
    checked first, against the tensors alone)."""
    _check_layer_count(config, state, source)
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names(unexpected)}")
        raise CheckpointError(f"{source}: checkpoint does not match its config ({'; '.join(parts)})")
    for name, shape in shapes.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(got)}, config expects {list(shape)}")


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def build_model(
    config: ModelConfig,
    state: StateDict,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    source: str = "checkpoint",
) -> Transformer:
    """Instantiate a ``Transformer`` from a canonical state dict, strictly (every tensor used, none missing).

    With ``quantize="auto"``, GGUF linear weights whose encoding has a fast kernel stay quantized
    (``llama3.quant``); everything else is expanded to ``dtype``.
    """
    if quantize not in (None, "auto"):
        raise CheckpointError(f"unknown quantize mode {quantize!r} (expected 'auto' or None)")
    check_state(config, state, source)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config)

    # Our quantized kernels are CPU kernels; on a GPU, dense bf16 weights are the fast path.
    keep_quantized = quantize == "auto" and device.type == "cpu"
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        module_name = name.removesuffix(".weight")
        if isinstance(value, GGMLTensor):
            if keep_quantized and _swap_quantized(model, module_name, value, config, dtype, device):
                continue
            value = value.dequantize()
        tensors[name] = value.to(device=device, dtype=dtype)

    # Quantized modules own their weights; load the rest strictly, allocating nothing twice (assign=True).
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (config.tie_embeddings and k == "output.weight")]
    missing = [k for k in missing if k.removesuffix(".weight") not in _quantized_modules(model)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source}: internal layout mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    if config.tie_embeddings and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    model.rope = rope_table(config, min(config.max_seq_len, 2048), device)
    if keep_quantized:
        from ..quant.fused import FusedDecode

        model.decode_kernel = FusedDecode.build(model)
    # Loaded weights are for inference; fine-tuning code re-enables gradients where it needs them.
    return model.eval().requires_grad_(False)


def _swap_quantized(
    model: Transformer, module_name: str, t: GGMLTensor, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> bool:
    """Replace ``module_name`` by a module that keeps ``t`` in its GGUF blocks; False if no kernel fits."""
    from ..quant import quantized_embedding, quantized_linear, tied_output

    module = model.get_submodule(module_name)
    if isinstance(module, nn.Linear):
        replacement = quantized_linear(t, dtype=dtype, device=device)
    elif isinstance(module, nn.Embedding):
        replacement = quantized_embedding(t, dtype=dtype, device=device)
        if replacement is not None and config.tie_embeddings:
            # The tied head reads the embedding's blocks. Without a kernel for it, keep one float table for both
            # rather than a quantized embedding next to a float copy of the same matrix.
            head = tied_output(replacement)
            if head is None:
                return False
            _set_module(model, "output", head)
    else:
        return False
    if replacement is None:
        return False
    _set_module(model, module_name, replacement)
    return True


def _quantized_modules(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if getattr(m, "is_quantized", False)}
