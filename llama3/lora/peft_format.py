"""PEFT's LoRA directory format (``adapter_config.json`` + ``adapter_model.safetensors``, Hugging Face module
names, q/k rows in Hugging Face's half-split rotary order): ``peft.PeftModel.from_pretrained`` loads what
``save_adapter`` writes, and ``load_adapter`` loads what PEFT writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.hf import half_split_to_interleaved, interleaved_to_half_split
from .adapter import (FROM_HF, HF_MODULES, TARGETS, LoraConfig, LoraError, LoraLinear, _check_new_name, _features,
                       _lora_module, adapters, lora_modules)

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _rotary_rows(model: nn.Module, target: str) -> int | None:
    """Heads whose rows are in rotary order for ``target`` (q and k), else None."""
    config = model.config
    return {"wq": config.n_heads, "wk": config.kv_heads}.get(target)


def save_adapter(model: nn.Module, name: str, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Write adapter ``name`` as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads unchanged."""
    from safetensors.torch import save_file

    router = adapters(model)
    router._check(name)
    config = router.configs[name]
    tensors: dict[str, torch.Tensor] = {}
    layers: set[int] = set()
    for layer, target, module in lora_modules(model, name):
        prefix = f"base_model.model.model.layers.{layer}.{HF_MODULES[target]}"
        b = module.lora_B[name].detach().float().cpu()
        heads = _rotary_rows(model, target)
        if heads is not None:
            b = interleaved_to_half_split(b, heads, model.config.head_dim)
        tensors[f"{prefix}.lora_A.weight"] = module.lora_A[name].detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
        layers.add(layer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(HF_MODULES[t].rsplit(".", 1)[1] for t in config.targets),
        "layers_to_transform": None if len(layers) == len(model.layers) else sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return directory


def _read_peft_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraError(f"{path.parent}: not a LoRA adapter directory (no {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path}: cannot read adapter config ({exc})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{path}: adapter config must be a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": "DoRA adapters", "fan_in_fan_out": "fan_in_fan_out (Conv1D) weights",
        "modules_to_save": "modules_to_save (fully trained extra modules)", "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
    }  # fmt: skip
    for key, what in unsupported.items():
        if cfg.get(key):
            raise LoraError(f"{path}: {key} is set: {what} are not supported")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{path}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise LoraError(f"{path}: {key} must be a positive number, got {value!r}")
    return cfg


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> LoraConfig:
    """Load a PEFT LoRA directory (ours or PEFT's) as adapter ``name``; every tensor is checked and used."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise LoraError(f"{directory}: adapter directory not found")
    _check_new_name(model, name)
    cfg = _read_peft_config(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        legacy = directory / "adapter_model.bin"
        hint = " (adapter_model.bin is not read: pickles run code; save with safe_serialization)" if legacy.exists() else ""
        raise LoraError(f"{directory}: no {WEIGHTS_FILE}{hint}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise LoraError(f"{weights_path}: cannot read ({exc})") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None or match.group(3) not in FROM_HF:
            raise LoraError(f"{weights_path}: tensor {key!r} is not a LoRA matrix of a Llama layer's linear")
        layer, module, ab = int(match.group(1)), match.group(3), match.group(4)
        pairs.setdefault((layer, FROM_HF[module]), {})[ab] = value
    if not pairs:
        raise LoraError(f"{weights_path}: holds no LoRA tensors")
    rank = int(cfg["r"])
    n_layers = len(model.layers)
    for (layer, target), ab in sorted(pairs.items()):
        where = f"layer {layer} {HF_MODULES[target]}"
        if layer >= n_layers:
            raise LoraError(f"{weights_path}: {where} is beyond the model's {n_layers} layers")
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{weights_path}: {where} has lora_{''.join(ab)} without its pair")
        base = model.layers[layer].get_submodule(TARGETS[target])
        in_f, out_f = _features(base.base if isinstance(base, LoraLinear) else base)
        if tuple(ab["A"].shape) != (rank, in_f) or tuple(ab["B"].shape) != (out_f, rank):
            raise LoraError(
                f"{weights_path}: {where} has A {list(ab['A'].shape)} and B {list(ab['B'].shape)}; this model "
                f"with r={rank} needs A [{rank}, {in_f}] and B [{out_f}, {rank}] (an adapter for another model?)"
            )
    targets = tuple(t for t in TARGETS if any(t == tt for _, tt in pairs))
    layers = tuple(sorted({layer for layer, _ in pairs}))
    config = LoraConfig(rank=rank, alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                        targets=targets, rslora=bool(cfg.get("use_rslora")),
                        layers=None if len(layers) == n_layers else layers)
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    for (layer, target), ab in pairs.items():
        b = ab["B"].float()
        heads = _rotary_rows(model, target)
        if heads is not None:
            b = half_split_to_interleaved(b, heads, model.config.head_dim)
        module = _lora_module(model, layer, target)
        module.add(name, config, ab["A"].to(device, dtype), b.to(device, dtype))
        module.lora_A[name].requires_grad_(False)
        module.lora_B[name].requires_grad_(False)
    adapters(model).configs[name] = config
    return config
