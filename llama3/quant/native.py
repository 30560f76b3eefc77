"""Just-in-time build and loading of the AVX2 kernels in ``kernels.cpp`` / ``decode.cpp`` (``torch.ops.llama3_quant``).

The first call on a machine compiles the C++ files with the system compiler (about 15 s; cached afterwards
under torch's extension directory, keyed by the sources' hash). Where that is impossible (no C++ compiler,
not x86-64 Linux, no AVX2, or ``LLAMA3_CPU_LEVEL=portable``: see ``cpu``) ``available()`` is False and the
quantized modules use their portable torch path instead, with one warning saying why. Anything else that stops the build (a
kernel file missing from the install, a compile error) raises ``NativeBuildError``: that is a broken
install, and silently running several times slower would hide it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..errors import Llama3Error
from . import cpu

# kernels.h is not a source: ninja's dependency tracking rebuilds the objects when it changes.
SOURCES = [Path(__file__).with_name("kernels.cpp"), Path(__file__).with_name("decode.cpp")]
HEADERS = [Path(__file__).with_name("kernels.h")]
# Up to this many rows the fused block kernel beats dequantize + BLAS GEMM. Measured on the 2-core Zen 3
# at SmolLM2's shapes (benchmarks/quant_kernels.py): single-threaded the two tie around 16-32 rows; with
# 2 threads the GEMM path pays for two parallel regions (dequantize, then BLAS) and the fused kernel was
# faster at 32 rows, which is also the batched-decode case (32 sequences).
FUSED_MAX_ROWS = 32
# Rows of W dequantized per BLAS call on the GEMM path: big enough for an efficient GEMM, small enough to
# stay in cache and to keep the transient float32 copy negligible (the 49152 x 576 head needs 28 slabs).
SLAB_BYTES = 4 << 20

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: bool | None = None


class NativeBuildError(Llama3Error):
    """The CPU kernels should build here (a C++ compiler is present) but cannot: a broken install or toolchain."""


def available() -> bool:
    """Whether the native CPU kernels can be used in this process (builds them on the first call).

    Raises ``NativeBuildError`` (and retries on the next call) when they should build but do not.
    """
    global _loaded
    if not cpu.current().native_kernels:  # LLAMA3_CPU_LEVEL=portable (or LLAMA3_QUANT_NATIVE=0)
        return False
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def _unsupported_reason() -> str | None:
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no kernels for {sys.platform}/{platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU lacks AVX2"
    return None


def _compiler() -> str | None:
    """The C++ compiler command for torch's cpp_extension: $CXX if set, else c++, else g++; None if not on PATH."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        # $CXX may carry a wrapper ("ccache g++"): the first word is what must exist.
        return cxx if shutil.which(cxx.split()[0]) else None
    return next((name for name in ("c++", "g++") if shutil.which(name)), None)


def _missing_files() -> list[Path]:
    """The kernel sources and headers this install lacks (a wheel built without its package data)."""
    return [path for path in (*SOURCES, *HEADERS) if not path.is_file()]


def _load() -> bool:
    reason = _unsupported_reason()
    if reason is not None:
        warnings.warn(f"llama3.quant: {reason}; quantized layers use the slower portable path", stacklevel=3)
        return False
    # Checked before the compiler so that a broken install is reported even where it could not build anyway.
    missing = _missing_files()
    if missing:
        raise NativeBuildError(
            f"llama3.quant: missing kernel file(s) {', '.join(map(str, missing))}: this llama3 install is "
            "incomplete (reinstall it; its wheel must ship llama3/quant/*.cpp and *.h). "
            "LLAMA3_CPU_LEVEL=portable runs without the kernels, several times slower."
        )
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "llama3.quant: no C++ compiler found (g++/c++, or $CXX); quantized layers use the portable torch "
            "path, several times slower. Install g++ to build the fast kernels.",
            stacklevel=3,
        )
        return False
    from torch.utils.cpp_extension import load

    _log.info("llama3.quant: loading the CPU kernels (compiled on first use, about 15 s)")
    # torch runs $CXX, else c++: set it to the compiler found (g++ where there is no c++) for this build only.
    saved_cxx = os.environ.get("CXX")
    os.environ["CXX"] = compiler
    try:
        load(
            name="llama3_quant",
            sources=[str(s) for s in SOURCES],
            # -ffp-contract=off: no implicit fused multiply-adds, so dequantization rounds exactly as gguf's
            # numpy code (each product and sum on its own); the kernels' FMAs are explicit intrinsics.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"],
            # -fopenmp links libgomp by soname; torch has already loaded its own, so both share one pool.
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 -- compile error, no ninja, read-only cache dir: all need fixing
        # torch's message carries the compiler output; say what failed and how to run meanwhile.
        raise NativeBuildError(
            f"llama3.quant: building the CPU kernels with {compiler} failed "
            "(LLAMA3_CPU_LEVEL=portable runs without them, several times slower):\n"
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if saved_cxx is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = saved_cxx
    _register_fake()
    return True


def _register_fake() -> None:
    """Shape functions so that torch.compile can trace through the custom ops without running them."""

    @torch.library.register_fake("llama3_quant::qmatmul")
    def _qmatmul(x, blocks, qtype, in_features, fused_max_rows, slab_bytes):
        return x.new_empty((*x.shape[:-1], blocks.shape[0]))

    @torch.library.register_fake("llama3_quant::decode_layers")
    def _decode_layers(h, weights, qtypes, k_cache, v_cache, rope, positions, rows, n_heads, eps):
        return torch.empty_like(h)

    @torch.library.register_fake("llama3_quant::dequantize")
    def _dequantize(blocks, qtype, in_features):
        return blocks.new_empty((blocks.shape[0], in_features), dtype=torch.float32)


def qmatmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """x (..., K) @ W^T for W given as ggml blocks (N, bytes_per_row) on CPU -> (..., N) in x's dtype.

    Computed in float32 whatever x's dtype (weights decoded exactly, float32 sums).
    """
    return torch.ops.llama3_quant.qmatmul.default(x, blocks, ggml_type, in_features, FUSED_MAX_ROWS, SLAB_BYTES)


def dequantize(blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """The float32 matrix (N, K) encoded by ``blocks``, bit-identical to gguf's dequantizer."""
    return torch.ops.llama3_quant.dequantize(blocks, ggml_type, in_features)


def decode_layers(
    h: torch.Tensor,
    weights: list[torch.Tensor],
    qtypes: list[int],
    k_cache: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    rope: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    n_heads: int,
    eps: float,
) -> torch.Tensor:
    """Every transformer layer for one new token per row (decode.cpp): h (B, dim) -> h after the last layer.

    Writes each layer's keys and values into ``k_cache[l]`` / ``v_cache[l]`` at (rows[b], positions[b]).
    """
    return torch.ops.llama3_quant.decode_layers.default(
        h, weights, qtypes, k_cache, v_cache, rope, positions, rows, n_heads, eps
    )
