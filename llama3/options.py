"""Command-line options shared by the ``llama3`` commands and the server: which model, where, how to load it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .constraints.grammar import Grammar
from .errors import Llama3Error

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, *, max_seq_len: int = 2048, max_batch_size: int = 1,
                        many_adapters: bool = False) -> None:
    """Options shared by every command that loads a model (``many_adapters``: ``--lora NAME=DIR`` repeatable)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None, help="a .gguf file, a Hugging Face dir or a Meta dir (default: SmolLM2-135M-Instruct)")
    group.add_argument("--tokenizer", default=None, help="tokenizer file or dir (default: found in the checkpoint)")
    group.add_argument("--max-seq-len", "--ctx-size", dest="max_seq_len", type=int, default=None,
                       help=f"context length to allocate, prompt + output (default: {max_seq_len} or the model's "
                       "context length, whichever is smaller)")
    parser.set_defaults(default_max_seq_len=max_seq_len)
    group.add_argument("--max-batch-size", type=int, default=max_batch_size, help=argparse.SUPPRESS if max_batch_size == 1 else "rows decoded together (default %(default)s)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="activation/weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--no-quant", action="store_true", help="expand quantized GGUF weights to --dtype (exact float path; slower, more memory)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    group.add_argument("--compile", action="store_true",
                       help="decode steps as one torch.compile'd graph (CUDA graphs on a GPU; compiles on first use; "
                       "quantized CPU models keep their own faster kernel)")
    group.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                       help="speculative decoding: up to N draft tokens per step copied from the context, verified "
                       "in the same step; same output, fewer steps where answers copy their prompt (default 0 = off)")
    if many_adapters:
        group.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                           help="serve a LoRA adapter (PEFT directory) as model NAME; repeatable")
    else:
        group.add_argument("--lora", default=None, metavar="DIR", help="a LoRA adapter (PEFT directory) to apply")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_tokens: int | None) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", "-t", type=float, default=0.6, help="0 = greedy (default %(default)s)")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default %(default)s)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    group.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off")
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--max-tokens", "-n", type=int, default=max_tokens, help="most tokens to generate (default: %(default)s; none = fill the context)")
    parser.add_argument("--no-stats", action="store_true", help="do not print load time and tokens/s on stderr")
    constrain = parser.add_argument_group("output constraint (one of)").add_mutually_exclusive_group()
    constrain.add_argument("--json-schema", "-j", default=None, metavar="SCHEMA",
                           help="JSON matching this schema (a file, or the schema itself; '{}' is any JSON object)")
    constrain.add_argument("--grammar", default=None, metavar="GBNF", help="llama.cpp GBNF grammar text")
    constrain.add_argument("--grammar-file", default=None, metavar="FILE", help="llama.cpp GBNF grammar file")
    constrain.add_argument("--regex", default=None, help="a regular expression the whole output matches")


def output_grammar(args: argparse.Namespace) -> Grammar | None:
    """The ``Grammar`` the constraint options ask for, or None (``Llama3Error`` naming a bad file or value)."""
    if getattr(args, "json_schema", None) is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "true", "false")):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as exc:
                raise Llama3Error(f"--json-schema {args.json_schema}: {exc.strerror or exc}") from None
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Llama3Error(f"--json-schema is not valid JSON: {exc}") from None
        return Grammar.json_object() if schema == {} else Grammar.json_schema(schema)
    if getattr(args, "grammar_file", None) is not None:
        try:
            return Grammar.gbnf(Path(args.grammar_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise Llama3Error(f"--grammar-file {args.grammar_file}: {exc.strerror or exc}") from None
    if getattr(args, "grammar", None) is not None:
        return Grammar.gbnf(args.grammar)
    if getattr(args, "regex", None) is not None:
        return Grammar.regex(args.regex)
    return None


def apply_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU thread count (None: torch's choice)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise Llama3Error(f"--threads must be >= 1 (got {threads})")
        torch.set_num_threads(threads)


def parse_device(text: str | None):
    """``--device`` as a ``torch.device`` (None: the default), or ``Llama3Error`` for a bad or absent device."""
    import torch

    try:
        device = torch.device(text) if text else None
    except RuntimeError as exc:
        raise Llama3Error(f"invalid --device {text!r}: {exc}") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise Llama3Error(f"--device {text}: CUDA is not available on this machine")
    return device


def build_llm(args: argparse.Namespace, *, announce: bool = True):
    """``Llama.build`` from the model options (one-line ``Llama3Error`` for unusable values)."""
    import torch

    from .generation import Llama

    apply_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    device = parse_device(args.device)
    llm = Llama.build(
        args.model, args.tokenizer, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
        device=device, dtype=dtype, quantize=None if args.no_quant else "auto",
        default_max_seq_len=args.default_max_seq_len, lora=args.lora if isinstance(args.lora, str) else None,
        prompt_lookup=args.prompt_lookup, compile=args.compile,
    )  # fmt: skip
    if announce and not getattr(args, "no_stats", False):
        name = args.model or "default model (SmolLM2-135M-Instruct)"
        print(f"Loaded {name} in {llm.load_seconds:.2f} seconds on {llm.device}", file=sys.stderr)
    return llm
