"""llama3: run Llama-3-architecture language models locally (Meta, Hugging Face and GGUF checkpoints)."""

from .checkpoint import load_model
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, GenerationError, Llama3Error, TokenizerError
from .model import Transformer

__all__ = [
    "CheckpointError",
    "GenerationError",
    "Llama3Error",
    "ModelConfig",
    "RopeScaling",
    "TokenizerError",
    "Transformer",
    "load_model",
]
__version__ = "0.1.0"
