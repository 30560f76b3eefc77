"""Per-token mask time of the grammar engines, on this CPU, for a 49k (SmolLM2) and a 128k (Llama 3) vocabulary.

    python benchmarks/grammar_masks.py [--repeat 5]

For each vocabulary and grammar, a valid output is tokenized and fed token by token; before each token the
engine computes the mask of allowed next tokens, and that call is timed. Printed: median and p99 per token and
the grammar's compile time, for llguidance (what ``llama3.constraints.grammar`` uses, through the same
tokenizer adapter) and, when installed, xgrammar (``pip install -c constraints.txt xgrammar``: it pulls
transformers and triton, which is why it is not a dependency). Both run single-threaded here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llguidance  # noqa: E402

from llama3.assets import default_model_path, llama3_tokenizer_json, llama3_tokenizer_model  # noqa: E402
from llama3.constraints.grammar import JSON_STYLE, grammar_tokenizer  # noqa: E402
from llama3.tokenizer import load_tokenizer  # noqa: E402

PRODUCT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "price": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "size": {"type": "object", "properties": {"w": {"type": "integer"}, "h": {"type": "integer"}},
                 "required": ["w", "h"], "additionalProperties": False},
        "in_stock": {"type": "boolean"},
    },
    "required": ["name", "price", "tags", "size", "in_stock"],
    "additionalProperties": False,
}
PRODUCT_TEXT = json.dumps({"name": "Blue ceramic mug with a long handle, 350 ml", "price": 12.5,
                           "tags": ["kitchen", "mug", "blue", "gift idea"], "size": {"w": 9, "h": 11},
                           "in_stock": True})
CASES = {
    "json_schema (product)": ("schema", PRODUCT, PRODUCT_TEXT),
    "json_object": ("schema", {"type": "object"}, json.dumps({"answer": "yes", "score": [1, 2, 3], "note": None})),
    "regex (phone)": ("regex", r"\(\d{3}\) \d{3}-\d{4}", "(555) 867-5309"),
}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def time_llguidance(tokenizer, kind: str, body, ids: list[int], repeat: int) -> tuple[list[float], float]:
    lltok = grammar_tokenizer(tokenizer)
    start = time.perf_counter()
    if kind == "schema":
        spec = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(body), defaults=JSON_STYLE)
    else:
        spec = llguidance.LLMatcher.grammar_from_regex(body)
    matcher = llguidance.LLMatcher(lltok, spec, log_level=0)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        matcher.reset()
        for token in ids:
            t = time.perf_counter()
            matcher.compute_bitmask()
            times.append(time.perf_counter() - t)
            if not matcher.consume_token(token):
                raise SystemExit(f"llguidance refused token {token}: {matcher.get_error()}")
    return times, compile_s


def time_xgrammar(hf_tokenizer, kind: str, body, ids: list[int], repeat: int) -> tuple[list[float], float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=len(hf_tokenizer))
    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    if kind == "schema":
        compiled = compiler.compile_json_schema(json.dumps(body), any_whitespace=False, separators=(", ", ": "))
    else:
        compiled = compiler.compile_regex(body)
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for _ in range(repeat):
        matcher = xgr.GrammarMatcher(compiled)
        for token in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t)
            if not matcher.accept_token(token):
                raise SystemExit(f"xgrammar refused token {token}")
    return times, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="passes over each output (default 5)")
    args = parser.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import torch
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(1)
    smol = load_tokenizer(default_model_path())
    llama = load_tokenizer(llama3_tokenizer_model())
    vocabularies = [
        ("SmolLM2 (49,152)", smol, PreTrainedTokenizerFast(tokenizer_object=smol._backend)),
        ("Llama 3 (128,256)", llama, PreTrainedTokenizerFast(tokenizer_file=str(llama3_tokenizer_json()))),
    ]
    print(f"# grammar mask time per token, {platform.processor() or platform.machine()}, 1 thread, "
          f"llguidance {getattr(llguidance, '__version__', '')}")
    print("| vocabulary | grammar | tokens | llguidance median / p99 (us) | compile (ms) | xgrammar median / p99 (us) | compile (ms) |")
    print("|---|---|---|---|---|---|---|")
    for vocab_name, tokenizer, hf in vocabularies:
        for case, (kind, body, text) in CASES.items():
            ids = tokenizer.encode(text, bos=False, eos=False)
            ll, ll_compile = time_llguidance(tokenizer, kind, body, ids, args.repeat)
            xg = time_xgrammar(hf, kind, body, ids, args.repeat)
            xg_cells = (f"{statistics.median(xg[0]) * 1e6:.0f} / {p99(xg[0]) * 1e6:.0f} | {xg[1] * 1e3:.1f}"
                        if xg else "not installed | -")
            print(f"| {vocab_name} | {case} | {len(ids)} | {statistics.median(ll) * 1e6:.0f} / {p99(ll) * 1e6:.0f} | "
                  f"{ll_compile * 1e3:.1f} | {xg_cells} |")


if __name__ == "__main__":
    main()
