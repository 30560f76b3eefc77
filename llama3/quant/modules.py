"""Drop-in replacements for ``nn.Linear`` and ``nn.Embedding`` that keep GGUF weights in their blocks.

Both hold the raw ggml blocks as a uint8 buffer ``blocks`` of shape (rows, bytes_per_row) -- on CPU a
zero-copy view of the memory-mapped file -- and never materialise the whole float matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, native
from .blocks import FORMATS, dequantize_rows

# The portable path dequantizes at most this many bytes of float weights at a time.
_PORTABLE_SLAB_BYTES = 32 << 20
NATIVE_TYPES = frozenset({2, 3, 8, 12, 13, 14})  # Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K: what kernels.cpp implements


def _type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


class QuantLinear(nn.Module):
    """y = x @ W^T with W (out_features, in_features) stored as ggml blocks; no bias.

    CPU + AVX2: ``llama3_quant::qmatmul`` (fused block kernel for few rows, dequantize-to-slab + BLAS GEMM
    for many). Elsewhere (CUDA, other CPUs): dequantize slabs of W to x's dtype with torch ops and F.linear.
    """

    is_quantized = True

    def __init__(self, blocks: torch.Tensor, ggml_type: int, in_features: int, out_features: int) -> None:
        super().__init__()
        block_size, block_bytes, _ = FORMATS[ggml_type]
        if tuple(blocks.shape) != (out_features, in_features // block_size * block_bytes) or in_features % block_size:
            raise ValueError(
                f"{_type_name(ggml_type)} blocks of shape {list(blocks.shape)} do not encode a "
                f"{out_features} x {in_features} matrix"
            )
        self.ggml_type, self.in_features, self.out_features = int(ggml_type), in_features, out_features
        # Not persistent: state_dict() keeps the model's float layout; the blocks follow .to(device).
        self.register_buffer("blocks", blocks, persistent=False)
        self.native = False
        self._choose_path()

    def _choose_path(self) -> None:
        self.native = self.ggml_type in NATIVE_TYPES and self.blocks.device.type == "cpu" and native.available()
        # Many-row products (prefill) in bfloat16 where the CPU has bf16 units (``cpu``); few rows never.
        self.prefill_dtype = cpu.current().prefill_dtype if self.native else torch.float32

    def _apply(self, fn, recurse=True):
        # .to(device) moves the blocks; pick the kernel for the new device once here, not on every call.
        result = super()._apply(fn, recurse)
        self._choose_path()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # Fine-tuning an adapter above or below this frozen matrix needs the gradient of its input.
            return _QuantLinearFunction.apply(x, self)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            if self.prefill_dtype != torch.float32 and x.numel() > native.FUSED_MAX_ROWS * self.in_features:
                return self._gemm_lowp(x)
            # The op flattens, casts and restores x's shape and dtype itself.
            return native.qmatmul(x, self.blocks, self.ggml_type, self.in_features)
        return self._portable(x.reshape(-1, self.in_features)).to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _gemm_lowp(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W decoded a slab of rows at a time into ``prefill_dtype`` and torch's GEMM (oneDNN runs
        bfloat16 on AVX512_BF16 / AMX); each slab's result lands in a float32 output."""
        x2 = x.reshape(-1, self.in_features).to(self.prefill_dtype)
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        rows = max(16, native.SLAB_BYTES // (4 * self.in_features))
        for i in range(0, self.out_features, rows):
            w = self._dequantized_rows(i, min(i + rows, self.out_features)).to(self.prefill_dtype)
            out[:, i : i + w.shape[0]] = F.linear(x2, w)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out (..., N) @ W: the gradient of the input, decoding W one slab of rows at a time."""
        g = grad_out.reshape(-1, self.out_features).float()
        rows = max(1, _PORTABLE_SLAB_BYTES // (4 * self.in_features))
        out = g[:, :rows] @ self._dequantized_rows(0, min(rows, self.out_features))
        for i in range(rows, self.out_features, rows):
            out.addmm_(g[:, i : i + rows], self._dequantized_rows(i, min(i + rows, self.out_features)))
        return out.to(grad_out.dtype).view(*grad_out.shape[:-1], self.in_features)

    def _dequantized_rows(self, start: int, stop: int) -> torch.Tensor:
        blocks = self.blocks[start:stop]
        if self.native:
            return native.dequantize(blocks, self.ggml_type, self.in_features)
        return dequantize_rows(blocks, self.ggml_type).float()

    def _portable(self, x2: torch.Tensor) -> torch.Tensor:
        # CPU BLAS is slow in bfloat16/float16 without AVX512-BF16, so CPU computes in float32.
        compute = torch.float32 if x2.device.type == "cpu" else x2.dtype
        x2 = x2.to(compute)
        rows = max(1, _PORTABLE_SLAB_BYTES // (4 * self.in_features))
        if rows >= self.out_features:
            return F.linear(x2, self.dequantized_weight(compute))
        parts = [
            F.linear(x2, dequantize_rows(self.blocks[i : i + rows], self.ggml_type).to(compute))
            for i in range(0, self.out_features, rows)
        ]
        return torch.cat(parts, dim=-1)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float matrix (out_features, in_features), as gguf would dequantize it (then cast)."""
        return dequantize_rows(self.blocks, self.ggml_type).to(dtype)

    def extra_repr(self) -> str:
        kind = "native" if self.native else "portable"
        return f"in_features={self.in_features}, out_features={self.out_features}, {_type_name(self.ggml_type)}, {kind}"


class _QuantLinearFunction(torch.autograd.Function):
    """x @ W^T with a frozen quantized W: forward through the kernels, backward by dequantize-and-multiply."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return module._matmul(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        return ctx.module.input_grad(grad_out), None


class QuantEmbedding(nn.Module):
    """Token embedding over ggml blocks: gathers the requested rows' blocks and decodes only those."""

    is_quantized = True

    def __init__(self, blocks: torch.Tensor, ggml_type: int, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        block_size, block_bytes, _ = FORMATS[ggml_type]
        if (
            tuple(blocks.shape) != (num_embeddings, embedding_dim // block_size * block_bytes)
            or embedding_dim % block_size
        ):
            raise ValueError(
                f"{_type_name(ggml_type)} blocks of shape {list(blocks.shape)} do not encode a "
                f"{num_embeddings} x {embedding_dim} table"
            )
        self.ggml_type, self.num_embeddings, self.embedding_dim = int(ggml_type), num_embeddings, embedding_dim
        self.register_buffer("blocks", blocks, persistent=False)
        # Empty float buffer whose dtype is the output dtype, so that module.to(dtype) changes it too.
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype, device=blocks.device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, tokens.reshape(-1))  # (B*T, bytes_per_row)
        values = dequantize_rows(rows, self.ggml_type).to(self.dtype_ref.dtype)
        return values.view(*tokens.shape, self.embedding_dim)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table (num_embeddings, embedding_dim), as gguf would dequantize it (then cast)."""
        return dequantize_rows(self.blocks, self.ggml_type).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, {_type_name(self.ggml_type)}, dtype={self.dtype_ref.dtype}"
        )
