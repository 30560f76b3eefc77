"""Run under torchrun by tests/test_parallel.py: each checkpoint as a tensor-parallel model; rank 0 saves.

Usage: torchrun --standalone --nproc-per-node N tests/tp_worker.py OUT.pt CHECKPOINT[:generate]...
For each checkpoint: logits of a fixed prompt at once and through the KV cache, and this rank's weight bytes;
with ``:generate`` (checkpoints that carry a tokenizer), greedy and seeded sampled tokens of two prompts decoded
together by Meta's API (``Llama.build`` joins the job itself under torchrun).
"""

from __future__ import annotations

import sys

import torch

from llama3.generation import Llama
from llama3.parallel.loader import load_parallel_model
from llama3.parallel.world import init_world

PROMPT = torch.tensor([[1, 5, 9, 100, 3, 7, 42, 8]])
PROMPTS = [[1, 5, 9, 100, 3], [7, 42, 8]]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and quantized blocks (not caches or rotary tables), each storage once."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith("blocks"))]
    for t in tensors:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def run(path: str, generate: bool, world) -> dict:
    result = {}
    model = load_parallel_model(path, world, torch.float32)
    with torch.inference_mode():
        result["full"] = model(PROMPT)
        model.setup_cache(1, 32)
        model(PROMPT[:, :5], 0)
        result["cached"] = model(PROMPT[:, 5:], 5)
        model.clear_cache()
    result["rank_bytes"] = [int(t.item()) for t in world.all_gather(torch.tensor([weight_bytes(model)]))]
    if generate:
        llm = Llama.build(path, max_seq_len=32, max_batch_size=2, dtype=torch.float32)
        result["greedy"] = llm.generate(PROMPTS, max_gen_len=6, temperature=0.0)[0]
        result["sampled"] = llm.generate(PROMPTS, max_gen_len=6, temperature=1.0, top_p=1.0, seed=7)[0]
    return result


def main() -> None:
    out, specs = sys.argv[1], sys.argv[2:]
    world = init_world()
    results = {"reduced": {}}
    for n in (1000, 400_000):  # both sides of GATHER_REDUCE_BYTES: gather + sum, and gloo's ring all-reduce
        x = torch.arange(n, dtype=torch.float32) * (world.rank + 1)
        results["reduced"][n] = world.all_reduce_(x.view(-1, 8)).view(-1)
    for spec in specs:
        path, _, flag = spec.partition(":generate")
        results[path] = run(path, spec.endswith(":generate"), world)
    if world.leader:
        torch.save(results, out)


if __name__ == "__main__":
    main()
