"""LoRA adapters as a module swap over the pure model, in PEFT's file format.

``add_adapter(model, name, LoraConfig(...))`` replaces each targeted linear (``nn.Linear`` or a quantized
``QuantLinear``: the frozen base stays in its blocks) by a ``LoraLinear`` that adds ``scale * B(A(x))`` for
the adapters the model's ``Adapters`` router engages. Several adapters live side by side over one base: one is
active for every row (``use``), or each batch row picks its own (``use_rows``), so a server batches requests for
different adapters together. The fused decode kernel has no adapter term, so it steps aside while any adapter
is engaged (``Adapters.engaged``).

On disk an adapter is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, Hugging Face
module names, q/k rows in Hugging Face's half-split rotary order), so ``peft.PeftModel.from_pretrained`` loads
ours and ``load_adapter`` loads PEFT's. ``merged_state`` folds an adapter into float weights for export.
"""

from .adapter import (FROM_HF, HF_MODULES, TARGETS, Adapters, LoraConfig, LoraError, LoraLinear, add_adapter,
                       adapters, lora_modules, merged_state, remove_adapter, trainable_parameters)
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter

__all__ = [
    "CONFIG_FILE", "FROM_HF", "HF_MODULES", "TARGETS", "WEIGHTS_FILE", "Adapters", "LoraConfig", "LoraError",
    "LoraLinear", "add_adapter", "adapters", "load_adapter", "lora_modules", "merged_state", "remove_adapter",
    "save_adapter", "trainable_parameters",
]  # fmt: skip
