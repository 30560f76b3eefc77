"""llama3: run Llama-3-architecture language models locally (Meta, Hugging Face and GGUF checkpoints)."""

from .checkpoint import load_model
from .config import ModelConfig, RopeScaling
from .constraints.grammar import Grammar, GrammarError
from .errors import CheckpointError, GenerationError, Llama3Error, TokenizerError
from .generation import Llama
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
    "Grammar",
    "GrammarError",
    "Llama3Error",
    "ModelConfig",
    "RopeScaling",
    "TokenizerError",
    "Transformer",
    "load_model",
]
__version__ = "0.1.0"

