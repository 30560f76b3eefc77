"""``llama3 finetune`` (train a LoRA adapter with SFT or DPO) and ``llama3 export`` (merge it into a Hugging Face
directory): thin adapters over ``llama3.finetune`` and ``llama3.lora``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Llama3Error
from ..lora import FROM_HF, TARGETS, LoraConfig
from ..options import apply_threads, parse_device


def _targets(text: str) -> tuple[str, ...]:
    """``wq,wv`` or ``q_proj,v_proj`` or ``all`` -> Meta's short names."""
    if text.strip() == "all":
        return tuple(TARGETS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS and t not in FROM_HF]
    if unknown or not names:
        raise Llama3Error(f"--lora-targets: unknown {', '.join(unknown) or 'empty list'} "
                          f"(use {', '.join(TARGETS)}, their Hugging Face names, or all)")
    return tuple(dict.fromkeys(FROM_HF.get(t, t) for t in names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", "-m", default=None, help="a .gguf file, Hugging Face dir or Meta dir (default: SmolLM2)")
    model.add_argument("--tokenizer", default=None, help="tokenizer file or dir (default: found in the checkpoint)")
    model.add_argument("--no-quant", action="store_true", help="expand quantized GGUF weights to float32 first")
    model.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    model.add_argument("--device", default="cpu", help="cpu (default), or cuda (float32 base weights on the GPU)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="training JSONL (SFT: messages or prompt/completion; DPO: prompt/chosen/rejected)")
    data.add_argument("--eval-data", default=None, help="evaluation JSONL, same format")
    data.add_argument("--max-seq-len", type=int, default=1024, help="tokens per example; longer ones are cut (default %(default)s)")
    parser.add_argument("--out", required=True, help="output directory: the PEFT adapter, metrics.jsonl, loss.png, checkpoints/")
    parser.add_argument("--method", choices=("sft", "dpo"), default="sft")
    lora = parser.add_argument_group("adapter")
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    lora.add_argument("--lora-dropout", type=float, default=0.05)
    lora.add_argument("--lora-targets", default="all", help="comma-separated wq,wk,wv,wo,w1,w2,w3 (or q_proj...), or all")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) (rank-stabilised LoRA)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=3)
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    opt.add_argument("--batch-size", type=int, default=4)
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-ratio", type=float, default=0.03)
    opt.add_argument("--max-grad-norm", type=float, default=1.0)
    opt.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default %(default)s)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    run = parser.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: each epoch)")
    run.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints (0: none)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..assets import default_model_path
    from ..checkpoint import load_model
    from ..tokenizer import load_tokenizer
    from .data import load_dataset
    from .trainer import TrainConfig, Trainer

    apply_threads(args.threads)
    if args.max_seq_len < 2:
        raise Llama3Error(f"--max-seq-len must be >= 2 (got {args.max_seq_len})")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    config = TrainConfig(
        method=args.method, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, beta=args.beta, seed=args.seed, eval_every=args.eval_every,
        save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing,
        lora=LoraConfig(rank=args.lora_rank, alpha=alpha, dropout=args.lora_dropout,
                        targets=_targets(args.lora_targets), rslora=args.rslora),
    )  # fmt: skip
    path = Path(args.model).expanduser() if args.model else default_model_path()
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer else path)
    # Every line of both files is checked before the model loads: a bad record costs no time.
    train = load_dataset(args.data, tokenizer, args.method, args.max_seq_len)
    evaluation = load_dataset(args.eval_data, tokenizer, args.method, args.max_seq_len) if args.eval_data else None
    for d in (train, evaluation):
        if d is not None and (d.truncated or d.dropped):
            print(f"{d.path}: {d.truncated} records cut to {args.max_seq_len} tokens, {d.dropped} dropped "
                  "(no answer token within the limit)", file=sys.stderr)
    device = parse_device(args.device) or torch.device("cpu")
    model = load_model(path, device=device, dtype=torch.float32, quantize=None if args.no_quant else "auto")
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    trainer = Trainer(model, train, config, args.out, eval_data=evaluation, pad_id=pad, base_model=str(path))
    bar = tqdm(total=trainer.total_steps, unit="step", disable=args.quiet, dynamic_ncols=True)
    shown: dict[str, str] = {}

    def progress(record: dict) -> None:
        if "loss" in record:
            bar.update(record["step"] - bar.n)
            shown.update(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if "eval_loss" in record:
            shown["eval"] = f"{record['eval_loss']:.4f}"
        bar.set_postfix(shown, refresh=True)

    try:
        result = trainer.train(resume=args.resume, progress=progress)
    finally:
        bar.close()
    print(f"adapter written to {result.out} ({result.steps} steps in {result.seconds:.1f} s, "
          f"{result.tokens_per_second:.0f} tokens/s; final loss {result.train_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "") + ")", file=sys.stderr)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="the base model (default: SmolLM2)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--lora", default=None, help="a PEFT LoRA directory to merge in (none: export the base)")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")


def run_export(args: argparse.Namespace) -> int:
    import torch

    from ..assets import default_model_path
    from ..checkpoint import load_model
    from ..checkpoint.export import save_hf
    from ..lora import load_adapter, merged_state
    from ..tokenizer import load_tokenizer

    path = Path(args.model).expanduser() if args.model else default_model_path()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise Llama3Error(f"--out {out}: directory exists and is not empty")
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer else path)
    model = load_model(path, device="cpu", dtype=torch.float32)
    name = None
    if args.lora:
        load_adapter(model, args.lora, "merge")
        name = "merge"
    save_hf(out, model.config, merged_state(model, name), tokenizer)
    print(f"wrote {out} (float32 safetensors" + (f", {args.lora} merged" if args.lora else "") + ")", file=sys.stderr)
    return 0
