"""Meta's Llama 3 tokenizer (tiktoken BPE over ``tokenizer.model``) and its token-level ``ChatFormat``.

Reproduces the reference exactly: the split pattern, 256 special tokens numbered after the base
vocabulary, the chunking of very long input, and tiktoken's allowed/disallowed special semantics.
The chat prompt is assembled from token ids, so message text can never become a header or <|eot_id|>.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from ..errors import TokenizerError
from ..tools import Tool, call_text
from .base import (
    Dialog,
    Message,
    SpecialCollection,
    SpecialSet,
    Tokenizer,
    check_dialog,
    continues_last_message,
    encodable,
)

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken slows down badly on huge inputs and on very long runs of (non-)whitespace, hence Meta's limits.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


# Llama 3.1's tool-calling prompt (Meta's prompt format documentation, "JSON based tool calling").
EOM_ID = 128008
PYTHON_TAG_ID = 128010
LLAMA31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def special_token_names() -> list[str]:
    """The 256 special tokens in id order (ids = base vocabulary size + index)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]
    return named + reserved


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (lines ``<base64 token> <rank>``); raise ``TokenizerError`` if it is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({exc.strerror or exc})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path}: not a tiktoken tokenizer.model (line {lineno} is not '<base64 token> <rank>')"
            ) from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Meta's ``_split_whitespaces_or_nonwhitespaces``: cut ``s`` inside any run of whitespace or of
    non-whitespace longer than ``max_run`` (every ``max_run`` chars from the run's start); pieces
    otherwise span several runs."""
    if len(s) <= max_run:  # no run can be too long; the common case
        yield s
        return
    start = 0
    # Python's \s and str.isspace() share one definition of whitespace (Py_UNICODE_ISSPACE).
    for run in re.finditer(r"\s+|\S+", s):
        run_start, run_end = run.span()
        for cut in range(run_start + max_run, run_end, max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: ``tokenizer.model`` ranks + 256 special tokens, tiktoken underneath."""

    name = "llama3-tiktoken"
    add_bos = True
    chat_template = None

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        ranks = load_tiktoken_ranks(path)
        n_base = len(ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = self.model.n_vocab
        self.n_base = n_base
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.pad_id = -1
        # Llama 3.1 names id 128008 <|eom_id|> ("end of message": a tool result is awaited) and ends such turns
        # with it; earlier models never produce it, so it is a stop token for every Llama 3 checkpoint.
        self.eom_id = EOM_ID
        self.stop_tokens = frozenset({self.eos_id, self.eot_id, self.eom_id})
        self.path = path

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialCollection = (),
    ) -> list[int]:
        if type(s) is not str:
            raise TokenizerError(f"encode() needs a str, got {type(s).__name__}")
        s = encodable(s)  # before chunking, so a surrogate pair split by a chunk boundary is still joined
        ids: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                try:
                    ids.extend(
                        self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
                    )
                except ValueError as exc:  # tiktoken's "disallowed special token" error
                    raise TokenizerError(f"cannot encode text: {exc}") from None
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i < self.n_base]
        return self.model.decode(ids)

    def token_bytes(self, id: int) -> bytes:
        (id,) = self._check_ids((id,))
        return self.model.decode_single_token_bytes(id)

    def is_special(self, id: int) -> bool:
        return self.n_base <= id < self.n_words

    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True,
                             tools: Sequence[Tool] | None = None) -> list[int]:
        return ChatFormat(self).encode_dialog_prompt(dialog, add_generation_prompt=add_generation_prompt, tools=tools)


class ChatFormat:
    """Meta's Llama 3 chat format, built from token ids (message text is encoded with no special tokens)."""

    def __init__(self, tokenizer: Llama3Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> list[int]:
        tok = self.tokenizer
        return [
            tok.special_tokens["<|start_header_id|>"],
            *tok.encode(message["role"], bos=False, eos=False),
            tok.special_tokens["<|end_header_id|>"],
            *tok.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message, *, close: bool = True) -> list[int]:
        """Header + stripped content + <|eot_id|> (left off when ``close`` is False, to continue the message)."""
        ids = self.encode_header(message) + self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        if close:
            ids.append(self.tokenizer.eot_id)
        return ids

    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True,
                             tools: Sequence[Tool] | None = None) -> list[int]:
        """Meta's Llama 3 format; with ``tools``, or tool calls and results in the dialog, Llama 3.1's."""
        check_dialog(dialog)
        if tools or any(m.get("tool_calls") or m["role"] in ("tool", "ipython") for m in dialog):
            return self._encode_with_tools(dialog, tools or (), add_generation_prompt)
        open_last = continues_last_message(dialog, add_generation_prompt)
        ids = [self.tokenizer.bos_id]
        for i, message in enumerate(dialog):
            ids.extend(self.encode_message(message, close=not (open_last and i == len(dialog) - 1)))
        if add_generation_prompt:
            ids.extend(self.encode_header({"role": "assistant", "content": ""}))
        return ids

    def _encode_with_tools(self, dialog: Dialog, tools: Sequence[Tool], add_generation_prompt: bool) -> list[int]:
        """Llama 3.1's JSON tool calling (Meta's documented prompt format, custom tools in the first user
        message): "Environment: ipython" and the knowledge dates in the system turn, the function definitions
        before the first question, calls as {"name", "parameters"} JSON, results in ``ipython`` turns."""
        tok = self.tokenizer
        messages = list(dialog)
        system = messages.pop(0)["content"].strip() if messages and messages[0]["role"] == "system" else ""
        ids = [tok.bos_id]
        header = ("Environment: ipython\n" if tools else "") + LLAMA31_DATES
        ids += self.encode_header({"role": "system"}) + tok.encode(header + system, bos=False, eos=False) + [tok.eot_id]
        if tools:
            if not messages or messages[0]["role"] != "user":
                raise TokenizerError("tools go with the first user message, and this dialog has none after the system message")
            first = messages.pop(0)["content"].strip()
            definitions = "".join(json.dumps(t.openai(), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
            ids += self.encode_header({"role": "user"}) + tok.encode(LLAMA31_TOOLS_PREAMBLE + definitions + first,
                                                                     bos=False, eos=False) + [tok.eot_id]
        for message in messages:
            if message.get("tool_calls"):
                if len(message["tool_calls"]) != 1:
                    raise TokenizerError("Llama 3.1 writes one tool call per assistant message")
                text = call_text(message["tool_calls"][0])
                ids += self.encode_header({"role": "assistant"}) + tok.encode(text, bos=False, eos=False) + [tok.eot_id]
            elif message["role"] in ("tool", "ipython"):
                ids += self.encode_header({"role": "ipython"}) + tok.encode(message["content"], bos=False, eos=False)
                ids.append(tok.eot_id)
            else:
                ids += self.encode_message(message)
        if add_generation_prompt:
            ids += self.encode_header({"role": "assistant"})
        return ids
