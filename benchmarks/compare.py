"""Issue 5's workloads through this engine, llama-cpp-python and transformers, in one run, as ratios.

    python benchmarks/compare.py                          # every installed engine, 2 threads, median of 3
    python benchmarks/compare.py --repeat 5 --out bench-results.json
    python benchmarks/compare.py --engines llama3 transformers --prompt-tokens 32 --gen-tokens 8 --batch 4 \
        --batch-min 16 --batch-max 48 --batch-gen-tokens 4 --repeat 1 --warmup 0     # a quick smoke run

The prompts are built once as token ids with our tokenizer and the same ids go to every engine. Each engine
runs in its own subprocess (``--worker ENGINE``; ours is ``python -m llama3 bench --prompts FILE``) so peak
RSS is per engine and imports don't interfere. Cold start is timed from process spawn to the first byte of
stdout of a program that loads the model and prints one greedy token (``llama3 complete`` for ours). Nothing
is installed here: an engine that is not installed is skipped with a message.

Ratios read "x > 1: ours is better": throughput ours / peer, times and memory peer / ours.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINES = ("llama3", "llama.cpp", "transformers")
PEERS = ENGINES[1:]
MODULES = {"llama3": "llama3", "llama.cpp": "llama_cpp", "transformers": "transformers"}
DISTS = {"llama3": "llama3", "llama.cpp": "llama-cpp-python", "transformers": "transformers"}
COLD_TEXT = "The capital of France is"
AGREE_TOKENS = 32  # greedy tokens of the decode workload compared across engines
# (metric, label, higher is better, unit)
METRICS = (
    ("load_s", "load", False, "s"),
    ("prefill_tok_s", "prefill", True, "tok/s"),
    ("decode_tok_s", "decode", True, "tok/s"),
    ("batched_tok_s", "batched", True, "tok/s"),
    ("cold_start_s", "cold start to 1st token", False, "s"),
    ("peak_rss_mb_single", "peak RSS (decode)", False, "MiB"),
    ("model_rss_mb", "  of which above imports", False, "MiB"),
    ("peak_rss_mb", "peak RSS (with batch)", False, "MiB"),
)
# Issue 5's ratio targets: (metric, peer, least ratio ours/peer).
RATIO_TARGETS = (
    ("decode_tok_s", "llama.cpp", 1.0),
    ("decode_tok_s", "transformers", 4.0),
    ("prefill_tok_s", "llama.cpp", 1.5),
    ("batched_tok_s", "llama.cpp", 3.0),
    ("batched_tok_s", "transformers", 2.0),
)
COLD_START_LIMIT_S = 3.0
MEMORY_LIMIT_FILE_SIZES = 2.0


# -- figures -------------------------------------------------------------------------------------------------


def median_of(value: Any) -> float | None:
    """A metric's median: summaries are {"median": ...}, single measurements plain numbers."""
    if isinstance(value, dict):
        return value.get("median")
    return value


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def advantage(ours: float | None, peer: float | None, higher_better: bool) -> float | None:
    """How many times better ours is: ours/peer for throughput, peer/ours for times and memory."""
    if not ours or not peer:
        return None
    return ours / peer if higher_better else peer / ours


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token among the first ``AGREE_TOKENS``; None when they all agree."""
    a, b = a[:AGREE_TOKENS], b[:AGREE_TOKENS]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def add_derived(engines: dict[str, dict[str, Any]]) -> None:
    """``model_rss_mb``: the single-stream peak RSS less the worker's RSS after its imports (what the model,
    its caches and the run cost, without the interpreter and the engine's libraries)."""
    for figures in engines.values():
        if "peak_rss_mb_single" in figures and "baseline_rss_mb" in figures:
            figures["model_rss_mb"] = figures["peak_rss_mb_single"] - figures["baseline_rss_mb"]


def evaluate(engines: dict[str, dict[str, Any]], gguf_bytes: int) -> dict[str, Any]:
    """Ratios of ours vs each peer, the issue's targets (met or not; None when a figure is missing) and the
    greedy-token agreement."""
    ours = engines.get("llama3", {})
    ratios = {
        peer: {
            key: advantage(median_of(ours.get(key)), median_of(engines.get(peer, {}).get(key)), higher)
            for key, _, higher, _ in METRICS
        }
        for peer in PEERS
    }
    targets = []
    for key, peer, least in RATIO_TARGETS:
        ratio = ratios[peer][key]
        targets.append({"target": f"{key} >= {least:g}x {peer}", "value": ratio, "met": None if ratio is None else ratio >= least})
    cold = median_of(ours.get("cold_start_s"))
    targets.append({"target": f"cold_start_s <= {COLD_START_LIMIT_S:g}", "value": cold,
                    "met": None if cold is None else cold <= COLD_START_LIMIT_S})  # fmt: skip
    peak = ours.get("peak_rss_mb_single")
    limit_mb = MEMORY_LIMIT_FILE_SIZES * gguf_bytes / 2**20
    targets.append({"target": f"peak_rss_mb_single <= {MEMORY_LIMIT_FILE_SIZES:g} x GGUF file ({limit_mb:.0f} MiB)",
                    "value": peak, "met": None if peak is None else peak <= limit_mb})  # fmt: skip
    agreement = {}
    for peer in PEERS:
        theirs = engines.get(peer, {}).get("decode_tokens")
        if ours.get("decode_tokens") and theirs:
            agreement[peer] = {"first_divergence": first_divergence(ours["decode_tokens"], theirs), "compared": AGREE_TOKENS}
    return {"ratios": ratios, "targets": targets, "agreement": agreement}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.1f}"


def format_table(engines: dict[str, dict[str, Any]], verdict: dict[str, Any]) -> str:
    """Each metric per engine (median), ours vs each peer, then the targets and the token agreement."""
    present = [e for e in ENGINES if e in engines and "error" not in engines[e] and "skipped" not in engines[e]]
    peers = [p for p in PEERS if p in present]
    header = ["metric"] + present + [f"vs {p}" for p in peers]
    rows = [header]
    for key, label, _, unit in METRICS:
        values = [median_of(engines[e].get(key)) for e in present]
        if all(v is None for v in values):
            continue
        ratios = [verdict["ratios"][p][key] for p in peers]
        rows.append([f"{label} ({unit})"] + [_fmt(v, unit) for v in values] + ["-" if r is None else f"{r:.2f}x" for r in ratios])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("targets (ratios: x > 1 means ours is better):")
    for t in verdict["targets"]:
        mark = {True: "met", False: "NOT MET", None: "n/a (figure missing)"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  {t['target']:<58} {value:>8}  {mark}")
    for peer, a in verdict["agreement"].items():
        where = a["first_divergence"]
        said = "identical" if where is None else f"first divergence at token {where}"
        lines.append(f"greedy tokens, llama3 vs {peer} (first {a['compared']}): {said}")
    for name in ENGINES:
        for key in ("skipped", "error", "cold_start_error"):
            if key in engines.get(name, {}):
                lines.append(f"{name}: {engines[name][key]}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, dist in (("torch", "torch"), *((e, DISTS[e]) for e in ENGINES)):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


# -- orchestration ---------------------------------------------------------------------------------------------


def installed(engine: str) -> bool:
    return importlib.util.find_spec(MODULES[engine]) is not None


def run_worker(engine: str, args: argparse.Namespace, workloads: Path, result: Path) -> dict[str, Any]:
    """One engine's throughput and memory figures, measured in a fresh subprocess."""
    common = ["--model", str(args.model), "--threads", str(args.threads), "--repeat", str(args.repeat),
              "--warmup", str(args.warmup)]  # fmt: skip
    if engine == "llama3":
        cmd = [sys.executable, "-m", "llama3", "bench", "--prompts", str(workloads), "--json", str(result),
               "--max-seq-len", str(args.context), *common]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--worker", engine, "--workloads", str(workloads), "--result", str(result),
               "--context", str(args.context), *common]  # fmt: skip
    print(f"== {engine}: {' '.join(cmd[1:4])} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False, stdout=sys.stderr, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0 or not result.exists():
        return {"error": f"worker failed (exit {done.returncode}); see its output above"}
    return json.loads(result.read_text())


def cold_start_command(engine: str, args: argparse.Namespace) -> list[str]:
    if engine == "llama3":
        return [sys.executable, "-m", "llama3", "complete", COLD_TEXT, "-n", "1", "-t", "0", "--no-stats",
                "--threads", str(args.threads), "--model", str(args.model)]  # fmt: skip
    return [sys.executable, __file__, "--first-token", engine, "--model", str(args.model), "--threads", str(args.threads)]


def time_to_first_byte(cmd: list[str]) -> tuple[float, float | None]:
    """(seconds from spawn to the first byte on stdout, the child's peak RSS in MiB up to then, if readable)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    peak = hwm_mb(proc.pid)  # read while it still runs: once reaped, only the inherited ru_maxrss is left
    proc.stdout.read()
    proc.wait()
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode} without output")
    return elapsed, peak


def measure_cold_start(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = cold_start_command(engine, args)
    warmup = max(1, args.warmup)  # always one untimed run: page cache, anything built on first use
    print(f"== {engine}: cold start, {warmup} untimed + {args.repeat} timed", file=sys.stderr, flush=True)
    times, peaks = [], []
    try:
        for i in range(warmup + args.repeat):
            seconds, peak = time_to_first_byte(cmd)
            if i >= warmup:
                times.append(seconds)
                peaks.append(peak)
    except RuntimeError as exc:
        return {"cold_start_error": str(exc)}
    known = [p for p in peaks if p is not None]
    return {"cold_start_s": summary(times), "cold_start_peak_rss_mb": max(known) if known else None}


def orchestrate(args: argparse.Namespace) -> int:
    from llama3.assets import default_model_path
    from llama3.bench import make_workloads
    from llama3.tokenizer import load_tokenizer

    args.model = Path(args.model) if args.model else default_model_path()
    tokenizer = load_tokenizer(args.model)
    workloads = make_workloads(tokenizer, args.prompt_tokens, args.gen_tokens, args.batch,
                               (args.batch_min, args.batch_max), args.batch_gen_tokens, args.seed)  # fmt: skip
    args.context = workloads.context
    engines: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="llama3-compare-") as tmp:
        path = Path(tmp) / "workloads.json"
        workloads.save(path)
        for engine in args.engines:
            if not installed(engine):
                msg = f"skipped: {DISTS[engine]} is not installed (pip install {DISTS[engine]})"
                print(f"== {engine}: {msg}", file=sys.stderr)
                engines[engine] = {"skipped": msg}
                continue
            # Cold start first: its untimed run also fills the page cache (and builds anything built on first
            # use), so the worker's load time is a warm one for every engine.
            cold = {} if args.no_cold_start else measure_cold_start(engine, args)
            engines[engine] = {**run_worker(engine, args, path, Path(tmp) / f"{engine}.json"), **cold}
    add_derived(engines)
    verdict = evaluate(engines, args.model.stat().st_size)
    info = machine_info()
    settings = {
        "model": str(args.model), "gguf_bytes": args.model.stat().st_size, "threads": args.threads,
        "repeat": args.repeat, "warmup": args.warmup, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens, "batch": args.batch, "batch_prompt_tokens": [len(p) for p in workloads.batch_prompts],
        "batch_gen_tokens": args.batch_gen_tokens, "seed": args.seed,
    }  # fmt: skip
    print(f"\n{info['date']}  {info['cpu']} ({info['usable_cores']} usable of {info['cores']} cores)  "
          f"torch {info['versions']['torch']}  llama-cpp-python {info['versions']['llama.cpp']}  "
          f"transformers {info['versions']['transformers']}")  # fmt: skip
    print(f"{args.model.name}, {args.threads} threads, median of {args.repeat} runs after {args.warmup} warm-up\n")
    print(format_table(engines, verdict))
    Path(args.out).write_text(json.dumps({"machine": info, "settings": settings, "engines": engines, **verdict}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all("error" not in e and "cold_start_error" not in e for e in engines.values()) else 1


# -- peer workers (each in its own process; they import only their own engine) --------------------------------


def hwm_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size of a live process in MiB (VmHWM), None where /proc cannot tell. Not ru_maxrss: a
    child started by fork + exec inherits its parent's ru_maxrss as a floor (here: this orchestrator's)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak = hwm_mb()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rates(prompt_len: int, start: float, stamps: list[float]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from the start time and the time each new token arrived."""
    prefill = prompt_len / (stamps[0] - start)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return prefill, decode


def _collect(
    w: dict, repeat: int, warmup: int, decode_fn, batched_fn, load_s: float, engine: str, version, baseline: float
) -> dict:
    """Run a peer's decode and batched functions like ``llama3 bench`` does and gather the same figures."""
    prefill, decode, tokens = [], [], []
    for i in range(warmup + repeat):
        start, stamps, tokens = decode_fn(w["prompt"], w["gen_tokens"])
        if len(tokens) != w["gen_tokens"]:
            raise RuntimeError(f"{engine} generated {len(tokens)} tokens, expected {w['gen_tokens']}")
        if i >= warmup:
            p, d = _rates(len(w["prompt"]), start, stamps)
            prefill.append(p)
            decode.append(d)
            print(f"  decode run {i - warmup + 1}: prefill {p:.1f} tok/s, decode {d:.1f} tok/s", file=sys.stderr, flush=True)
    out = {"engine": engine, "version": version, "load_s": load_s, "baseline_rss_mb": baseline, "prefill_tok_s": summary(prefill),
           "decode_tok_s": summary(decode), "decode_tokens": tokens, "peak_rss_mb_single": _peak_rss_mb()}  # fmt: skip
    if w["batch_prompts"]:
        rates = []
        expected = len(w["batch_prompts"]) * w["batch_gen_tokens"]
        for i in range(warmup + repeat):
            start = time.perf_counter()
            total = batched_fn(w["batch_prompts"], w["batch_gen_tokens"])
            seconds = time.perf_counter() - start
            if total != expected:
                raise RuntimeError(f"{engine} batched run generated {total} tokens, expected {expected}")
            if i >= warmup:
                rates.append(total / seconds)
                print(f"  batched run {i - warmup + 1}: {rates[-1]:.1f} tok/s ({total} tokens in {seconds:.2f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
        out["batched_tok_s"] = summary(rates)
        out["batched_tokens"] = expected
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def llamacpp_worker(w: dict, args: argparse.Namespace) -> dict:
    import llama_cpp
    import numpy as np

    baseline = _peak_rss_mb()
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=args.context, n_batch=args.context, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)  # fmt: skip
    load_s = time.perf_counter() - start
    forbidden = np.array(w["forbidden"], dtype=np.int64)

    def forbid(_ids, scores):
        scores[forbidden] = -np.inf
        return scores

    processors = llama_cpp.LogitsProcessorList([forbid])

    def decode(prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
        llm.reset()  # no prefix reuse from the previous run: every run evaluates the whole prompt
        stamps, tokens = [], []
        start = time.perf_counter()
        for token in llm.generate(prompt, temp=0.0, logits_processor=processors):
            stamps.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == n:
                break
        return start, stamps, tokens

    def batched(prompts: list[list[int]], n: int) -> int:
        # One after another: llama-cpp-python's high-level API has no batched generation.
        return sum(len(decode(p, n)[2]) for p in prompts)

    return _collect(w, args.repeat, args.warmup, decode, batched, load_s, "llama.cpp", llama_cpp.__version__, baseline)


def transformers_worker(w: dict, args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.model.parent, gguf_file=args.model.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - start
    pad = w["forbidden"][0]  # any id: padded positions are masked out

    def config(n: int) -> GenerationConfig:
        return GenerationConfig(do_sample=False, max_new_tokens=n, suppress_tokens=w["forbidden"], pad_token_id=pad,
                                eos_token_id=None, bos_token_id=None)  # fmt: skip

    class Clock(BaseStreamer):
        """Notes when each new token arrives (generate first hands the prompt to ``put``)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.tokens: list[int] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.stamps.append(time.perf_counter())
            self.tokens.extend(value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    def decode(prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
        clock = Clock()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config(n), streamer=clock)
        return start, clock.stamps, clock.tokens

    def batched(prompts: list[list[int]], n: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(ids, attention_mask=mask, generation_config=config(n))
        return out[:, width:].numel()

    return _collect(w, args.repeat, args.warmup, decode, batched, load_s, "transformers", transformers.__version__, baseline)


def first_token(engine: str, args: argparse.Namespace) -> None:
    """Load ``engine`` as its users do, greedily complete COLD_TEXT by one token and print it (cold start)."""
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)  # fmt: skip
        text = llm.create_completion(COLD_TEXT, max_tokens=1, temperature=0.0)["choices"][0]["text"]
    else:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        torch.set_num_threads(args.threads)
        tok = AutoTokenizer.from_pretrained(args.model.parent, gguf_file=args.model.name)
        model = LlamaForCausalLM.from_pretrained(args.model.parent, gguf_file=args.model.name, dtype=torch.float32)
        enc = tok(COLD_TEXT, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=1, do_sample=False)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    print(text or "\n", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="engines to run (default all)")
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per workload; medians reported (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-min", type=int, default=100)
    ap.add_argument("--batch-max", type=int, default=400)
    ap.add_argument("--batch-gen-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt texts and batch lengths")
    ap.add_argument("--no-cold-start", action="store_true", help="skip the cold-start measurement")
    ap.add_argument("--out", default="bench-results.json", help="JSON results file (default %(default)s)")
    # Internal modes, run by the orchestrator in child processes.
    ap.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--workloads", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--first-token", choices=PEERS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--repeat and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.first_token:
        args.model = Path(args.model)
        first_token(args.first_token, args)
        return 0
    if args.worker:
        args.model = Path(args.model)
        w = json.loads(Path(args.workloads).read_text())
        worker = llamacpp_worker if args.worker == "llama.cpp" else transformers_worker
        Path(args.result).write_text(json.dumps(worker(w, args)))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
