"""Weight-only quantized layers over GGUF blocks: weights stay in their file encoding in memory.

``build_model(..., quantize="auto")`` swaps modules through the factories here:

* ``quantized_linear(t, dtype, device)``: a ``QuantLinear`` for Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K matrices (AVX2 kernels on
  CPU, dequantize-on-the-fly elsewhere), or None for every other encoding (the loader then expands it).
* ``quantized_embedding(t, dtype, device)``: a ``QuantEmbedding`` that decodes only the looked-up rows
  (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), or None.
* ``tied_output(embedding)``: the output head of a tied-embedding model as a ``QuantLinear`` sharing the
  embedding's blocks (no second copy), or None.

On CPU the blocks are a zero-copy view of the memory-mapped GGUF file, so the resident weight memory is
the file's size: Q4_0 0.5625, Q4_1 0.625, Q8_0 1.0625 bytes per weight.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import native
from .blocks import FORMATS, dequantize_rows
from .modules import NATIVE_TYPES, QuantEmbedding, QuantLinear

if TYPE_CHECKING:
    from ..checkpoint.state import GGMLTensor


def _blocks(t: GGMLTensor, device: torch.device) -> torch.Tensor | None:
    """The tensor's raw blocks as uint8 (rows, bytes_per_row) on ``device``, or None if not a 2-D matrix."""
    if len(t.shape) != 2 or t.ggml_type not in FORMATS:
        return None
    block_size, block_bytes, _ = FORMATS[t.ggml_type]
    rows, cols = t.shape
    if cols % block_size or t.data.size != rows * cols // block_size * block_bytes:
        return None
    data = np.ascontiguousarray(t.data.reshape(rows, -1).view(np.uint8))
    with warnings.catch_warnings():
        # The file is mapped read-only; these buffers are only ever read, so sharing the mapping is safe.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        blocks = torch.from_numpy(data)
    return blocks.to(device)


def quantized_linear(t: GGMLTensor, dtype: torch.dtype, device: torch.device | str) -> QuantLinear | None:
    """A ``QuantLinear`` computing x @ W^T for the GGUF matrix ``t`` (torch shape (out, in)), or None.

    None when ``t``'s encoding has no fast kernel here: only Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K have one, on CPU only
    where the AVX2 kernels could be built. ``dtype`` is accepted for symmetry: outputs follow x's dtype.
    """
    device = torch.device(device)
    if t.ggml_type not in NATIVE_TYPES:
        return None
    if device.type == "cpu" and not native.available():
        return None  # the portable path would re-expand the matrix on every call: a float Linear is faster
    blocks = _blocks(t, device)
    if blocks is None:
        return None
    out_features, in_features = t.shape
    return QuantLinear(blocks, t.ggml_type, in_features, out_features)


def quantized_embedding(t: GGMLTensor, dtype: torch.dtype, device: torch.device | str) -> QuantEmbedding | None:
    """A ``QuantEmbedding`` returning rows of ``t`` (torch shape (vocab, dim)) in ``dtype``, or None."""
    blocks = _blocks(t, torch.device(device))
    if blocks is None:
        return None
    num_embeddings, embedding_dim = t.shape
    return QuantEmbedding(blocks, t.ggml_type, num_embeddings, embedding_dim, dtype)


def tied_output(embedding: QuantEmbedding) -> QuantLinear | None:
    """The output projection h @ E^T of a tied-embedding model, reading the embedding's own blocks."""
    blocks = embedding.blocks
    if embedding.ggml_type not in NATIVE_TYPES or (blocks.device.type == "cpu" and not native.available()):
        return None
    return QuantLinear(blocks, embedding.ggml_type, embedding.embedding_dim, embedding.num_embeddings)


__all__ = [
    "QuantEmbedding",
    "QuantLinear",
    "dequantize_rows",
    "quantized_embedding",
    "quantized_linear",
    "tied_output",
]
