"""The one tokenizer interface every model family implements, and dialog validation.

Generation, the CLI and the server only ever see ``Tokenizer`` (and ``streaming``'s decoders); which family sits
behind them (Meta's tiktoken file, a Hugging Face ``tokenizer.json``, a GGUF vocabulary) never matters.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, AbstractSet, Literal, Union

from ..errors import TokenizerError

if TYPE_CHECKING:
    from ..tools import Tool

Message = Mapping[str, str]
Dialog = Sequence[Message]
SpecialSet = Union[Literal["all"], AbstractSet[str]]
SpecialCollection = Union[Literal["all"], Collection[str]]

ROLES = ("system", "user", "assistant", "tool", "ipython")

# Token texts that end a turn in the chat formats we know of. llama.cpp finds its end-of-generation tokens
# by text the same way, because many files name only one EOS (SmolLM2's GGUF says eos = <|im_end|>, but its
# base text ends with <|endoftext|>). Only tokens the vocabulary marks special/control are taken.
END_OF_TURN_TEXTS = frozenset({
    "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>", "<end_of_turn>",
    "<|end|>", "<|END_OF_TURN_TOKEN|>", "<|end_of_turn|>", "<EOT>", "<|return|>",
})


def encodable(text: str) -> str:
    """``text`` with every lone UTF-16 surrogate replaced by U+FFFD, so that it has a UTF-8 encoding.

    JSON lets a client send ``"\\ud800"`` alone, and Python keeps it in the string, but no UTF-8 text can hold
    it. Every tokenizer does what tiktoken (Meta's) already does: surrogate pairs are joined, and a lone
    surrogate becomes the replacement character, as any UTF-8 decoder would render it.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def check_dialog(dialog: Dialog) -> None:
    """Raise ``TokenizerError`` unless ``dialog`` is a non-empty list of {"role": known role, "content": str}."""
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise TokenizerError(f"dialog must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise TokenizerError("dialog is empty: it needs at least one message")
    for i, message in enumerate(dialog):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"dialog[{i}] must be a mapping with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise TokenizerError(f"dialog[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)) or not calls:
                raise TokenizerError(f"dialog[{i}] ({role}): tool_calls must be a non-empty list on an assistant message")
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                    raise TokenizerError(f"dialog[{i}].tool_calls[{j}] needs a function with a name")
                if not isinstance(function.get("arguments"), Mapping):
                    raise TokenizerError(f"dialog[{i}].tool_calls[{j}].function.arguments must be an object")
            if content is None:
                continue
        if not isinstance(content, str):
            raise TokenizerError(f"dialog[{i}] ({role}): content must be a string, got {type(content).__name__}")


def continues_last_message(dialog: Dialog, add_generation_prompt: bool) -> bool:
    """True when the prompt must leave the final assistant message open for the model to continue it."""
    return not add_generation_prompt and dialog[-1]["role"] == "assistant"


class Tokenizer(abc.ABC):
    """Text <-> token ids, and dialogs -> prompt ids, exactly as the model was trained.

    Attributes: ``bos_id`` (None when the model has no BOS), ``eos_id``, ``pad_id`` (-1 when none),
    ``stop_tokens`` (ids that end generation: EOS plus the end-of-turn tokens present), ``n_words``
    (vocabulary size), ``name`` (the family, e.g. "llama3-tiktoken", "hf", "gguf-gpt2"), ``add_bos``
    (whether ``encode(..., bos=True)`` prepends BOS: always for Meta, as the file says for HF/GGUF, since
    e.g. SmolLM2 names a BOS but was never trained with one), ``chat_template`` (the Jinja source used by
    ``encode_dialog_prompt``, None for Meta's token-level ChatFormat).
    """

    name: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_tokens: frozenset[int]
    n_words: int
    add_bos: bool = True
    chat_template: str | None = None
    # SentencePiece vocabularies mark a word start with a space that decoding drops at the very start.
    strips_leading_space: bool = False

    @abc.abstractmethod
    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialCollection = (),
    ) -> list[int]:
        """Token ids of ``s``. Meta semantics: special-token *text* is ordinary text unless listed in
        ``allowed_special`` ("all" or a set of token strings); text containing a token listed in
        ``disallowed_special`` ("all" = every special not allowed) raises ``TokenizerError``."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` (broken UTF-8 becomes U+FFFD); special tokens appear as their text unless skipped."""

    @abc.abstractmethod
    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (a special token's bytes are its text), for streaming and logprob output."""

    @abc.abstractmethod
    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True,
                             tools: Sequence[Tool] | None = None) -> list[int]:
        """Prompt ids for a chat. Message text never becomes a control token. ``tools`` (``llama3.tools.Tool``)
        are offered to the model in its own format; the dialog may hold assistant ``tool_calls`` and ``tool``
        results (see ``check_dialog``).

        With ``add_generation_prompt`` the prompt ends with the assistant header the model answers after.
        Without it, a dialog whose last message is the assistant's is left open (no end-of-turn) so the
        model continues that message; any other dialog is rendered with every turn closed.
        """

    @abc.abstractmethod
    def is_special(self, id: int) -> bool:
        """True for control/special tokens (BOS, EOS, headers, end-of-turn...), which output usually hides."""

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.n_words:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{self.n_words - 1}) of {self.name}")
        return ids

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} n_words={self.n_words} bos={self.bos_id} eos={self.eos_id}>"
