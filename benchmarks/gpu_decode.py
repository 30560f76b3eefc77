"""GPU decode throughput of an 8B-shaped random bfloat16 Llama 3 model, against the GPU's memory bandwidth.

A decode step reads every weight once (plus the KV cache so far), so tokens/s x bytes per step / peak bandwidth
is the fraction of the memory system the step uses (issue 15's target: >= 70 % on an H200). Eager and compiled
(``llama3.compiled``, CUDA graphs) steps, batch 1, after a 128-token prefill.

    python benchmarks/gpu_decode.py [--peak-gbps 4800] [--steps 128] [--layers 32]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbps", type=float, default=4800.0, help="the GPU's peak memory bandwidth (H200: 4800)")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only checks this script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py: no CUDA GPU here")
    from llama3 import compiled
    from llama3.config import ModelConfig
    from llama3.model import Transformer, rope_table

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    config = ModelConfig(dim=4096, n_layers=args.layers, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         hidden_dim=14336, max_seq_len=2048, rope_theta=500000.0)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.rope = rope_table(config, 2048, device)  # to_empty left the buffer uninitialised
    model.eval().requires_grad_(False)
    model.setup_cache(1, 1024)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{gpu}: {weight_bytes / 1e9:.2f} GB of bfloat16 weights, {args.layers} layers")
    prompt = torch.randint(0, config.vocab_size, (1, 128), device=device)
    for name in ("eager", "compiled"):
        if name == "compiled":
            compiled.enable(model)
        with torch.inference_mode():
            model(prompt, 0, last_only=True)
            token = torch.zeros(1, 1, dtype=torch.long, device=device)
            for pos in range(128, 136):  # warm-up (and graph capture)
                model(token, pos, last_only=True)
            sync()
            start = time.perf_counter()
            for pos in range(136, 136 + args.steps):
                model(token, pos, last_only=True)
            sync()
            seconds = (time.perf_counter() - start) / args.steps
        kv_bytes = 2 * args.layers * 8 * 128 * 2 * 1024  # the step's attention reads the whole static cache
        gbps = (weight_bytes + kv_bytes) / seconds / 1e9
        print(f"{name:9s} {1 / seconds:8.1f} tok/s  {gbps:8.0f} GB/s  {100 * gbps / args.peak_gbps:5.1f} % of "
              f"{args.peak_gbps:.0f} GB/s")


if __name__ == "__main__":
    main()
