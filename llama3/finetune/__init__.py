"""Fine-tuning: LoRA SFT and DPO over any checkpoint this engine loads, GGUF files included (``llama3 finetune``).

``data`` reads and tokenizes JSON Lines with the model's chat format, ``losses`` holds the masked cross-entropy
and DPO's loss, ``trainer`` the loop; adapters themselves (the module swap and PEFT's file format) live in
``llama3.lora``.
"""

from __future__ import annotations

from .data import DataError, Dataset, Example, ExampleBuilder, Pair, load_dataset
from .losses import dpo_loss, sequence_logprobs, sft_loss_sum, target_logprobs, token_logprobs
from .trainer import ADAPTER, TrainConfig, Trainer, TrainResult, lr_factor, plot_losses

__all__ = [
    "ADAPTER", "DataError", "Dataset", "Example", "ExampleBuilder", "Pair", "TrainConfig", "TrainResult", "Trainer",
    "dpo_loss", "load_dataset", "lr_factor", "plot_losses", "sequence_logprobs", "sft_loss_sum", "target_logprobs",
    "token_logprobs",
]  # fmt: skip
