"""Tensor parallelism on this machine: 1 process against 2 ranks (gloo, 1 thread each), one checkpoint.

    python benchmarks/parallel.py                      # dim 2048, 4 layers, float32: ~1.4 GB of weights
    python benchmarks/parallel.py --dim 1024 --layers 2 --repeat 3 --out tp.json

A random Hugging Face checkpoint (safetensors, float32) sized so the weights dominate is written once. The
same worker then runs as a plain process (``llama3.load_model``) and under ``torchrun --nproc-per-node 2``
(``load_parallel_model``, each rank reading its slices of the file). Every process pins 1 intra-op thread, so
2 ranks use the 2 cores that 1 process with 2 threads would. Reported per setup: prefill tok/s (one prompt),
decode tok/s (batch 1 and batch 4, through the KV cache), each the median of ``--repeat`` runs; each rank's
weight bytes and peak RSS; and, counted on the collectives themselves, how many calls and bytes one decode
step sends per rank. Ratios read "x > 1: 2 ranks are better".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(path: Path, dim: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> Path:
    """A random Llama checkpoint in Hugging Face layout, written tensor by tensor (no transformers model)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    head_dim = dim // heads

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    tensors = {"model.embed_tokens.weight": w(vocab, dim), "model.norm.weight": torch.ones(dim),
               "lm_head.weight": w(vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": torch.ones(dim), p + "post_attention_layernorm.weight": torch.ones(dim),
                    p + "self_attn.q_proj.weight": w(heads * head_dim, dim),
                    p + "self_attn.k_proj.weight": w(kv_heads * head_dim, dim),
                    p + "self_attn.v_proj.weight": w(kv_heads * head_dim, dim),
                    p + "self_attn.o_proj.weight": w(dim, heads * head_dim),
                    p + "mlp.gate_proj.weight": w(ffn, dim), p + "mlp.up_proj.weight": w(ffn, dim),
                    p + "mlp.down_proj.weight": w(dim, ffn)}
    save_file(tensors, str(path / "model.safetensors"))
    return path


# -- the worker: one process, or one rank of a torchrun job -------------------------------------------------


class Counted:
    """Counts the collectives a ``World`` runs (calls and bytes this rank sends)."""

    def __init__(self, world) -> None:
        self.calls = self.bytes = 0
        self.seconds = 0.0  # time inside the collectives, counted or not (a whole decode run)
        self.on = False
        for name in ("all_reduce_", "all_gather"):
            setattr(world, name, self._wrap(getattr(world, name)))

    def _wrap(self, op):
        def counted(tensor: torch.Tensor):
            if self.on:
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
            start = time.perf_counter()
            try:
                return op(tensor)
            finally:
                self.seconds += time.perf_counter() - start

        return counted


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    from llama3 import load_model
    from llama3.parallel.loader import load_parallel_model
    from llama3.parallel.world import init_world, shutdown

    torch.set_num_threads(1)
    world = init_world("cpu")
    start = time.perf_counter()
    if world is None:
        model = load_model(args.checkpoint, device="cpu", dtype=torch.float32)
    else:
        model = load_parallel_model(args.checkpoint, world, torch.float32)
    load_s = time.perf_counter() - start
    counter = Counted(world) if world is not None else None
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(vocab, (1, args.prompt_tokens), generator=g)
    result: dict = {"load_s": load_s, "weight_bytes": weight_bytes(model), "prefill": [], "decode": {}}
    with torch.inference_mode():
        model.setup_cache(4, args.prompt_tokens + args.gen_tokens + 1)
        model(prompt[:, :8], 0, last_only=True)  # warm-up
        for _ in range(args.repeat):
            result["prefill"].append(args.prompt_tokens / timed(lambda: model(prompt, 0, last_only=True)))
        for batch in (1, 4):
            tokens = torch.randint(vocab, (batch, args.prompt_tokens), generator=g)
            runs, waits = [], []
            for _ in range(args.repeat):
                model(tokens, 0, last_only=True)
                if counter is not None:
                    counter.seconds = 0.0

                def decode() -> None:
                    nxt = tokens[:, -1:]
                    for i in range(args.gen_tokens):
                        nxt = model(nxt, args.prompt_tokens + i, last_only=True).argmax(-1)

                runs.append(batch * args.gen_tokens / timed(decode))
                if counter is not None:
                    waits.append(counter.seconds / args.gen_tokens)
            result["decode"][batch] = runs
            result.setdefault("collective_s_per_step", {})[batch] = waits
        if counter is not None:
            model(prompt, 0, last_only=True)
            counter.on = True
            model(prompt[:, -1:], args.prompt_tokens, last_only=True)
            counter.on = False
            result["step_collectives"] = {"calls": counter.calls, "bytes": counter.bytes}
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if world is None:
        print("RESULT " + json.dumps([result]))
    else:
        gathered = [None] * world.size
        torch.distributed.all_gather_object(gathered, result)
        if world.leader:
            print("RESULT " + json.dumps(gathered))
        shutdown()


# -- the driver -------------------------------------------------------------------------------------------


def run(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx_vnni|amx[a-z_]*|avx2)\b", text)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", args.dim, args.layers, args.heads, args.kv_heads, args.ffn,
                                args.vocab)
        common = [str(Path(__file__).resolve()), "--worker", "--checkpoint", str(ckpt),
                  "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                  "--repeat", str(args.repeat)]
        one = run([sys.executable, *common])
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *common])

    med = statistics.median
    rows = [("prefill tok/s", med(one[0]["prefill"]), med(two[0]["prefill"]))]
    for batch in ("1", "4"):
        rows.append((f"decode tok/s, batch {batch}", med(one[0]["decode"][batch]), med(two[0]["decode"][batch])))
    print(f"checkpoint: dim {args.dim}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"ffn {args.ffn}, vocab {args.vocab}, float32; prompt {args.prompt_tokens}, {args.gen_tokens} decode "
          f"steps, median of {args.repeat}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags {' '.join(cpu_flags())}")
    print(f"{'':28}{'1 process':>12}{'2 ranks':>12}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:28}{a:12.1f}{b:12.1f}{b / a:8.2f}")
    gb = 1 << 30
    print(f"{'weights per rank, GiB':28}{one[0]['weight_bytes'] / gb:12.2f}"
          + "".join(f"{r['weight_bytes'] / gb:6.2f}" for r in two))
    print(f"{'peak RSS per rank, GiB':28}{one[0]['peak_rss'] / gb:12.2f}" + "".join(f"{r['peak_rss'] / gb:6.2f}" for r in two))
    print(f"{'load s':28}{one[0]['load_s']:12.2f}" + "".join(f"{r['load_s']:6.2f}" for r in two))
    c = two[0]["step_collectives"]
    print(f"collectives per decode step (batch 1), per rank: {c['calls']} calls, {c['bytes']} bytes sent "
          f"(2 all-reduces per layer + 1 embedding all-reduce of dim floats, 1 all-gather of vocab/ranks floats)")
    for batch in ("1", "4"):
        waits = [med(r["collective_s_per_step"][batch]) * 1e3 for r in two]
        step = 1e3 * int(batch) / med(two[0]["decode"][batch])
        print(f"decode step, batch {batch}: {step:.1f} ms, of which in collectives per rank (waiting for the other "
              f"rank included): " + ", ".join(f"{w:.1f} ms" for w in waits))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "one": one, "two": two,
                                        "flags": cpu_flags()}, indent=2))


if __name__ == "__main__":
    main()
