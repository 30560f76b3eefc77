"""The ``llama3`` command line: a thin adapter over the library (chat, complete, examples, serve, bench, eval)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import Llama3Error
from .options import add_model_arguments, add_sampling_arguments, build_llm, output_grammar

def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, max_gen_len=args.max_tokens,
        response_format=output_grammar(args),
    )  # fmt: skip


def print_stream(stream, *, stats: bool, out=None) -> str:
    """Print text increments as they come (to ``out``, default the current standard output); Ctrl-C stops
    this answer only. Returns the text shown."""
    out = out if out is not None else sys.stdout
    start = time.perf_counter()
    first_token_at = None
    shown = []
    try:
        for chunk in stream:
            if first_token_at is None and stream.generated_tokens:
                first_token_at = time.perf_counter()
            out.write(chunk)
            out.flush()
            shown.append(chunk)
    except KeyboardInterrupt:
        stream.close()
        out.write(" [interrupted]")
    out.write("\n")
    out.flush()
    end = time.perf_counter()
    if stats:
        n = stream.generated_tokens
        first = first_token_at or end
        rate = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        print(
            f"[{n} tokens; first token {first - start:.2f} s; decode {rate:.1f} tok/s; "
            f"finish: {stream.finish_reason or 'interrupted'}]",
            file=sys.stderr,
        )
    return "".join(shown)


def cmd_complete(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)  # first: a bad option fails before the model loads
    llm = build_llm(args)
    prompt = args.prompt if args.prompt != "-" else leader_input(llm, sys.stdin.read)
    stream = llm.stream_completion(prompt, **kwargs)
    if args.echo:
        sys.stdout.write(prompt)
    print_stream(stream, stats=not args.no_stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)
    llm = build_llm(args)
    rag = _open_rag(args, llm) if args.rag else None
    system = [{"role": "system", "content": args.system}] if args.system and rag is None else []
    dialog: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty() and not is_follower()
    if interactive:
        print("Chat with the model. /reset clears the conversation, /exit quits.", file=sys.stderr)

    def read_line() -> str | None:
        try:
            return input("> " if interactive else "")
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return None

    while True:
        line = leader_input(llm, read_line)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            dialog = list(system)
            print("[conversation cleared]", file=sys.stderr)
            continue
        sources = []
        try:
            if rag is None:
                stream = llm.stream_chat([*dialog, {"role": "user", "content": line}], **kwargs)
            else:
                sources, turn = rag(line, dialog)
                stream = llm.stream_chat(turn, **kwargs)
        except Llama3Error as exc:  # e.g. the conversation outgrew the context: say so and let the user /reset
            print(f"error: {exc}", file=sys.stderr)
            continue
        answer = print_stream(stream, stats=not args.no_stats)
        # The history keeps the plain question, not the sources: each turn retrieves its own.
        dialog += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        for n, hit in enumerate(sources, 1):
            print(f"  [{n}] {hit.where}")
    if rag is not None:
        rag.close()
    return 0


def _open_rag(args: argparse.Namespace, llm):
    """``chat --rag DB``: a function (question, history) -> (sources, dialog) over the store, with ``close``."""
    from .rag.answer import fit_sources, rag_dialog, retrieve
    from .rag.cli import open_store

    if args.rag_k < 1:
        raise Llama3Error(f"--rag-k must be >= 1 (got {args.rag_k})")
    store, embedder, _ = open_store(args.rag, args, llm, create=False)
    budget = llm.max_seq_len - (args.max_tokens or 256)

    def turn(question: str, history: list[dict[str, str]]):
        hits = retrieve(store, embedder, question, k=args.rag_k, min_score=args.rag_min_score)
        kept, _ = fit_sources(llm.tokenizer, question, hits, budget, history)
        return kept, rag_dialog(question, kept, history)

    turn.close = store.close  # type: ignore[attr-defined]
    return turn


def is_follower() -> bool:
    """A rank other than 0 of a tensor-parallel job (torchrun): it computes its share and stays silent."""
    from .parallel.world import launched_size

    return launched_size() > 1 and os.environ.get("RANK", "0") != "0"


def leader_input(llm, read):
    """``read()`` on rank 0, handed to every rank of a tensor-parallel job (so all run the same request)."""
    world = getattr(llm, "world", None)
    if world is None:
        return read()
    return world.broadcast(read() if world.leader else None)


def cmd_examples(args: argparse.Namespace) -> int:
    from .examples import CHAT_DIALOGS, COMPLETION_PROMPTS

    args.max_batch_size = max(len(CHAT_DIALOGS), len(COMPLETION_PROMPTS))
    llm = build_llm(args)
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for prompt, result in zip(
        COMPLETION_PROMPTS, llm.text_completion(COMPLETION_PROMPTS, max_gen_len=args.max_tokens or 64, **kwargs)
    ):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")
    for dialog, result in zip(CHAT_DIALOGS, llm.chat_completion(CHAT_DIALOGS, max_gen_len=args.max_tokens, **kwargs)):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")
    return 0


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the chosen command's module is imported (the server stack and the
    metrics libraries are slow to import, and cold start matters)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="llama3", description="Run Llama-3-architecture models locally.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="interactive streaming chat (/reset, /exit)")
    add_model_arguments(chat)
    add_sampling_arguments(chat, max_tokens=None)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--rag", default=None, metavar="DB",
                      help="answer every turn from this store (llama3 rag index), citing its sources")
    chat.add_argument("--rag-k", type=int, default=4, metavar="K", help="chunks retrieved per turn with --rag")
    chat.add_argument("--rag-min-score", type=float, default=0.3, metavar="S",
                      help="leave out chunks less similar than this with --rag (cosine)")
    chat.set_defaults(func=cmd_chat)

    complete = sub.add_parser("complete", help="complete a text prompt, streaming")
    complete.add_argument("prompt", help="the prompt ('-' reads standard input)")
    add_model_arguments(complete)
    add_sampling_arguments(complete, max_tokens=128)
    complete.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    complete.set_defaults(func=cmd_complete)

    examples = sub.add_parser("examples", help="Meta's example completions and dialogs, printed in Meta's format")
    add_model_arguments(examples, max_seq_len=512)
    examples.add_argument("--temperature", type=float, default=0.6)
    examples.add_argument("--top-p", type=float, default=0.9)
    examples.add_argument("--seed", type=int, default=None)
    examples.add_argument("--max-tokens", type=int, default=None, help="default: 64 for completions, the context for chats")
    examples.add_argument("--no-stats", action="store_true")
    examples.set_defaults(func=cmd_examples)

    for name, module, helptext in (
        ("serve", "llama3.server", "OpenAI-compatible HTTP server"),
        ("bench", "llama3.bench", "measure load time, prefill, decode and batched throughput"),
    ):
        p = sub.add_parser(name, help=helptext)
        if chosen == name:
            _attach(p, module)

    finetune = sub.add_parser("finetune", help="train a LoRA adapter (SFT or DPO) on a JSONL file")
    export = sub.add_parser("export", help="merge a LoRA adapter into the model and write a Hugging Face directory")
    if chosen in ("finetune", "export"):
        from .finetune import cli as finetune_cli

        finetune_cli.add_arguments(finetune)
        finetune.set_defaults(func=finetune_cli.run)
        finetune_cli.add_export_arguments(export)
        export.set_defaults(func=finetune_cli.run_export)

    rag = sub.add_parser("rag", help="index your files and answer questions from them, with citations")
    if chosen == "rag":
        _attach(rag, "llama3.rag.cli")

    evaluate = sub.add_parser("eval", help="evaluate on a benchmark")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="TASK")
    shop = tasks.add_parser("shopbench", help="ShopBench (Amazon KDD Cup 2024) multi-task shopping questions")
    if chosen == "eval":
        _attach(shop, "llama3.tasks.shopbench.cli")
    return parser


def _attach(parser: argparse.ArgumentParser, module_name: str) -> None:
    """Let ``module_name`` define the command's options (``add_arguments``) and run it (``run``)."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        parser.set_defaults(func=lambda args, exc=exc: _unavailable(module_name, exc))
        return
    module.add_arguments(parser)
    parser.set_defaults(func=module.run)


def _unavailable(module_name: str, exc: ImportError) -> int:
    raise Llama3Error(f"{module_name} is unavailable: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llama3`` command; errors are one line on stderr and a non-zero exit."""
    args = make_parser(argv).parse_args(argv)
    if is_follower():
        # Rank 0 prints, reads standard input, writes reports and serves HTTP; the others only compute.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        args.no_stats = True  # also silences the "Loaded ..." line of commands without --no-stats
        for quiet, value in (("no_progress", True), ("out", None)):
            if hasattr(args, quiet):
                setattr(args, quiet, value)
    try:
        return int(args.func(args) or 0)
    except Llama3Error as exc:
        rank = f" (rank {os.environ['RANK']})" if is_follower() else ""
        print(f"llama3 {args.command}{rank}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OSError as exc:  # unreadable files, ports in use...: the message is the useful part
        print(f"llama3 {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if "llama3.parallel.world" in sys.modules:
            from .parallel.world import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
