"""llama3: run Llama-3-architecture language models locally (Meta, Hugging Face and GGUF checkpoints)."""

from .checkpoint import load_model
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, GenerationError, Llama3Error, TokenizerError
from .model import Transformer
from .tokenizer import ChatFormat, HFTokenizer, Llama3Tokenizer, StreamDecoder, Tokenizer, load_tokenizer

__all__ = [
    "ChatFormat",
    "CheckpointError",
    "HFTokenizer",
    "Llama",
    "Llama3Tokenizer",
    "StreamDecoder",
    "Tokenizer",
    "load_tokenizer",
    "GenerationError",
    "Llama3Error",
    "ModelConfig",
    "RopeScaling",
    "TokenizerError",
    "Transformer",
    "load_model",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # ``Llama`` pulls in generation; importing it lazily keeps ``import llama3.tokenizer`` light.
    if name == "Llama":
        from .generation import Llama

        return Llama
    raise AttributeError(f"module 'llama3' has no attribute {name!r}")
