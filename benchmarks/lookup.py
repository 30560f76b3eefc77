"""Prompt-lookup speculative decoding: decode speed with and without it, on answers that copy their prompt.

Four chat prompts over one order record (copy it, list its items, JSON of it, and a code answer that repeats
itself), each generated alone (batch 1) and all four together (batch 4), greedy, ``--tokens`` new tokens;
prints tokens/s of the decode (prefill excluded), decode steps, drafts fed and accepted, and checks that the
tokens are identical with and without lookup.

    python benchmarks/lookup.py [--draft 4] [--tokens 160] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DOC = ("Order #88213 was placed on 12 March 2024 by Jane Doe, 14 Elm Street, Springfield. Items: two USB-C cables "
       "(SKU CB-2231, $9.99 each), one wireless mouse (SKU MS-410, $24.50), and a 27-inch monitor (SKU MN-2700, "
       "$219.00). Shipping: express, $12.00. Payment: Visa ending 4421.")
QUESTIONS = ["Copy the text above exactly.", "List every item with its SKU and price, one per line.",
             "Return a JSON object with keys order, customer, address, items.",
             "Write a Python function that returns the nth Fibonacci number, then the same with a docstring."]


def run(llm, prompts: list[list[int]], draft: int, tokens: int, batch: int):
    from llama3.scheduler import Scheduler
    from llama3.sampling import SamplingParams
    from llama3.sequence import GenerationSpec

    llm.scheduler = Scheduler(llm.model, max_batch_size=batch, max_seq_len=llm.max_seq_len, prefix_cache=False,
                              prompt_lookup=draft)
    outputs, decode_s = [], 0.0
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    for group in groups:
        seqs = [llm.sequence(GenerationSpec(p, tokens, SamplingParams(temperature=0.0))) for p in group]
        llm.scheduler.add_all(seqs, ["prompt"] * len(seqs))
        while not all(s.generated for s in seqs):  # prefill and first tokens: not timed
            llm.scheduler.step()
        start = time.perf_counter()
        while llm.scheduler.busy:
            llm.scheduler.step()
        decode_s += time.perf_counter() - start
        outputs += [s.generated for s in seqs]
    after_first = sum(len(o) - 1 for o in outputs)
    return outputs, after_first / decode_s, llm.scheduler.stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from llama3.generation import Llama

    llm = Llama.build(None, max_seq_len=1024, max_batch_size=4)
    prompts = [llm.tokenizer.encode_dialog_prompt([{"role": "user", "content": f"{DOC}\n\n{q}"}]) for q in QUESTIONS]
    for batch in (1, 4):
        rates: dict[int, list[float]] = {0: [], args.draft: []}
        outputs: dict[int, list] = {}
        for _ in range(args.repeat):
            for draft in rates:
                outputs[draft], rate, stats = run(llm, prompts, draft, args.tokens, batch)
                rates[draft].append(rate)
        plain, fast = statistics.median(rates[0]), statistics.median(rates[args.draft])
        print(f"batch {batch}: decode {plain:.1f} -> {fast:.1f} tok/s ({fast / plain:.2f}x) with --prompt-lookup "
              f"{args.draft}; {stats['decode_steps']} steps for {sum(map(len, outputs[args.draft]))} tokens, "
              f"{stats['accepted_draft_tokens']} of {stats['draft_tokens']} draft tokens accepted; "
              f"identical tokens: {outputs[0] == outputs[args.draft]}")


if __name__ == "__main__":
    main()
