"""``python -m llama3.server [--model PATH] [--port N] ...``: the same as ``llama3 serve``."""

from __future__ import annotations

import argparse
import sys

from . import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama3.server", description="OpenAI-compatible server")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
