"""Training data: JSON Lines read, checked and tokenized with the model's own chat format.

SFT records are ``{"messages": [...]}`` (OpenAI chat format; the loss covers every assistant turn) or
``{"prompt": ..., "completion": ...}`` (a string prompt is plain text, as TRL reads it; a list of messages is
rendered with the chat template and the completion becomes the assistant's answer). DPO records are
``{"prompt": str or messages, "chosen": str, "rejected": str}``. Every line is checked before any training
starts, and a bad one is a ``DataError`` naming the file, line and field.

An example is its token ids and a mask of the positions whose token is a training target: the assistant's
answer and the token that ends its turn (so the model learns to stop), never the prompt or the template's
headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Llama3Error, TokenizerError
from ..tokenizer.base import Tokenizer, check_dialog


class DataError(Llama3Error):
    """A training file or record that cannot be used (the message names the file, line and field)."""


@dataclass(frozen=True)
class Example:
    """One tokenized sequence: ``ids`` and, per position, whether that token is a training target."""

    ids: tuple[int, ...]
    targets: tuple[bool, ...]

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


@dataclass(frozen=True)
class Pair:
    """A DPO preference: the same prompt with the chosen and the rejected answer."""

    chosen: Example
    rejected: Example


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; ``DataError`` on unreadable files or lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return records


def _messages(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    try:
        check_dialog(value)
    except TokenizerError as exc:
        raise DataError(f"{where}: {field}: {exc}") from None
    return [dict(m) for m in value]


def _text(record: Mapping[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        got = "missing" if field not in record else f"a {type(value).__name__}"
        raise DataError(f"{where}: {field} must be a string ({got})")
    if not value:
        raise DataError(f"{where}: {field} is empty")
    return value


class ExampleBuilder:
    """Tokenizes records for one tokenizer: chat turns through its template, targets on the answers."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def _closing(self, dialog: list[dict[str, Any]], where: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``dialog`` (which ends with an assistant turn) closed, and the target span of each answer."""
        tok = self.tokenizer
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(dialog):
            if message["role"] != "assistant":
                continue
            prompt = tok.encode_dialog_prompt(dialog[:i], add_generation_prompt=True)
            # The answer left open, then closed by rendering one more turn after it: the template's own
            # end-of-turn token is the first stop token after the answer.
            answer = tok.encode_dialog_prompt(dialog[: i + 1], add_generation_prompt=False)
            closed = tok.encode_dialog_prompt([*dialog[: i + 1], {"role": "user", "content": "."}],
                                              add_generation_prompt=False)
            if answer[: len(prompt)] != prompt or closed[: len(answer)] != answer or answer[: len(ids)] != ids:
                raise DataError(f"{where}: the model's chat template does not render turn {i} as a continuation of "
                                "the turns before it, so answer tokens cannot be told apart from the prompt")
            end = next((j for j in range(len(answer), len(closed)) if closed[j] in tok.stop_tokens), None)
            if end is None:
                raise DataError(f"{where}: the model's chat template does not end the assistant turn with a stop token")
            ids = closed[: end + 1]
            spans.append((len(prompt), end + 1))
        return ids, spans

    def _example(self, ids: list[int], spans: list[tuple[int, int]], where: str) -> Example:
        targets = [False] * len(ids)
        for start, stop in spans:
            for j in range(start, stop):
                targets[j] = True
        if not any(targets):
            raise DataError(f"{where}: nothing to learn (no assistant answer)")
        return Example(tuple(ids), tuple(targets))

    def chat(self, dialog: list[dict[str, Any]], where: str, *, last_only: bool = False) -> Example:
        """A conversation: targets on every assistant answer (only the final one with ``last_only``)."""
        last = max((i for i, m in enumerate(dialog) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: messages: no assistant message to learn from")
        if dialog[0]["role"] == "assistant":
            raise DataError(f"{where}: messages: the conversation starts with the assistant (nothing to answer)")
        dialog = dialog[: last + 1]  # turns after the last answer teach nothing
        try:
            ids, spans = self._closing(dialog, where)
        except TokenizerError as exc:
            raise DataError(f"{where}: {exc}") from None
        return self._example(ids, spans[-1:] if last_only else spans, where)

    def plain(self, prompt: str, completion: str, where: str) -> Example:
        """Plain text: BOS (when the model uses one) + prompt, then the completion and EOS as targets."""
        tok = self.tokenizer
        head = tok.encode(prompt, bos=True, eos=False)
        tail = tok.encode(completion, bos=False, eos=False) + [tok.eos_id]
        return self._example(head + tail, [(len(head), len(head) + len(tail))], where)

    def answer(self, prompt: Any, completion: str, where: str) -> Example:
        """A prompt (text or messages) and one answer to it."""
        if isinstance(prompt, str):
            return self.plain(prompt, completion, where)
        dialog = _messages(prompt, where, "prompt")
        if dialog[-1]["role"] == "assistant":
            raise DataError(f"{where}: prompt must not end with an assistant message (the answer is the completion)")
        return self.chat([*dialog, {"role": "assistant", "content": completion}], where, last_only=True)

    def sft(self, record: Mapping[str, Any], where: str) -> Example:
        if "messages" in record:
            return self.chat(_messages(record["messages"], where, "messages"), where)
        if "prompt" in record and "completion" in record:
            prompt = record["prompt"]
            if not isinstance(prompt, (str, list)):
                raise DataError(f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}")
            if isinstance(prompt, str):
                _text(record, "prompt", where)
            return self.answer(prompt, _text(record, "completion", where), where)
        raise DataError(f"{where}: an SFT record needs 'messages', or 'prompt' and 'completion' "
                        f"(found {', '.join(sorted(record)) or 'no fields'})")

    def dpo(self, record: Mapping[str, Any], where: str) -> Pair:
        if "prompt" not in record:
            raise DataError(f"{where}: a DPO record needs 'prompt', 'chosen' and 'rejected' (prompt is missing)")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            _text(record, "prompt", where)
        elif not isinstance(prompt, list):
            raise DataError(f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}")
        chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
        return Pair(self.answer(prompt, chosen, where), self.answer(prompt, rejected, where))


def truncate(example: Example, max_len: int) -> Example | None:
    """``example`` cut to ``max_len`` tokens (from the end), or None when no target token is left."""
    if len(example.ids) <= max_len:
        return example
    cut = Example(example.ids[:max_len], example.targets[:max_len])
    return cut if cut.n_targets else None


@dataclass
class Dataset:
    """The usable examples of one file, and how many records were cut or dropped for length."""

    path: Path
    items: list[Any]
    truncated: int = 0
    dropped: int = 0


def load_dataset(path: str | Path, tokenizer: Tokenizer, method: str, max_len: int) -> Dataset:
    """Read and tokenize a JSONL file for ``method`` ("sft" or "dpo"); every line is checked first."""
    if method not in ("sft", "dpo"):
        raise DataError(f"unknown training method {method!r} (expected 'sft' or 'dpo')")
    path = Path(path)
    builder = ExampleBuilder(tokenizer)
    parsed = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        parsed.append(builder.sft(record, where) if method == "sft" else builder.dpo(record, where))
    data = Dataset(path, [])
    for item in parsed:
        parts = [item] if method == "sft" else [item.chosen, item.rejected]
        cut = [truncate(e, max_len) for e in parts]
        if any(c is None for c in cut):
            data.dropped += 1
            continue
        data.truncated += any(c is not e for c, e in zip(cut, parts))
        data.items.append(cut[0] if method == "sft" else Pair(cut[0], cut[1]))
    if not data.items:
        raise DataError(f"{path}: every record is longer than --max-seq-len {max_len} before its first answer token")
    return data


def batches(n: int, batch_size: int, order: Sequence[int]) -> list[list[int]]:
    """Indices ``order`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [list(order[i : i + batch_size]) for i in range(0, n, batch_size)]
