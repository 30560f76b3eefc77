"""ggml block encodings decoded with torch ops (any device), bit-identical to ``gguf.quants.dequantize``.

Each function takes raw bytes shaped (..., n_blocks, block_bytes) as uint8 and returns float32 weights
(..., n_blocks, block_size). The arithmetic follows gguf-py's numpy dequantizers operation for operation
(same products, same order of the final multiply/add in float32), so the results are equal bit for bit.
Used for embedding rows, for the portable (non-AVX2 / CUDA) linear path and as the kernels' test oracle's twin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as T

QK_K = 256  # super-block size of the K-quants


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 stored in the last dim (2 bytes) -> float32 (..., 1)."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes into 4-bit codes: per ``group`` bytes, all low nibbles first, then all high nibbles."""
    q = qs.unflatten(-1, (-1, group))  # (..., g, group)
    return torch.stack([q & 0x0F, q >> 4], dim=-2).flatten(-3)  # (..., 2 * bytes)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., :2])
    q = _nibbles(b[..., 2:], 16).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    return d * _nibbles(b[..., 4:], 16).float() + m


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block: bit i of the little-endian uint32 belongs to weight i."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # byte-major: weight 8 * byte + bit


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[..., :2])
    q = (_nibbles(b[..., 6:], 16) | (_q5_high_bits(b[..., 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 8:], 16) | (_q5_high_bits(b[..., 4:8]) << 4)
    return d * q.float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[..., 2:].contiguous().view(torch.int8).float() * _f16(b[..., :2])


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])
    sc, mn = _k_scale_min(b[..., 4:16])
    scale, offset = (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)  # (..., 8, 1)
    q = _nibbles(b[..., 16:], 32).unflatten(-1, (8, 32)).float()
    return (scale * q - offset).flatten(-2)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])
    sc, mn = _k_scale_min(b[..., 4:16])
    scale, offset = (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(-1, 1)
    high = (b[..., 16:48].unsqueeze(-2) >> shifts) & 1  # (..., 8, 32): sub-block j takes bit j
    q = (_nibbles(b[..., 48:], 32).unflatten(-1, (8, 32)) | (high << 4)).float()
    return (scale * q - offset).flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh, scales, d = b[..., :128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
    scale = (_f16(d) * scales.contiguous().view(torch.int8).float()).unsqueeze(-1)  # (..., 16, 1)
    low = _nibbles(ql, 64)  # (..., 256): per 64 bytes, 64 low nibbles then 64 high nibbles
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).view(-1, 1)
    high = ((qh.unflatten(-1, (2, 1, 32)) >> shifts) & 3).flatten(-3)  # per 32 bytes, 4 two-bit planes
    q = (low | (high << 4)).to(torch.int8) - 32
    return (scale * q.unflatten(-1, (16, 16)).float()).flatten(-2)


# ggml type -> (weights per block, bytes per block, decoder)
FORMATS: dict[int, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    T.Q4_0: (32, 18, _q4_0),
    T.Q4_1: (32, 20, _q4_1),
    T.Q5_0: (32, 22, _q5_0),
    T.Q5_1: (32, 24, _q5_1),
    T.Q8_0: (32, 34, _q8_0),
    T.Q4_K: (QK_K, 144, _q4_k),
    T.Q5_K: (QK_K, 176, _q5_k),
    T.Q6_K: (QK_K, 210, _q6_k),
}


def dequantize_rows(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """uint8 rows (..., bytes_per_row) of ``ggml_type`` blocks -> float32 weights (..., row_length)."""
    _, block_bytes, decode = FORMATS[ggml_type]
    blocks = raw.unflatten(-1, (-1, block_bytes))  # (..., n_blocks, block_bytes)
    return decode(blocks).flatten(-2)
