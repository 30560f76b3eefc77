"""LoRA adapters as a module swap: ``LoraLinear`` over any linear, the ``Adapters`` router that says which adapter
each forward adds, creating and removing adapters, and their weights merged into the base."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Llama3Error

# Meta's short names of the seven matrices of a layer, their place in a block, and Hugging Face's names.
TARGETS: dict[str, str] = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
}  # fmt: skip
HF_MODULES: dict[str, str] = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
}  # fmt: skip
FROM_HF = {hf.rsplit(".", 1)[1]: short for short, hf in HF_MODULES.items()}
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class LoraError(Llama3Error):
    """An adapter that cannot be built, loaded or applied (the message names the file, key or value)."""


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scale, dropout and target matrices of one adapter (PEFT's ``r``, ``lora_alpha``, ``lora_dropout``)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (PEFT's use_rslora)
    layers: tuple[int, ...] | None = None  # None: every layer

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoraError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise LoraError(f"LoRA targets must be among {', '.join(TARGETS)}; got {', '.join(self.targets) or 'none'}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Adapters:
    """The adapters of one model and which are engaged: none, one for every row, or one per batch row."""

    def __init__(self) -> None:
        self.configs: dict[str, LoraConfig] = {}
        self.active: str | None = None
        self.rows: tuple[str | None, ...] | None = None

    def engaged(self) -> bool:
        """Whether the next forward adds any adapter's term (the fused decode kernel must then step aside)."""
        if self.rows is not None:
            return any(r is not None for r in self.rows)
        return self.active is not None

    def _check(self, name: str | None) -> None:
        if name is not None and name not in self.configs:
            known = ", ".join(sorted(self.configs)) or "none"
            raise LoraError(f"no adapter named {name!r} (loaded: {known})")

    def use(self, name: str | None) -> None:
        """Engage adapter ``name`` for every row (None: the base model alone)."""
        self._check(name)
        self.active, self.rows = name, None

    def use_rows(self, names: Sequence[str | None] | None) -> None:
        """Engage ``names[i]`` for batch row i of the next forwards (None in a row: the base model). The decoding
        core sets this itself around each forward from ``GenerationSpec.adapter`` (else the ``use`` adapter)."""
        if names is not None:
            for name in names:
                self._check(name)
            names = tuple(names)
        self.rows = names

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Engage ``name`` for every row inside the block, then restore what was engaged."""
        saved = self.active, self.rows
        self.use(name)
        try:
            yield
        finally:
            self.active, self.rows = saved


class _Table(nn.Module):
    """Parameters by adapter name. (``nn.ParameterDict`` stores keys as attributes, so an adapter named "train" or
    "eval" would collide with ``nn.Module``'s methods; here every name is stored with a prefix.)"""

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[f"a_{name}"]

    def __setitem__(self, name: str, value: nn.Parameter) -> None:
        self.register_parameter(f"a_{name}", value)

    def __delitem__(self, name: str) -> None:
        del self._parameters[f"a_{name}"]

    def __contains__(self, name: object) -> bool:
        return f"a_{name}" in self._parameters

    def __iter__(self) -> Iterator[str]:
        return (key[2:] for key in self._parameters)


class LoraLinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` for the engaged adapter(s); ``base`` stays frozen."""

    def __init__(self, base: nn.Module, router: Adapters) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _features(base)
        self.lora_A = _Table()  # name -> (rank, in_features)
        self.lora_B = _Table()  # name -> (out_features, rank)
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.router = router

    def add(self, name: str, config: LoraConfig, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scale[name] = config.scale
        self.dropout[name] = config.dropout

    def remove(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B):
            if name in table:
                del table[name]
        self.scale.pop(name, None)
        self.dropout.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` (out_features, in_features) in float32: what merging adds to the base matrix."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scale[name]

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        h = x.to(a.dtype)
        p = self.dropout[name]
        if p and self.training:
            h = F.dropout(h, p)
        return F.linear(F.linear(h, a), b) * self.scale[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.router.rows
        if rows is None:
            name = self.router.active
            if name is None or name not in self.lora_A:
                return y
            return y + self._delta(x, name).to(y.dtype)
        if len(rows) != x.shape[0]:
            raise LoraError(f"{len(rows)} per-row adapters set for a batch of {x.shape[0]} rows")
        out = y
        for name in {r for r in rows if r is not None and r in self.lora_A}:
            index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            out = out.index_add(0, index, self._delta(x.index_select(0, index), name).to(y.dtype))
        return out

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.lora_A[n].shape[0]}" for n in self.lora_A)
        return f"adapters=[{ranks}]"


def _features(module: nn.Module) -> tuple[int, int]:
    try:
        return int(module.in_features), int(module.out_features)
    except AttributeError:
        raise LoraError(f"cannot put an adapter on {type(module).__name__}: not a linear layer") from None


def adapters(model: nn.Module) -> Adapters:
    """The model's adapter router (created empty on first use)."""
    found = getattr(model, "adapters", None)
    if found is None:
        found = Adapters()
        model.adapters = found
    return found


def _lora_module(model: nn.Module, layer: int, target: str) -> LoraLinear:
    """The ``LoraLinear`` at ``layers.{layer}.{target}``, swapping it in over the base linear on first use."""
    block = model.layers[layer]
    parent_name, _, child = TARGETS[target].rpartition(".")
    parent = block.get_submodule(parent_name)
    current = getattr(parent, child)
    if isinstance(current, LoraLinear):
        return current
    wrapped = LoraLinear(current, adapters(model))
    setattr(parent, child, wrapped)
    return wrapped


def _layers(model: nn.Module, config: LoraConfig) -> list[int]:
    n = len(model.layers)
    chosen = list(range(n)) if config.layers is None else list(config.layers)
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise LoraError(f"LoRA layers {bad} are outside the model's {n} layers")
    return chosen


def add_adapter(model: nn.Module, name: str, config: LoraConfig, *, seed: int | None = None) -> None:
    """A new trainable adapter: A with PEFT's default (Kaiming-uniform) init, B zero, so it starts as a no-op."""
    _check_new_name(model, name)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for layer in _layers(model, config):
        for target in config.targets:
            module = _lora_module(model, layer, target)
            device = model.norm.weight.device
            a = torch.empty(config.rank, module.in_features)
            # nn.Linear's (and PEFT's) init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(module.in_features)
            a.uniform_(-bound, bound, generator=generator)
            b = torch.zeros(module.out_features, config.rank)
            module.add(name, config, a.to(device), b.to(device))
    adapters(model).configs[name] = config


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LoraError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-'")
    if name in adapters(model).configs:
        raise LoraError(f"an adapter named {name!r} is already loaded")


def lora_modules(model: nn.Module, name: str) -> Iterator[tuple[int, str, LoraLinear]]:
    """(layer, target, module) for every matrix that carries adapter ``name``."""
    for layer, block in enumerate(model.layers):
        for target, path in TARGETS.items():
            module = block.get_submodule(path)
            if isinstance(module, LoraLinear) and name in module.lora_A:
                yield layer, target, module


def trainable_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter ``name``'s A and B matrices, with gradients enabled (everything else stays frozen)."""
    params = []
    for _, _, module in lora_modules(model, name):
        for p in (module.lora_A[name], module.lora_B[name]):
            p.requires_grad_(True)
            params.append(p)
    return params


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name`` (the base modules stay wrapped; an empty wrapper adds nothing)."""
    router = adapters(model)
    router._check(name)
    for _, _, module in list(lora_modules(model, name)):
        module.remove(name)
    del router.configs[name]
    if router.active == name:
        router.active = None
    if router.rows is not None and name in router.rows:
        router.rows = None


def merged_state(model: nn.Module, name: str | None) -> dict[str, torch.Tensor]:
    """The model's canonical float32 state dict with adapter ``name`` folded in (W + scale * B @ A).

    Quantized matrices are decoded exactly first; None gives the base model's weights alone.
    """
    from ..checkpoint.state import expected_shapes

    if name is not None:
        adapters(model)._check(name)
    state: dict[str, torch.Tensor] = {}
    for key in expected_shapes(model.config):
        module = model.get_submodule(key.removesuffix(".weight"))
        if isinstance(module, LoraLinear):
            weight = _float_weight(module.base)
            if name is not None and name in module.lora_A:
                weight = weight + module.delta_weight(name).to(weight.device)
        else:
            weight = _float_weight(module)
        state[key] = weight
    return state


def _float_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "dequantized_weight"):  # quantized linears and embeddings decode their blocks
        return module.dequantized_weight(torch.float32)
    return module.weight.detach().float()
