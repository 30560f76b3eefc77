"""What ``pip install`` ships: the wheel carries every file of the package (the C++ kernels are compiled on the
user's machine, from the installed copy), and ``llama3.quant.native`` falls back only where it must.

The end-to-end test installs the wheel into a fresh venv and builds and runs the fused decode kernel from
there, so a source left out of the package data fails loudly instead of silently using the slow path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from conftest import tiny_hf_config
from gguf_utils import write_gguf

from llama3.errors import Llama3Error
from llama3.quant import native

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = ("llama3/quant/kernels.cpp", "llama3/quant/decode.cpp", "llama3/quant/kernels.h")
# Build outputs and caches that a fresh clone lacks. The checkout's llama3.egg-info matters most: setuptools
# reuses its SOURCES.txt as the file list, so a wheel built in place could differ from one built from a clone.
NOT_SOURCE = (".git", "*.egg-info", "build", "dist", "__pycache__", "*.pyc", ".pytest_cache", ".venv")


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run ``command``; on failure, fail the test with its output (the useful part of a build error)."""
    proc = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment minus whatever could point a child at the checkout or change the kernels' choice."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA3_QUANT_NATIVE", "LLAMA3_CPU_LEVEL",
                                                      "LLAMA3_FUSED_DECODE")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A copy of the checkout as a fresh clone has it; building it leaves the shared checkout untouched."""
    tree = tmp_path_factory.mktemp("src") / "llama3-src"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    return tree


@pytest.fixture(scope="module")
def wheel(source_tree, tmp_path_factory) -> Path:
    # Offline: no build isolation (setuptools comes from this environment) and no index.
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist,
         source_tree, cwd=dist, env=_clean_env())  # fmt: skip
    (built,) = dist.glob("llama3-*.whl")
    return built


def test_wheel_ships_every_package_file(wheel, source_tree):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(KERNEL_FILES) <= names, sorted(n for n in names if n.startswith("llama3/quant/"))
    # Everything under llama3/ is needed at run time (modules, kernel sources, any data file added later).
    package = {p.relative_to(source_tree).as_posix() for p in (source_tree / "llama3").rglob("*") if p.is_file()}
    assert not package - names, f"left out of the wheel: {sorted(package - names)}"


# Run by the venv's python, from a directory holding nothing else: the installed llama3 must be imported,
# must compile its own sources, and its fused decode step must agree with the layer-by-layer step.
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    import llama3
    from llama3.quant import native
    from llama3.quant.fused import FusedDecode

    venv, gguf = Path(sys.argv[1]).resolve(), sys.argv[2]
    for name, path in (("llama3", llama3.__file__), ("kernel source", native.SOURCES[0])):
        assert Path(path).resolve().is_relative_to(venv), f"{name} from {path}, not from the venv"
    assert native.available(), "native kernels unavailable"
    model = llama3.load_model(gguf, device="cpu", dtype=torch.float32)
    kernel = model.decode_kernel
    assert isinstance(kernel, FusedDecode), f"decode_kernel is {kernel!r}"


    class Counting:
        def __init__(self, kernel):
            self.kernel, self.calls = kernel, 0

        def usable(self, model, h):
            return self.kernel.usable(model, h)

        def __call__(self, *args):
            self.calls += 1
            return self.kernel(*args)


    def step(decode_kernel):
        model.decode_kernel = decode_kernel
        model.setup_cache(1, 16)
        with torch.inference_mode():
            model(torch.tensor([[5, 17, 99, 3]]), 0)
            return model(torch.tensor([[41]]), 4, last_only=True)[0, -1]


    counting = Counting(kernel)
    fused = step(counting)
    assert counting.calls == 1, "the fused kernel did not run the decode step"
    layers = step(None)
    err, scale = (fused - layers).abs().max().item(), layers.abs().max().item()
    assert err <= 1e-3 * scale, (err, scale)
    assert fused.argmax().item() == layers.argmax().item()
    print("fused decode ok", err, scale)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(native._unsupported_reason() is not None, reason="no native kernels on this platform")
@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler")
def test_installed_wheel_builds_and_runs_the_fused_kernel(wheel, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_hf_config(vocab_size=256, hidden_size=128, intermediate_size=320, max_position_embeddings=128)
    gguf = write_gguf(tmp_path / "tiny-Q4_0.gguf", LlamaForCausalLM(cfg).eval(), Q.Q4_0)

    # --system-site-packages: torch & co. come from this environment (offline); that also makes its pip
    # usable, so the venv skips ensurepip. The checkout's editable install is visible too, but its finder
    # comes after the venv's site-packages, and the child asserts which copy it imported.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # --ignore-installed: install beside the editable llama3 rather than try to replace it.
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path,
         env=_clean_env())  # fmt: skip

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "child.py").write_text(CHILD)
    extensions = tmp_path / "torch_extensions"  # empty: the installed sources are the ones compiled
    out = _run(python, "child.py", venv, gguf, cwd=run_dir, env=_clean_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    assert "fused decode ok" in out
    assert "llama3.quant:" not in out, out  # no fallback warning
    ninja = (extensions / "llama3_quant" / "build.ninja").read_text()
    assert "site-packages/llama3/quant/decode.cpp" in ninja and str(ROOT / "llama3") not in ninja


# --- the fallback decision -------------------------------------------------------------------------------


class FakeLoad:
    """Stands in for torch's cpp_extension.load: records the $CXX it saw, or raises ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.cxx = error, []

    def __call__(self, **kwargs) -> None:
        self.cxx.append(os.environ.get("CXX"))
        if self.error is not None:
            raise self.error


@pytest.fixture
def fresh_native(monkeypatch) -> FakeLoad:
    """native with nothing loaded yet, on a supported platform, with a fake build (restored afterwards)."""
    import torch.utils.cpp_extension

    fake = FakeLoad()
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_unsupported_reason", lambda: None)
    monkeypatch.setattr(native, "_register_fake", lambda: None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake)
    monkeypatch.delenv("CXX", raising=False)
    return fake


def _which(*found: str):
    return lambda name: f"/usr/bin/{name}" if name in found else None


@pytest.mark.parametrize("cxx", [None, "/nowhere/clang++"], ids=["no-c++-or-g++", "CXX-not-found"])
def test_no_compiler_falls_back_with_one_line_warning(fresh_native, monkeypatch, cxx):
    monkeypatch.setattr(native.shutil, "which", _which())
    if cxx:
        monkeypatch.setenv("CXX", cxx)
    with pytest.warns(UserWarning) as caught:
        assert native.available() is False
        assert native.available() is False  # decided once: one warning
    (warning,) = caught
    message = str(warning.message)
    assert "no C++ compiler found" in message and "several times slower" in message and "\n" not in message
    assert fresh_native.cxx == []  # no build attempted


def test_disabled_falls_back_silently(fresh_native, monkeypatch, recwarn):
    monkeypatch.setenv("LLAMA3_CPU_LEVEL", "portable")
    assert native.available() is False
    assert not recwarn.list and fresh_native.cxx == []


@pytest.mark.parametrize("missing", ["decode.cpp", "kernels.h"])
def test_missing_kernel_file_is_an_error(fresh_native, monkeypatch, tmp_path, missing):
    monkeypatch.setattr(native.shutil, "which", _which("c++", "g++"))
    files = {name: tmp_path / name for name in ("kernels.cpp", "decode.cpp", "kernels.h")}
    for name, path in files.items():
        if name != missing:
            path.write_text("// stand-in\n")
    monkeypatch.setattr(native, "SOURCES", [files["kernels.cpp"], files["decode.cpp"]])
    monkeypatch.setattr(native, "HEADERS", [files["kernels.h"]])
    with pytest.raises(native.NativeBuildError, match="missing kernel file") as raised:
        native.available()
    assert str(files[missing]) in str(raised.value) and isinstance(raised.value, Llama3Error)
    assert fresh_native.cxx == [] and native._loaded is None  # nothing built, nothing cached


def test_compile_error_is_an_error_with_the_compiler_output(fresh_native, monkeypatch):
    monkeypatch.setattr(native.shutil, "which", _which("c++"))
    fresh_native.error = RuntimeError("Error building extension 'llama3_quant': decode.cpp:7:1: error: boom")
    with pytest.raises(native.NativeBuildError, match="building the CPU kernels with c\\+\\+ failed") as raised:
        native.available()
    assert "decode.cpp:7:1: error: boom" in str(raised.value)
    assert native._loaded is None and "CXX" not in os.environ


def test_compiler_choice(fresh_native, monkeypatch):
    """torch runs $CXX, else c++: g++ stands in where c++ is missing, and $CXX is left as it was."""
    monkeypatch.setattr(native.shutil, "which", _which("g++"))
    assert native.available() is True
    assert fresh_native.cxx == ["g++"] and "CXX" not in os.environ

    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native.shutil, "which", _which("ccache", "c++"))
    monkeypatch.setenv("CXX", "ccache c++")
    assert native.available() is True
    assert fresh_native.cxx[-1] == "ccache c++" and os.environ["CXX"] == "ccache c++"
