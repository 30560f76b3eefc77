"""Tokenizers and chat formats: one interface (``Tokenizer``) for every model family.

``load_tokenizer(path)`` accepts Meta's ``tokenizer.model`` (tiktoken ranks), a Hugging Face
``tokenizer.json`` (with ``tokenizer_config.json`` etc. beside it), a ``.gguf`` file, or a directory
holding one of those. The kind is told from the file's content, never from its name.

Chat prompts: Meta's ``tokenizer.model`` uses Meta's token-level ``ChatFormat``; other models use their
Jinja chat template, rendered in a sandbox. A model that ships no template gets Llama 3's format when
its vocabulary is Llama 3's (``LLAMA3_CHAT_TEMPLATE``, same ids as ChatFormat), otherwise ChatML
(``DEFAULT_CHAT_TEMPLATE``), the fallback llama.cpp uses. In every case message text is never turned
into a control token.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TokenizerError
from .base import ROLES, Dialog, Message, Tokenizer, check_dialog
from .chat_template import DEFAULT_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE
from .hf import HFTokenizer
from .streaming import StopStringWatch, StreamDecoder
from .tiktoken_llama3 import ChatFormat, Llama3Tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ROLES",
    "ChatFormat",
    "Dialog",
    "HFTokenizer",
    "LLAMA3_CHAT_TEMPLATE",
    "Llama3Tokenizer",
    "Message",
    "StopStringWatch",
    "StreamDecoder",
    "Tokenizer",
    "check_dialog",
    "load_tokenizer",
]


def _file_kind(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "hf"
    if head[:1] == b"\x0a" or b"\x00" in head:  # SentencePiece protobuf (Llama 2's tokenizer.model)
        raise TokenizerError(
            f"{path}: a SentencePiece tokenizer.model is not supported; use the model's tokenizer.json or GGUF file"
        )
    return "tiktoken"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer at ``path``: a tokenizer.model / tokenizer.json / .gguf file, or a directory with
    tokenizer.json (Hugging Face), tokenizer.model (Meta) or exactly one .gguf file (checked in that order)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        found = f"{len(ggufs)} .gguf files" if ggufs else "nothing usable"
        raise TokenizerError(
            f"{path}: no tokenizer found (expected tokenizer.json, tokenizer.model or one .gguf file; found {found})"
        )
    kind = _file_kind(path)
    if kind == "gguf":
        from .gguf import build_gguf_tokenizer

        return build_gguf_tokenizer(path)
    if kind == "hf":
        from .hf import load_hf_tokenizer

        return load_hf_tokenizer(path)
    return Llama3Tokenizer(path)
