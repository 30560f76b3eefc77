"""Which CPU kernels run here: the machine's instruction-set level, detected once, and what each level runs.

Levels, lowest first (each implies the ones before it on every CPU that has it):

========== ======================================== =========================================================
level      CPU features                             what runs
========== ======================================== =========================================================
portable   any                                      torch only: quantized matrices expanded to float at load
avx2       AVX2, FMA, F16C                          the block kernels (kernels.cpp, decode.cpp); prefill GEMMs
                                                    in float32 through torch's BLAS
avx512     + AVX-512 F/BW/VL (VNNI or not)          as avx2 (torch's BLAS uses AVX-512 by itself)
avx512_bf16 + AVX512_BF16                           as avx2, but prefill GEMMs in bfloat16 (torch / oneDNN)
amx        + AMX tiles with bf16                    as avx512_bf16 (oneDNN runs the bf16 GEMMs on AMX)
========== ======================================== =========================================================

Int8 prefill GEMMs (``torch._int_mm``, VNNI) are not a level: with one scale per activation row and per weight
row, as that GEMM needs, SmolLM2's logits moved by up to 5.5 and 14 % of greedy choices over a 256-token prompt
changed (benchmarks/README.md); the weight blocks' own scales need a per-block kernel, not written yet.

``LLAMA3_CPU_LEVEL`` forces a level (tests and comparisons): any level at or below the detected one, and the
bf16 levels anywhere (torch then computes them without the hardware, slowly but with the same rounding).
``LLAMA3_QUANT_NATIVE=0`` is the older spelling of ``portable``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import Llama3Error

LEVELS = ("portable", "avx2", "avx512", "avx512_bf16", "amx")
ENV = "LLAMA3_CPU_LEVEL"
# Levels whose code is plain torch and so runs on any CPU when forced (without the speed).
_EMULABLE = frozenset({"avx512_bf16", "amx"})


@dataclass(frozen=True)
class CpuPath:
    """The level chosen for this process, the best the CPU offers, and the features seen."""

    level: str
    detected: str
    features: frozenset[str]
    forced: bool

    @property
    def native_kernels(self) -> bool:
        """Whether the AVX2 block kernels may be used (they still need a compiler: ``native.available``)."""
        return self.level != "portable"

    @property
    def prefill_dtype(self) -> torch.dtype:
        """The dtype of the GEMMs over many rows (prompt prefill): bfloat16 where the CPU has bf16 units."""
        return torch.bfloat16 if self.level in ("avx512_bf16", "amx") else torch.float32

    def describe(self) -> str:
        """One line: level, how it was chosen, and the GEMM dtype (``llama3 bench`` prints it)."""
        how = f"forced by {ENV}, CPU offers {self.detected}" if self.forced else "detected"
        gemm = "bfloat16" if self.prefill_dtype == torch.bfloat16 else "float32"
        kernels = "AVX2 block kernels" if self.native_kernels else "no native kernels"
        shown = " ".join(sorted(self.features))
        return f"{self.level} ({how}; {kernels}, prefill GEMM {gemm}; features: {shown or 'none'})"


def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@lru_cache(maxsize=1)
def features() -> frozenset[str]:
    """The CPU features that choose a level: avx2, fma, f16c, avx512 (F+BW+VL), avx512_vnni, avx512_bf16, amx.

    torch's own checks come first (they also ask the OS whether it saves the AVX-512 / AMX registers); the
    kernel's flags from /proc/cpuinfo fill in what torch does not report.
    """
    flags = _cpuinfo_flags()
    found = {f for f in ("avx2", "fma", "f16c", "avx512_vnni", "avx_vnni") if f in flags}
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        found.add("avx512")
    if "avx512_bf16" in flags:
        found.add("avx512_bf16")
    if {"amx_tile", "amx_bf16"} <= flags:
        found.add("amx")
    checks = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    for name, check in checks.items():
        fn = getattr(torch.cpu, check, None)
        if fn is None:
            continue
        try:
            ok = bool(fn())
        except Exception:  # noqa: BLE001 - a private torch helper; /proc/cpuinfo's answer stands
            continue
        if ok:
            found.add(name)
        else:
            found.discard(name)  # torch also knows whether the OS enabled the registers
    return frozenset(found)


def detected_level(feats: frozenset[str]) -> str:
    """The highest level ``feats`` support."""
    if not {"avx2", "fma", "f16c"} <= feats:
        return "portable"
    if "avx512" not in feats:
        return "avx2"
    if "amx" in feats and "avx512_bf16" in feats:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in feats else "avx512"


def resolve(requested: str | None, feats: frozenset[str]) -> CpuPath:
    """The path for ``requested`` (a level name, or None/"auto" for the best) on a CPU with ``feats``."""
    best = detected_level(feats)
    if requested in (None, "", "auto"):
        return CpuPath(best, best, feats, forced=False)
    level = requested.strip().lower()
    if level not in LEVELS:
        raise Llama3Error(f"{ENV}={requested!r}: not a level; use one of auto, {', '.join(LEVELS)}")
    if level != "portable" and best == "portable":
        raise Llama3Error(f"{ENV}={requested!r}: the block kernels need AVX2, FMA and F16C, which this CPU lacks")
    if LEVELS.index(level) > LEVELS.index(best) and level not in _EMULABLE:
        raise Llama3Error(
            f"{ENV}={requested!r}: this CPU offers up to {best} (features: {' '.join(sorted(feats)) or 'none'})"
        )
    return CpuPath(level, best, feats, forced=True)


def current() -> CpuPath:
    """This process's path: ``LLAMA3_CPU_LEVEL`` if set (read on every call, so tests can switch), else the best."""
    requested = os.environ.get(ENV)
    if os.environ.get("LLAMA3_QUANT_NATIVE", "1") == "0" and requested in (None, "", "auto"):
        requested = "portable"
    return resolve(requested, features())
