"""Micro-benchmark of the quantized linear kernels at SmolLM2-135M's shapes against dense float32 F.linear.

    python benchmarks/quant_kernels.py                 # 2 threads, M = 1, 32, 256, cold weights
    python benchmarks/quant_kernels.py --rows 1 4 8 16 32 64 --hot
    python benchmarks/quant_kernels.py --model        # all 211 matmuls of one SmolLM2 token step

Kernels (each timed on the same random weights, quantized with gguf's own quantizer):
  f32         F.linear with the dequantized float32 matrix (the baseline: 4 bytes per weight)
  quant       llama3.quant.QuantLinear as the loader builds it: for M <= FUSED_MAX_ROWS the fused block
              kernel (exact weights, x coded as int16 per 32-block), above that dequantize-to-slab +
              BLAS GEMM (exact weights, float32 GEMM)
  fused/gemm  the two native strategies forced, to show where the crossover lies
  portable    the non-AVX2/CUDA fallback (torch dequantize + F.linear)
  i4pack-bf16 torch's _weight_int4pack_mm_for_cpu, bfloat16 activations (Q4 types; not exact: bf16 scales)
  i8pack-bf16 torch's _weight_int8pack_mm, bfloat16 activations (Q8_0; per-channel scales, so lossy)

"Cold" (default) cycles through enough copies of each weight (>= 160 MB) that it is read from DRAM on
every call, as in real decoding where the whole model streams through per token; --hot reuses one copy.
Times are medians (and minima) in microseconds over interleaved repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf import quants

from llama3.quant import QuantLinear, native

# (label, out_features, in_features) of every matmul in a SmolLM2-135M token step.
SHAPES = [
    ("wq/wo 576->576", 576, 576),
    ("wk/wv 576->192", 192, 576),
    ("w1/w3 576->1536", 1536, 576),
    ("w2 1536->576", 576, 1536),
    ("head 576->49152", 49152, 576),
]


def timed(fns: list, seconds: float) -> tuple[float, float]:
    """(median, min) microseconds of calling fns round-robin for about ``seconds``."""
    for fn in fns[:2]:
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < 7:
        fn = fns[i % len(fns)]
        i += 1
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, min(times) * 1e6


def copies(nbytes: int, hot: bool, cap: int = 400) -> int:
    return 1 if hot else int(min(cap, max(1, np.ceil(160e6 / nbytes))))


def kernels(n: int, k: int, qtype: int, m: int, hot: bool, rng) -> dict[str, list]:
    """name -> closures (one per weight copy) computing x @ W^T for x (m, k)."""
    weight = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
    raw = quants.quantize(weight, T(qtype))
    dense = torch.from_numpy(quants.dequantize(raw, T(qtype)).astype(np.float32))
    blocks = torch.from_numpy(raw)
    x = torch.randn(m, k)
    xb = x.bfloat16()
    out: dict[str, list] = {}
    dense_copies = [dense] + [dense.clone() for _ in range(copies(dense.numel() * 4, hot, 40) - 1)]
    out["f32"] = [lambda w=w: F.linear(x, w) for w in dense_copies]
    block_copies = [blocks] + [blocks.clone() for _ in range(copies(blocks.numel(), hot) - 1)]
    if native.available():
        mods = [QuantLinear(b, qtype, k, n) for b in block_copies]
        out["quant"] = [lambda q=q: q(x) for q in mods]
        op = torch.ops.llama3_quant.qmatmul
        if m > 1:
            out["fused"] = [lambda b=b: op(x, b, qtype, k, 1 << 20, native.SLAB_BYTES) for b in block_copies]
            out["gemm"] = [lambda b=b: op(x, b, qtype, k, 0, native.SLAB_BYTES) for b in block_copies]
    portable = QuantLinear(blocks, qtype, k, n)
    portable.native = False
    out["portable"] = [lambda: portable(x)]
    if qtype in (T.Q4_0, T.Q4_1):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        packs = [packed] + [packed.clone() for _ in range(copies(packed.numel() + n * k // 8, hot) - 1)]
        sz = torch.randn(k // 32, n, 2).bfloat16()
        mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
        out["i4pack-bf16"] = [lambda p=p: mm4(x.bfloat16(), p, 32, sz).float() for p in packs]
    if qtype == T.Q8_0:
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        w8s = [w8] + [w8.clone() for _ in range(copies(w8.numel(), hot) - 1)]
        s8 = torch.rand(n).bfloat16()
        out["i8pack-bf16"] = [lambda w=w: torch.ops.aten._weight_int8pack_mm(xb, w, s8).float() for w in w8s]
    return out


def model_step(rows: list[int], seconds: float) -> None:
    """Time every linear layer of the default model once per 'token step', quantized vs dense float32."""
    from llama3.assets import default_model_path
    from llama3.checkpoint.gguf import read_gguf
    from llama3.quant import quantized_embedding, quantized_linear, tied_output

    _, state = read_gguf(default_model_path())
    quant, dense = [], []
    for name, t in state.items():
        if name.startswith("layers.") and not name.endswith("norm.weight"):
            quant.append(quantized_linear(t, torch.float32, "cpu"))
            dense.append(t.dequantize())
    quant.append(tied_output(quantized_embedding(state["tok_embeddings.weight"], torch.float32, "cpu")))
    dense.append(state["tok_embeddings.weight"].dequantize())
    print(f"{len(quant)} matmuls: quantized {sum(q.blocks.numel() for q in quant) / 1e6:.1f} MB, "
          f"dense float32 {sum(w.numel() * 4 for w in dense) / 1e6:.1f} MB")  # fmt: skip
    for m in rows:
        xs = {k: torch.randn(m, k) for k in {q.in_features for q in quant}}
        q_ms = timed([lambda xs=xs: [q(xs[q.in_features]) for q in quant]], seconds * 5)
        d_ms = timed([lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in dense]], seconds * 5)
        print(f"M={m:<4} quantized {q_ms[0] / 1e3:8.2f} ms (min {q_ms[1] / 1e3:.2f})   "
              f"dense f32 {d_ms[0] / 1e3:8.2f} ms (min {d_ms[1] / 1e3:.2f})   {d_ms[0] / q_ms[0]:.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256], help="M values (tokens per call)")
    ap.add_argument("--q4", choices=["Q4_0", "Q4_1"], default="Q4_1", help="encoding of the layer matrices")
    ap.add_argument("--hot", action="store_true", help="reuse one weight copy (cache-resident)")
    ap.add_argument("--seconds", type=float, default=0.6, help="time budget per kernel and shape")
    ap.add_argument("--only", nargs="*", help="kernel names to run (default all)")
    ap.add_argument("--model", action="store_true", help="time a whole SmolLM2 token step instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model_step(args.rows, args.seconds)
        return
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} native={native.available()} weights={'hot' if args.hot else 'cold'} "
          f"capability={torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print(f"{'shape':<17} {'M':>4} {'kernel':<12} {'median us':>10} {'min us':>9} {'vs f32':>7}")
    for label, n, k in SHAPES:
        qtype = T.Q8_0 if label.startswith("head") else T[args.q4]
        for m in args.rows:
            results = {}
            for name, fns in kernels(n, k, qtype, m, args.hot, rng).items():
                if args.only and name not in args.only and name != "f32":
                    continue
                results[name] = timed(fns, args.seconds)
            base = results["f32"][0]
            for name, (med, lo) in results.items():
                print(f"{label:<17} {m:>4} {name + ' ' + T(qtype).name if name == 'quant' else name:<12} "
                      f"{med:>10.0f} {lo:>9.0f} {base / med:>6.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
