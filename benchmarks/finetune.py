"""LoRA fine-tuning throughput and memory: this engine against transformers + PEFT, side by side in one run.

    python benchmarks/finetune.py                      # default model, rank 16, batch 4, 12 timed steps
    python benchmarks/finetune.py --steps 20 --seq-len 256 --rank 8 --out finetune-results.json

Both engines train the same adapter (rank, alpha, dropout 0, all seven matrices of every layer) with AdamW at
the same learning rate on the same token ids and target masks (built once with this engine's tokenizer and the
model's chat template), the same batches in the same order. Each runs in its own process: transformers loads
the GGUF through its own loader (weights dequantized to float32, as its users get them); this engine trains
over the file's quantized blocks, as ``llama3 finetune`` does. Timed: the optimizer steps after ``--warmup``
untimed ones; tokens/s counts every token of every sequence (padding excluded). Peak memory is each worker's
VmHWM. Prints a table with ratios (x > 1: ours is better) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import hwm_mb, machine_info  # noqa: E402

TOPICS = ["rivers", "owls", "bread", "trains", "maps", "the moon", "glass", "tea", "bees", "snow", "clocks", "salt"]


def build_examples(args: argparse.Namespace) -> list[dict[str, list]]:
    """Chat examples of about ``--seq-len`` tokens: a question and a long answer (the answer is the target)."""
    import random

    from llama3.finetune.data import ExampleBuilder
    from llama3.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    builder = ExampleBuilder(tok)
    rng = random.Random(0)
    examples = []
    for i in range(args.batch_size * (args.steps + args.warmup)):
        topic = rng.choice(TOPICS)
        answer = " ".join(f"Fact {k} about {topic}: it is {rng.choice(['old', 'new', 'blue', 'small', 'loud'])}."
                          for k in range(200))
        record = {"messages": [{"role": "user", "content": f"Tell me about {topic} ({i})."},
                               {"role": "assistant", "content": answer}]}
        e = builder.sft(record, f"example {i}")
        examples.append({"ids": list(e.ids[: args.seq_len]), "targets": list(e.targets[: args.seq_len])})
    return examples


def llama3_worker(args: argparse.Namespace, examples: list[dict]) -> dict[str, Any]:
    import torch

    import llama3
    from llama3.finetune.data import Dataset, Example
    from llama3.finetune.trainer import TrainConfig, Trainer
    from llama3.lora import LoraConfig, adapters

    torch.set_num_threads(args.threads)
    model = llama3.load_model(args.model, device="cpu", dtype=torch.float32)
    data = Dataset(Path("bench"), [Example(tuple(e["ids"]), tuple(map(bool, e["targets"]))) for e in examples])
    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.0,
                         lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0))
    trainer = Trainer(model, data, config, tempfile.mkdtemp(), pad_id=0)
    adapters(model).use("train")
    times = []
    for step in range(args.steps + args.warmup):
        group = [list(range(step * args.batch_size, (step + 1) * args.batch_size))]
        start = time.perf_counter()
        trainer._update(group, 0)
        times.append(time.perf_counter() - start)
    return {"step_s": times[args.warmup :], "peak_rss_mb": hwm_mb()}


def transformers_worker(args: argparse.Namespace, examples: list[dict]) -> dict[str, Any]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.model.parent, gguf_file=args.model.name, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, foreach=True)
    times = []
    for step in range(args.steps + args.warmup):
        batch = examples[step * args.batch_size : (step + 1) * args.batch_size]
        length = max(len(e["ids"]) for e in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e["ids"])
            ids[row, :n] = torch.tensor(e["ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.where(torch.tensor(e["targets"], dtype=torch.bool), ids[row, :n], -100)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"step_s": times[args.warmup :], "peak_rss_mb": hwm_mb()}


WORKERS = {"llama3": llama3_worker, "transformers": transformers_worker}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--engines", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="finetune-results.json")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from llama3.assets import default_model_path

        args.model = default_model_path()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        examples = json.loads(args.examples.read_text())
        print(json.dumps(WORKERS[args.worker](args, examples)))
        return 0
    examples = build_examples(args)
    tokens_per_step = [sum(len(e["ids"]) for e in examples[s * args.batch_size : (s + 1) * args.batch_size])
                       for s in range(args.warmup, args.warmup + args.steps)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "examples.json"
        path.write_text(json.dumps(examples))
        for engine in args.engines:
            cmd = [sys.executable, __file__, "--worker", engine, "--examples", str(path), "--model", str(args.model),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--lr", str(args.lr),
                   "--threads", str(args.threads)]  # fmt: skip
            print(f"running {engine} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode:
                results[engine] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rates = [t / s for t, s in zip(tokens_per_step, r["step_s"])]
            results[engine] = {**r, "tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates}
    print(f"\n{machine_info()['date']}  {machine_info()['cpu']}  {args.threads} threads")
    print(f"{args.model.name}: LoRA rank {args.rank} on all 7 matrices, batch {args.batch_size} x "
          f"{statistics.mean(tokens_per_step) / args.batch_size:.0f} tokens, median of {args.steps} steps\n")
    print(f"{'engine':<14}{'tokens/s':>10}{'step (s)':>10}{'peak RSS':>12}")
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:<14}error: {r['error']}")
            continue
        print(f"{engine:<14}{r['tokens_per_s']:>10.1f}{statistics.median(r['step_s']):>10.2f}{r['peak_rss_mb']:>8.0f} MiB")
    ours, peer = results.get("llama3", {}), results.get("transformers", {})
    if "tokens_per_s" in ours and "tokens_per_s" in peer:
        speed = ours["tokens_per_s"] / peer["tokens_per_s"]
        memory = peer["peak_rss_mb"] / ours["peak_rss_mb"]
        print(f"\nvs transformers + PEFT: {speed:.2f}x tokens/s, {memory:.2f}x less peak memory "
              f"(target: >= 1.5x tokens/s at no more memory: {'met' if speed >= 1.5 and memory >= 1 else 'NOT MET'})")
        results["ratios"] = {"tokens_per_s": speed, "memory": memory}
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
                                          "engines": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
