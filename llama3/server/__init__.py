"""``llama3 serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching engine.

>>> from openai import OpenAI
>>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
>>> client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], stream=True)

Library use: ``create_app(engine, model_name=...)`` gives the ASGI app; ``add_arguments``/``run`` are the CLI.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import sys
from pathlib import Path

from ..errors import Llama3Error
from ..options import add_model_arguments, build_llm

__all__ = ["add_arguments", "create_app", "run", "serve"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llama3 serve`` (model options named as in the other ``llama3`` commands)."""
    add_model_arguments(parser, max_batch_size=8, many_adapters=True)
    parser.add_argument("--model-name", default=None, help="name the API reports (default: the model file's stem)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    server.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    server.add_argument("--api-key", default=os.environ.get("LLAMA3_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1, /api and /metrics (default: $LLAMA3_API_KEY if set)")
    server.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN call the API from a browser (repeatable; '*' for any; "
                        "default: none)")
    server.add_argument("--max-queue", type=int, default=512,
                        help="sequences that may wait for a free slot, beyond the --max-batch-size generating; "
                        "past that, requests get 429 with Retry-After (default %(default)s, as OLLAMA_MAX_QUEUE)")
    server.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C, stop accepting requests and let running ones finish for this "
                        "long; then end the rest with an error event (default %(default)s)")
    server.add_argument("--seed", type=int, default=None, help="seed source for requests that send no seed")
    embed = parser.add_argument_group("embeddings (/v1/embeddings, /api/embed)")
    embed.add_argument("--embed-model", default=None, metavar="MODEL",
                       help="a dedicated embedding model: 'minilm' (the bundled all-MiniLM-L6-v2) or a "
                       "sentence-transformers directory (default: the served model's pooled hidden states)")
    embed.add_argument("--pooling", choices=("mean", "last"), default="mean",
                       help="how the served model's token states become one vector (default %(default)s)")
    server.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> None:
    """Load the model, then serve until interrupted (Llama3Error for unusable arguments or files)."""
    import uvicorn

    from ..assets import default_model_path
    from ..embedding import load_embedder
    from ..engine import Engine
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("llama3.server")
    if (args.max_batch_size < 1 or args.max_queue < 0 or (args.max_seq_len is not None and args.max_seq_len < 2)
            or not 0 <= args.port < 65536 or not 0 <= args.shutdown_grace < math.inf):
        raise Llama3Error("--max-batch-size must be >= 1, --max-queue >= 0, --max-seq-len >= 2, --port in 0..65535, "
                          "--shutdown-grace a number of seconds >= 0")
    llm = build_llm(args, announce=False)
    world = llm.world
    path = Path(args.model).expanduser() if args.model else default_model_path()
    log.info("loaded %s in %.2f s on %s", path, llm.load_seconds or 0.0, llm.device)
    name = args.model_name or (path.stem if path.is_file() else path.name)
    if world is not None and args.lora:
        raise Llama3Error("--lora is not supported with tensor parallelism yet")
    adapters = load_adapters(llm.model, args.lora, name)
    engine = Engine(llm.model, llm.tokenizer, max_batch_size=args.max_batch_size, max_seq_len=llm.max_seq_len,
                    max_queue=args.max_queue, seed=args.seed, threads=args.threads, prompt_lookup=args.prompt_lookup,
                    world=world)
    if world is not None and not world.leader:
        from ..parallel.lockstep import follow

        # Rank 0 serves HTTP and sends every step's work here; this rank runs the same steps on its share.
        follow(engine.scheduler, llm.tokenizer, world)
        return
    embedder = load_embedder(args.embed_model) if args.embed_model else None
    app = create_app(engine, model_name=name, api_key=args.api_key or None, adapters=adapters,
                     cors_origins=args.cors_origin, model_path=path, embedder=embedder, pooling=args.pooling)
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", args.host)
    # uvicorn's own graceful timeout is the backstop: past the engine's deadline, the ended streams still
    # need a moment to send their final events.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_grace + 5)
    server = _draining_server(config, engine, args.shutdown_grace)
    engine.on_failure = lambda message: setattr(server, "should_exit", True)
    server.run()
    if engine.failure is not None:
        raise Llama3Error(engine.failure)


def load_adapters(model, specs: list[str], base_name: str) -> list[str]:
    """Load each ``--lora NAME=DIR`` (or ``DIR``, named after the directory) into ``model``; their names."""
    from ..lora import load_adapter

    names: list[str] = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = Path(spec).expanduser().name, spec
        if not name or name == base_name:
            raise Llama3Error(f"--lora {spec}: the adapter needs a name other than the base model's ({base_name!r})")
        load_adapter(model, Path(directory).expanduser(), name)
        names.append(name)
    return names


def _draining_server(config, engine, grace_s: float):
    """A uvicorn server whose first exit signal (SIGTERM, Ctrl-C) starts the engine's drain.

    uvicorn then stops accepting connections and waits for the open ones; the engine lets running sequences
    finish within the grace period and ends the rest with an error, so every stream gets a final event and
    ``[DONE]`` instead of being cut. A second Ctrl-C still forces the exit (uvicorn's rule).
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.drain(grace_s)
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def run(args: argparse.Namespace) -> int:
    """CLI entry: serve; a user error becomes one line on stderr and exit status 1."""
    try:
        serve(args)
    except Llama3Error as exc:
        print(f"llama3 serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def create_app(*args, **kwargs):
    """``llama3.server.app.create_app`` (imported lazily: FastAPI is only needed when serving)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
