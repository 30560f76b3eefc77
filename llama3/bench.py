"""``llama3 bench``: this engine's load time, prefill, decode and batched throughput, and peak memory.

The workloads are those of issue 5, shared with ``benchmarks/compare.py`` (which runs the same token ids
through llama.cpp and transformers; its llama3 worker *is* this command with ``--prompts``):

* decode / prefill: one prompt of ``--prompt-tokens`` (256) tokens, then ``--gen-tokens`` (128) greedy new
  tokens; prefill tok/s = prompt tokens / time to the first new token, decode tok/s = the later tokens /
  their time (prefill excluded).
* batched: ``--batch`` (32) different prompts of 100-400 tokens (seeded lengths), ``--batch-gen-tokens`` (32)
  greedy new tokens each, all in one ``Llama.generate`` call; total generated tokens / wall time.
* peak resident memory (``VmHWM``): after the single-stream workloads, and after the batch (whose KV
  cache holds every row); also the baseline before loading (interpreter + torch + llama3 imports).

Stop tokens are forbidden (a large negative logit bias), never just ignored, so every engine generates
exactly the same number of tokens and still picks the same greedy tokens. Each workload runs ``--warmup``
times untimed, then ``--repeat`` times; medians are reported, with min/max and every run in the JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import Llama3Error
from .options import add_model_arguments, build_llm

FORBID = -1e30  # logit bias that rules a token out (SamplingParams wants a finite bias)

# Word lists for deterministic, varied English; every prompt is a different seeded draw of sentences.
_SUBJECTS = (
    "The old fisherman", "A young engineer", "My neighbour", "The village council", "Our history teacher",
    "A tired traveller", "The city library", "Her younger brother", "The research team", "A quiet student",
    "The baker on the corner", "Every morning the farmer", "The orchestra", "A curious child", "The captain",
    "Two old friends", "The new manager", "A small robot", "The museum guide", "His grandmother",
)
_VERBS = (
    "carefully repaired", "slowly painted", "proudly described", "quickly sold", "patiently explained",
    "happily shared", "secretly studied", "loudly praised", "gently moved", "finally opened",
    "often visited", "nearly forgot", "eagerly measured", "calmly collected", "bravely crossed",
)
_OBJECTS = (
    "a wooden boat", "the broken clock", "an ancient map", "three baskets of apples", "the long report",
    "a letter from abroad", "the stone bridge", "a box of old photographs", "the garden fence",
    "a recipe for bread", "the mountain trail", "a set of blue tiles", "the rusty bicycle", "a book about stars",
    "the school play", "a jar of honey", "the winter coat", "a map of the river", "the kitchen window",
)
_PLACES = (
    "near the harbour", "behind the town hall", "in the crowded market", "at the edge of the forest",
    "beside the railway station", "on the top floor", "under the old oak tree", "in a small workshop",
    "across the valley", "along the northern coast", "inside the quiet church", "at the busy crossroads",
)
_TIMES = (
    "before sunrise", "after the storm", "during the holidays", "on a cold Tuesday", "late in the evening",
    "at the end of summer", "while it was raining", "just after lunch", "in the spring of that year",
    "before the guests arrived", "once the snow had melted", "during the long night",
)
_ENDINGS = (
    "Nobody expected it to take so long.", "Everyone agreed that it had been worth the effort.",
    "It was the first time anyone had tried.", "The neighbours talked about it for weeks.",
    "Later they wrote the whole story down.", "Some of them still remember that day.",
    "A few people laughed, but most were impressed.", "Then they went home and slept for hours.",
)


def english_text(rng: random.Random, sentences: int) -> str:
    """``sentences`` seeded, grammatical, varied English sentences."""
    out = []
    for _ in range(sentences):
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.7:
            parts.append(rng.choice(_PLACES))
        if rng.random() < 0.6:
            parts.append(rng.choice(_TIMES))
        out.append(" ".join(parts) + ".")
        if rng.random() < 0.25:
            out.append(rng.choice(_ENDINGS))
    return " ".join(out)


def prompt_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """Exactly ``n_tokens`` ids of seeded English (BOS first when the tokenizer adds one)."""
    if n_tokens < 1:
        raise Llama3Error(f"prompt length must be >= 1 token (got {n_tokens})")
    rng = random.Random(seed)
    text = ""
    while True:
        text += english_text(rng, 8) + "\n\n"
        ids = tokenizer.encode(text, bos=True, eos=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]


@dataclass
class Workloads:
    """The token ids every engine runs, and what is forbidden to generate (the stop tokens)."""

    prompt: list[int]
    gen_tokens: int
    batch_prompts: list[list[int]]
    batch_gen_tokens: int
    forbidden: list[int]

    @property
    def context(self) -> int:
        """Cache positions the longest sequence needs."""
        lengths = [len(self.prompt) + self.gen_tokens] + [len(p) + self.batch_gen_tokens for p in self.batch_prompts]
        return max(lengths)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: str | Path) -> Workloads:
        try:
            data = json.loads(Path(path).read_text())
            return Workloads(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise Llama3Error(f"--prompts {path}: not a workloads file ({exc})") from None


def make_workloads(
    tokenizer,
    prompt_tokens: int = 256,
    gen_tokens: int = 128,
    batch: int = 32,
    batch_lengths: tuple[int, int] = (100, 400),
    batch_gen_tokens: int = 32,
    seed: int = 0,
) -> Workloads:
    """Issue 5's workloads as token ids: one decode prompt and ``batch`` prompts of seeded lengths."""
    low, high = batch_lengths
    if not 1 <= low <= high:
        raise Llama3Error(f"batch prompt lengths must satisfy 1 <= min <= max (got {low}..{high})")
    if gen_tokens < 1 or batch_gen_tokens < 1:
        raise Llama3Error("--gen-tokens and --batch-gen-tokens must be >= 1")
    rng = random.Random(seed)
    lengths = [rng.randint(low, high) for _ in range(batch)]
    return Workloads(
        prompt=prompt_ids(tokenizer, prompt_tokens, seed),
        gen_tokens=gen_tokens,
        batch_prompts=[prompt_ids(tokenizer, n, seed + 1 + i) for i, n in enumerate(lengths)],
        batch_gen_tokens=batch_gen_tokens,
        forbidden=sorted(tokenizer.stop_tokens),
    )


def peak_rss_mb() -> float:
    """This process's own peak resident set size so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``, which a process started by fork + exec inherits
    from its parent as a floor (a benchmark launched by a 500 MB parent would report >= 500 MB). Elsewhere
    ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every run."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def time_decode(llm, workloads: Workloads) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, generated ids) of the decode workload, stepping the decoding core:
    the first step is the prompt's forward plus the first token, the later ones one token each."""
    from .sampling import SamplingParams
    from .sequence import GenerationSpec

    params = SamplingParams(temperature=0, logit_bias={t: FORBID for t in workloads.forbidden})
    seq = llm.sequence(GenerationSpec(workloads.prompt, workloads.gen_tokens, params))
    llm.scheduler.add(seq)
    start = time.perf_counter()
    llm.scheduler.step()
    first = time.perf_counter()
    while not seq.done:
        llm.scheduler.step()
    end = time.perf_counter()
    if len(seq.generated) != workloads.gen_tokens:
        raise Llama3Error(f"decode generated {len(seq.generated)} tokens, expected {workloads.gen_tokens}")
    return first - start, end - first, seq.generated


def time_batched(llm, workloads: Workloads) -> tuple[float, int]:
    """(seconds, generated tokens) of one ``Llama.generate`` call over every batch prompt, greedy."""
    bias = {t: FORBID for t in workloads.forbidden}
    start = time.perf_counter()
    out, _ = llm.generate(workloads.batch_prompts, workloads.batch_gen_tokens, temperature=0, logit_bias=bias)
    seconds = time.perf_counter() - start
    total = sum(len(t) for t in out)
    if total != len(workloads.batch_prompts) * workloads.batch_gen_tokens:
        raise Llama3Error(f"batched run generated {total} tokens, expected every row to reach its budget")
    return seconds, total


def time_chat_turn(llm, history_tokens: int, repeat: int, seed: int = 0) -> dict[str, Any]:
    """Time to the first token of the 8th turn of a chat with about ``history_tokens`` tokens of history: with
    the 7th turn's prompt in the prefix cache (as after answering it), and cold. Runs in its own front end
    (one 2048-position slot) over the same weights."""
    from .generation import Llama
    from .sampling import SamplingParams
    from .sequence import GenerationSpec

    tok = llm.tokenizer
    for sentences in range(1, 64):  # the shortest seven turns that reach the history length
        rng = random.Random(seed)
        dialog: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(7):
            dialog += [{"role": "user", "content": english_text(rng, 2) + " What happened next?"},
                       {"role": "assistant", "content": english_text(rng, sentences)}]
        if len(tok.encode_dialog_prompt(dialog, add_generation_prompt=False)) >= history_tokens:
            break
    previous = tok.encode_dialog_prompt(dialog[:-1])  # the 7th turn's prompt, as it was prefilled
    turn = tok.encode_dialog_prompt([*dialog, {"role": "user", "content": "And then?"}])
    greedy = SamplingParams(temperature=0)
    context = min(2048, llm.model.config.max_seq_len)
    if len(turn) >= context:
        raise Llama3Error(f"the chat workload needs {len(turn) + 1} positions, the model has {context}")
    timings: dict[bool, list[float]] = {True: [], False: []}
    reused = 0
    for cache in (True, False):
        chat = Llama(llm.model, tok, context, 1, prefix_cache=cache)
        for _ in range(repeat + 1):  # the first run warms up
            if cache:
                chat.run([GenerationSpec(previous, 1, greedy)])
            before = chat.scheduler.stats()["prefix_cache_tokens"]
            start = time.perf_counter()
            chat.run([GenerationSpec(turn, 1, greedy)])
            timings[cache].append(time.perf_counter() - start)
            reused = max(reused, chat.scheduler.stats()["prefix_cache_tokens"] - before)
    llm.scheduler.claim()  # the chat front ends used the model's KV cache: take it back
    warm, cold = summary(timings[True][1:]), summary(timings[False][1:])
    return {"history_tokens": len(previous), "prompt_tokens": len(turn), "reused_tokens": reused,
            "warm_s": warm, "cold_s": cold, "speedup": cold["median"] / warm["median"]}


def measure(llm, workloads: Workloads, repeat: int, warmup: int, log=None, chat_history: int = 0) -> dict[str, Any]:
    """Run the workloads on a loaded ``Llama`` (built with max_batch_size 1) and return the figures; with
    ``chat_history``, also the chat-turn time to first token with the prefix cache on and off."""
    from .generation import Llama

    say = log or (lambda msg: None)
    # Every timed workload runs cold, as the peers' do (llama.cpp is reset between runs): no prefix reuse.
    llm.scheduler.prefix_cache = False
    prefill, decode, tokens = [], [], []
    for i in range(warmup + repeat):
        pre_s, dec_s, tokens = time_decode(llm, workloads)
        if i >= warmup:
            prefill.append(len(workloads.prompt) / pre_s)
            decode.append((len(tokens) - 1) / dec_s if len(tokens) > 1 else 0.0)
            say(f"  decode run {i - warmup + 1}: prefill {prefill[-1]:.1f} tok/s, decode {decode[-1]:.1f} tok/s")
    result: dict[str, Any] = {
        "prefill_tok_s": summary(prefill),
        "decode_tok_s": summary(decode),
        "decode_tokens": tokens,
        "peak_rss_mb_single": peak_rss_mb(),
    }
    if workloads.batch_prompts:
        # A second front end over the same weights: the batch needs a KV cache with a row per prompt.
        batched_llm = Llama(llm.model, llm.tokenizer, llm.max_seq_len, len(workloads.batch_prompts), prefix_cache=False)
        rates = []
        for i in range(warmup + repeat):
            seconds, total = time_batched(batched_llm, workloads)
            if i >= warmup:
                rates.append(total / seconds)
                say(f"  batched run {i - warmup + 1}: {rates[-1]:.1f} tok/s ({total} tokens in {seconds:.2f} s)")
        result["batched_tok_s"] = summary(rates)
        result["batched_tokens"] = total
        llm.model.setup_cache(1, llm.max_seq_len)  # give the batch's cache back; llm stays usable
        llm.scheduler = type(llm.scheduler)(llm.model, max_batch_size=1, max_seq_len=llm.max_seq_len,
                                            prefix_cache=False)
    result["peak_rss_mb"] = peak_rss_mb()
    if chat_history:
        result["chat_ttft"] = chat = time_chat_turn(llm, chat_history, repeat)
        say(f"  chat turn 8: first token {chat['warm_s']['median']:.3f} s with the history cached, "
            f"{chat['cold_s']['median']:.3f} s cold")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, max_seq_len=512)
    group = parser.add_argument_group("workloads")
    group.add_argument("--prompt-tokens", type=int, default=256, help="decode/prefill prompt length (default %(default)s)")
    group.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens after it (default %(default)s)")
    group.add_argument("--batch", type=int, default=32, help="prompts in the batched workload, 0 = skip it (default %(default)s)")
    group.add_argument("--batch-min", type=int, default=100, help="shortest batch prompt (default %(default)s)")
    group.add_argument("--batch-max", type=int, default=400, help="longest batch prompt (default %(default)s)")
    group.add_argument("--batch-gen-tokens", type=int, default=32, help="greedy tokens per batch row (default %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed of the prompt texts and lengths (default %(default)s)")
    group.add_argument("--prompts", default=None, help="read the workloads (token ids) from this JSON file instead, as benchmarks/compare.py writes it")
    group.add_argument("--repeat", type=int, default=3, help="timed runs of each workload; the median is reported (default %(default)s)")
    group.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    group.add_argument("--chat-history", type=int, default=1500,
                       help="time to the first token of a chat's 8th turn with this many tokens of history, prefix "
                       "cache on and off; 0 = skip it (default %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.repeat < 1 or args.warmup < 0:
        raise Llama3Error("--repeat must be >= 1 and --warmup >= 0")
    if args.batch < 0:
        raise Llama3Error(f"--batch must be >= 0 (got {args.batch})")
    from .generation import Llama  # noqa: F401 -- imported before the baseline so that it counts in it

    args.max_batch_size = 1  # the batch gets its own front end (and KV cache) in measure()
    baseline = peak_rss_mb()  # the interpreter, torch and this package, before any model
    llm = build_llm(args, announce=False)  # the report below gives the load time
    if args.prompts:
        workloads = Workloads.load(args.prompts)
    else:
        workloads = make_workloads(
            llm.tokenizer, args.prompt_tokens, args.gen_tokens, args.batch, (args.batch_min, args.batch_max),
            args.batch_gen_tokens, args.seed,
        )  # fmt: skip
    if workloads.context > llm.max_seq_len:
        raise Llama3Error(
            f"the workloads need {workloads.context} positions but --max-seq-len is {llm.max_seq_len}; raise it"
        )
    threads = torch.get_num_threads()
    model = args.model or "default model (SmolLM2-135M-Instruct)"
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"llama3 bench: {model} on {llm.device}, {threads} threads, {args.warmup} warm-up + {args.repeat} runs")
    kernels = kernel_path(llm)
    log(f"kernels: {kernels}")
    figures = measure(llm, workloads, args.repeat, args.warmup, log, chat_history=args.chat_history)
    result = {
        "engine": "llama3",
        "model": str(args.model) if args.model else "default",
        "device": str(llm.device),
        "threads": threads,
        "quantized": not args.no_quant,
        "kernels": kernels,
        "load_s": llm.load_seconds,
        "baseline_rss_mb": baseline,
        "workload": {
            "prompt_tokens": len(workloads.prompt), "gen_tokens": workloads.gen_tokens,
            "batch": len(workloads.batch_prompts), "batch_prompt_tokens": [len(p) for p in workloads.batch_prompts],
            "batch_gen_tokens": workloads.batch_gen_tokens,
        },
        **figures,
    }  # fmt: skip
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def kernel_path(llm) -> str:
    """Which kernels this model runs: the CPU level (``llama3.quant.cpu``) on CPU, else the device."""
    from .compiled import CompiledDecode

    kernel = llm.model.decode_kernel
    decode = (f"decode compiled (torch.compile, mode {kernel.mode})" if isinstance(kernel, CompiledDecode)
              else "fused decode kernel" if kernel is not None else "decode through the torch layers")
    if llm.device.type != "cpu":
        return f"{llm.device.type}: torch, {llm.model.norm.weight.dtype}; {decode}"
    from .quant import cpu
    from .quant.modules import QuantLinear

    if not any(isinstance(m, QuantLinear) and m.native for m in llm.model.modules()):
        return f"{cpu.current().describe()}; no quantized matrices: torch's float path; {decode}"
    return f"{cpu.current().describe()}; {decode}"


def format_report(result: dict[str, Any]) -> str:
    """The human-readable figures of one ``llama3 bench`` run."""

    def rate(key: str) -> str:
        s = result[key]
        return f"{s['median']:9.1f} tok/s  [{s['min']:.1f} - {s['max']:.1f}]"

    w = result["workload"]
    lines = [
        f"load           {result['load_s']:9.2f} s",
        f"prefill        {rate('prefill_tok_s')}  ({w['prompt_tokens']}-token prompt)",
        f"decode         {rate('decode_tok_s')}  ({w['gen_tokens']} new tokens, prefill excluded)",
    ]
    if "batched_tok_s" in result:
        lengths = w["batch_prompt_tokens"]
        lines.append(
            f"batched        {rate('batched_tok_s')}  ({w['batch']} prompts of {min(lengths)}-{max(lengths)} tokens, "
            f"{w['batch_gen_tokens']} new tokens each, end to end)"
        )
    lines.append(
        f"peak RSS       {result['peak_rss_mb_single']:9.1f} MiB single stream "
        f"({result['peak_rss_mb_single'] - result['baseline_rss_mb']:.1f} MiB above the imports)"
    )
    if "batched_tok_s" in result:
        lines.append(f"               {result['peak_rss_mb']:9.1f} MiB with the batch's KV cache")
    if "chat_ttft" in result:
        c = result["chat_ttft"]
        lines.append(
            f"chat turn 8     {c['warm_s']['median']:8.3f} s to the first token with the prefix cache "
            f"({c['reused_tokens']} of {c['prompt_tokens']} prompt tokens reused), {c['cold_s']['median']:.3f} s "
            f"cold: {c['speedup']:.1f}x"
        )
    return "\n".join(lines)
