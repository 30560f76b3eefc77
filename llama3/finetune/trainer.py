"""The fine-tuning loop: a LoRA adapter trained over a frozen base (float or still in its GGUF blocks).

AdamW on the adapter's matrices only, linear warm-up then cosine decay, gradient accumulation (the loss is the
mean over every target token of the accumulated batches, as if they were one batch), gradient clipping,
optional gradient checkpointing, a seed for the data order, the initial adapter and dropout. Every ``save_every``
steps a resumable checkpoint (adapter, optimizer, schedule, position in the data, RNG) goes to
``OUT/checkpoints/step-N``; ``resume=True`` continues from the newest. The evaluation loss is measured every
``eval_every`` steps and at the end. ``OUT`` receives the adapter in PEFT's format, ``metrics.jsonl`` (a line per
step and per evaluation) and ``loss.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import Llama3Error
from ..lora import LoraConfig, add_adapter, adapters, lora_modules, save_adapter, trainable_parameters
from .data import Dataset, Example, Pair, batches
from .losses import dpo_loss, target_logprobs

ADAPTER = "train"  # the name of the adapter being trained inside the model


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (the CLI's flags)."""

    method: str = "sft"
    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when reached first)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1  # DPO
    seed: int = 0
    eval_every: int = 0  # 0: at the end of each epoch
    save_every: int = 0  # 0: no intermediate checkpoints
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.method in ("sft", "dpo"), f"method must be 'sft' or 'dpo', got {self.method!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}"),
            (math.isfinite(self.beta) and self.beta > 0, f"beta must be positive, got {self.beta}"),
            (self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise Llama3Error(message)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"]["targets"] = list(self.lora.targets)
        return data


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _pad(examples: Sequence[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and float target masks (B, T); causal attention never lets a pad reach a token."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.zeros(len(examples), length)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        targets[row, : len(e.ids)] = torch.tensor(e.targets, dtype=torch.float32)
    return ids.to(device), targets.to(device)


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_second: float
    seconds: float
    out: Path
    history: list[dict[str, Any]]


class Trainer:
    """Trains adapter ``ADAPTER`` on ``model`` (built by ``llama3.load_model``, no KV cache) with ``config``."""

    def __init__(self, model: nn.Module, train: Dataset, config: TrainConfig, out: str | Path, *,
                 eval_data: Dataset | None = None, pad_id: int = 0, base_model: str | None = None) -> None:
        if getattr(model, "cache_len", 0):
            raise Llama3Error("fine-tuning needs a model without a KV cache (call clear_cache())")
        self.model, self.train_data, self.eval_data, self.config = model, train, eval_data, config
        self.out, self.pad_id, self.base_model = Path(out), pad_id, base_model
        self.device = model.norm.weight.device
        add_adapter(model, ADAPTER, config.lora, seed=config.seed)
        self.params = trainable_parameters(model, ADAPTER)
        # foreach: one fused op over all adapter matrices per update step (the per-tensor loop is the CPU default).
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        n_micro = math.ceil(len(train.items) / config.batch_size)
        self.steps_per_epoch = math.ceil(n_micro / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        warmup = round(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, config.min_lr_ratio))
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._reference: dict[int, tuple[float, float]] = {}  # DPO: the frozen base's answer log-probs, by pair

    # -- one batch ----------------------------------------------------------------------------------------
    def _answer_logprobs(self, examples: Sequence[Example]) -> torch.Tensor:
        """(B,) each example's summed target-token log-probability."""
        ids, targets = _pad(examples, self.pad_id, self.device)
        logps, rows = target_logprobs(self.model, ids, targets)
        return torch.zeros(len(examples), device=logps.device).index_add(0, rows, logps)

    def _sft(self, items: Sequence[Example]) -> tuple[torch.Tensor, int]:
        ids, targets = _pad(items, self.pad_id, self.device)
        logps, _ = target_logprobs(self.model, ids, targets)
        return -logps.sum(), logps.numel()

    def _reference_logprobs(self, index: Sequence[int], pairs: Sequence[Pair]) -> torch.Tensor:
        missing = [(i, p) for i, p in zip(index, pairs) if i not in self._reference]
        if missing:
            with torch.no_grad(), adapters(self.model).using(None):
                logps = self._answer_logprobs([p.chosen for _, p in missing] + [p.rejected for _, p in missing]).tolist()
            for k, (i, _) in enumerate(missing):
                self._reference[i] = (logps[k], logps[k + len(missing)])
        return torch.tensor([self._reference[i] for i in index], device=self.device)

    def _reference_all(self) -> None:
        """The reference log-probs of every training pair, in fixed batches of index order: the same numbers
        whatever order the pairs are drawn in, in a fresh and in a resumed run."""
        items = self.train_data.items
        for chunk in batches(len(items), self.config.batch_size, range(len(items))):
            self._reference_logprobs(chunk, [items[i] for i in chunk])

    def _dpo(self, index: Sequence[int], pairs: Sequence[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        reference = self._reference_logprobs(index, pairs)
        logps = self._answer_logprobs([p.chosen for p in pairs] + [p.rejected for p in pairs])
        n = len(pairs)
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], reference[:, 0], reference[:, 1], self.config.beta)
        stats = {"reward_margin": float((chosen - rejected).sum()), "reward_accuracy": float((chosen > rejected).sum())}
        return losses.sum(), stats

    def _tokens(self, items: Sequence[Any]) -> int:
        if self.config.method == "sft":
            return sum(len(e.ids) for e in items)
        return sum(len(p.chosen.ids) + len(p.rejected.ids) for p in items)

    # -- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss on the evaluation set (per target token for SFT, per pair for DPO), adapter engaged."""
        if self.eval_data is None:
            return None
        self.model.eval()
        total, count, margin, accuracy = 0.0, 0, 0.0, 0.0
        items = self.eval_data.items
        with adapters(self.model).using(ADAPTER):
            for chunk in batches(len(items), self.config.batch_size, range(len(items))):
                group = [items[i] for i in chunk]
                if self.config.method == "sft":
                    loss, n = self._sft(group)
                else:
                    # Reference log-probs of evaluation pairs are cached under negative keys.
                    loss, stats = self._dpo([-1 - i for i in chunk], group)
                    n = len(group)
                    margin += stats["reward_margin"]
                    accuracy += stats["reward_accuracy"]
                total += float(loss)
                count += n
        result = {"eval_loss": total / max(count, 1)}
        if self.config.method == "dpo":
            result |= {"eval_reward_margin": margin / count, "eval_reward_accuracy": accuracy / count}
        return result

    # -- checkpoints --------------------------------------------------------------------------------------
    def _adapter_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for layer, target, module in lora_modules(self.model, ADAPTER):
            state[f"{layer}.{target}.A"] = module.lora_A[ADAPTER].detach().cpu()
            state[f"{layer}.{target}.B"] = module.lora_B[ADAPTER].detach().cpu()
        return state

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoints" / f"step-{self.step}"
        path.mkdir(parents=True, exist_ok=True)
        torch.save({
            "step": self.step, "config": self.config.to_json(), "fingerprint": self._fingerprint(),
            "adapter": self._adapter_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(), "history": self.history,
        }, path / "trainer_state.pt")  # fmt: skip
        return path

    def _fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: every setting that shapes the run, and the data itself."""
        import hashlib

        settings = {k: v for k, v in self.config.to_json().items() if k not in ("eval_every", "save_every")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for item in self.train_data.items:
            for e in ([item] if isinstance(item, Example) else [item.chosen, item.rejected]):
                digest.update(repr((e.ids, e.targets)).encode())
        return digest.hexdigest()

    def _checkpoints(self) -> list[Path]:
        found = [p for p in (self.out / "checkpoints").glob("step-*/trainer_state.pt")
                 if p.parent.name.removeprefix("step-").isdigit()]
        return sorted(found, key=lambda p: int(p.parent.name.removeprefix("step-")))

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``OUT/checkpoints``; False when there is none."""
        found = self._checkpoints()
        if not found:
            return False
        try:
            state = torch.load(found[-1], weights_only=True)
            fingerprint = state["fingerprint"]
        except Exception as exc:  # noqa: BLE001 -- a damaged or foreign file: say which
            raise Llama3Error(f"{found[-1]}: cannot resume from this checkpoint ({exc})") from None
        if fingerprint != self._fingerprint():
            raise Llama3Error(f"{found[-1]}: was made with other settings or data; resume with the same flags and "
                              "files, or leave out --resume to start over")
        with torch.no_grad():
            for layer, target, module in lora_modules(self.model, ADAPTER):
                module.lora_A[ADAPTER].copy_(state["adapter"][f"{layer}.{target}.A"])
                module.lora_B[ADAPTER].copy_(state["adapter"][f"{layer}.{target}.B"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.history = int(state["step"]), list(state["history"])
        return True

    # -- the loop -----------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, *, resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Run to ``total_steps``; ``progress(record)`` is called after each step and evaluation."""
        config, model = self.config, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        if resume and self.resume():
            # Lines logged after the checkpoint belong to the interrupted run: keep the checkpoint's history.
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")
        else:
            # A fresh run owns OUT: an earlier run's checkpoints must not be resumed into this one later.
            metrics.unlink(missing_ok=True)
            for old in self._checkpoints():
                old.unlink()
                with contextlib.suppress(OSError):  # a folder holding anything else is left alone
                    old.parent.rmdir()
            torch.manual_seed(self.config.seed)  # adapter dropout draws from the global generator
        if config.method == "dpo":
            self._reference_all()
        model.gradient_checkpointing = config.gradient_checkpointing
        router = adapters(model)
        items = self.train_data.items
        start = time.perf_counter()
        tokens_seen = 0
        last_eval: float | None = None
        try:
            with router.using(ADAPTER):
                while self.step < self.total_steps:
                    epoch, within = divmod(self.step, self.steps_per_epoch)
                    # The data order of each epoch depends on the seed and the epoch only: a resumed run sees
                    # exactly the batches the uninterrupted one would.
                    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(config.seed + epoch))
                    micro = batches(len(items), config.batch_size, order.tolist())
                    group = micro[within * config.grad_accum : (within + 1) * config.grad_accum]
                    record = self._update(group, epoch)
                    tokens_seen += record["tokens"]
                    elapsed = time.perf_counter() - start
                    record["tokens_per_s"] = tokens_seen / elapsed if elapsed > 0 else 0.0
                    self._log(record)
                    if progress:
                        progress(record)
                    end_of_epoch = (self.step % self.steps_per_epoch == 0) or self.step == self.total_steps
                    if (config.eval_every and self.step % config.eval_every == 0) or (
                            not config.eval_every and end_of_epoch) or self.step == self.total_steps:
                        evaluated = self.evaluate()
                        if evaluated is not None:
                            last_eval = evaluated["eval_loss"]
                            self._log({"step": self.step, "epoch": epoch, **evaluated})
                            if progress:
                                progress(self.history[-1])
                    if config.save_every and self.step % config.save_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
        finally:
            model.gradient_checkpointing = False
            model.eval()
        save_adapter(model, ADAPTER, self.out, base_model=self.base_model)
        (self.out / "training_config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        plot_losses(self.history, self.out / "loss.png")
        train_losses = [r["loss"] for r in self.history if "loss" in r]
        seconds = time.perf_counter() - start
        return TrainResult(self.step, train_losses[-1] if train_losses else None, last_eval,
                           tokens_seen / seconds if seconds > 0 else 0.0, seconds, self.out, self.history)

    def _update(self, group: list[list[int]], epoch: int) -> dict[str, Any]:
        """One optimizer step over the micro-batches of ``group``."""
        config, model, items = self.config, self.model, self.train_data.items
        # Adapter dropout only in SFT: in DPO it would make the policy's log-ratios noisy against a reference
        # computed without it (TRL turns dropout off for DPO too).
        model.train(config.method == "sft")
        self.optimizer.zero_grad(set_to_none=True)
        if config.method == "sft":
            denominator = sum(items[i].n_targets - items[i].targets[0] for mb in group for i in mb)
        else:
            denominator = sum(len(mb) for mb in group)
        total, tokens, margin, accuracy = 0.0, 0, 0.0, 0.0
        for mb in group:
            chunk = [items[i] for i in mb]
            if config.method == "sft":
                loss, _ = self._sft(chunk)
            else:
                loss, stats = self._dpo(mb, chunk)
                margin += stats["reward_margin"]
                accuracy += stats["reward_accuracy"]
            (loss / denominator).backward()
            total += float(loss.detach())
            tokens += self._tokens(chunk)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record: dict[str, Any] = {"step": self.step, "epoch": epoch, "loss": total / denominator, "lr": lr,
                                  "grad_norm": grad_norm, "tokens": tokens}
        if config.method == "dpo":
            record |= {"reward_margin": margin / denominator, "reward_accuracy": accuracy / denominator}
        return record


def plot_losses(history: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The training (and evaluation) loss against the step, as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
