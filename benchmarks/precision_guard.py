"""Accuracy of each CPU level against the float32 path, on the benchmark workloads (issue 15's guard).

For every level this machine can run (``LLAMA3_CPU_LEVEL``), generates the first 32 greedy tokens of the
decode workload and of each batched prompt, and compares them with the avx2 (float32) path: where they first
differ, prints the float path's top-2 logit gap there (a near-tie when < 0.05). Also prints the largest
|logit - float logit| over the prefill of the decode prompt.

    python benchmarks/precision_guard.py [--levels avx512_bf16] [--batch 8]
"""

from __future__ import annotations

import argparse
import os

import torch


def run(level: str, prompts: list[list[int]], tokens: int, forbidden: list[int]):
    from llama3.assets import default_model_path
    from llama3.generation import Llama
    from llama3.sampling import SamplingParams
    from llama3.sequence import GenerationSpec

    os.environ["LLAMA3_CPU_LEVEL"] = level
    llm = Llama.build(default_model_path(), max_seq_len=1024, max_batch_size=4)
    bias = {t: -100.0 for t in forbidden}
    specs = [GenerationSpec(p, tokens, SamplingParams(temperature=0.0, logit_bias=bias), logprobs=True, top_logprobs=2)
             for p in prompts]
    seqs = llm.run(specs)
    with torch.inference_mode():
        llm.model.clear_cache()
        prefill = llm.model(torch.tensor([prompts[0]]), 0)[0]
    return [s.generated for s in seqs], [s.entries for s in seqs], prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", nargs="+", default=["avx512_bf16"])
    parser.add_argument("--batch", type=int, default=32, help="how many of the batched workload's prompts")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from llama3.bench import make_workloads
    from llama3.quant import cpu
    from llama3.tokenizer import load_tokenizer
    from llama3.assets import default_model_path

    print("CPU:", cpu.current().describe())
    w = make_workloads(load_tokenizer(default_model_path()))
    prompts = [w.prompt, *w.batch_prompts[: args.batch]]
    ref_tokens, ref_entries, ref_prefill = run("avx2", prompts, args.tokens, w.forbidden)
    for level in args.levels:
        tokens, _, prefill = run(level, prompts, args.tokens, w.forbidden)
        same, ties, real = 0, [], []
        for i, (a, b) in enumerate(zip(ref_tokens, tokens)):
            if a == b:
                same += 1
                continue
            j = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
            top = ref_entries[i][j].top
            gap = top[0][1] - top[1][1]  # logprob gap = logit gap
            (ties if gap < 0.05 else real).append((i, j, round(gap, 4)))
        err = (prefill - ref_prefill).abs().max().item()
        print(f"{level}: {same}/{len(prompts)} prompts identical over {args.tokens} tokens; max |dlogit| over the "
              f"prefill {err:.4f}; near-tie divergences {ties}; other divergences {real}")


if __name__ == "__main__":
    main()
