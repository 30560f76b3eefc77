"""Tokenizers rebuilt from a GGUF file's metadata (``tokenizer.ggml.*``), without loading its tensors.

A GGUF has no tokenizer.json: it stores the vocabulary, merges, token types and special ids under
llama.cpp's key names. We read just that key/value header (a few MB at the front of the file, through
mmap) and build an equivalent ``tokenizers.Tokenizer``:

* ``gpt2`` (byte-level BPE): vocabulary + merges; the pre-tokenizer comes from ``tokenizer.ggml.pre``,
  following llama.cpp's table (e.g. "smollm": every digit split off, then GPT-2's pattern, which is
  also what SmolLM2's own tokenizer.json does; "llama-bpe": Llama 3's pattern with whole-word lookup
  before merges, as tiktoken does).
* ``llama`` (SentencePiece BPE): vocabulary + merges, or merges derived from the token scores when the
  file has none; "▁" word marks, byte fallback, a leading "▁" when ``add_space_prefix``.

Control tokens (token type 3) become special tokens; user-defined ones (type 4) are matched whole.

Every header value is read through ``gguf_file``'s typed getters, so a damaged file raises TokenizerError naming
the key. A vocabulary string that appears twice (some published files have such duplicates; so does a file with
a flipped byte) is encoded as its last id, as llama.cpp's token map does; the earlier id decodes to nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ..errors import TokenizerError
from ..gguf_file import GGUFFormatError, get_bool, get_int, get_numbers, get_str, get_strings, read_gguf_file
from .base import END_OF_TURN_TEXTS
from .hf import HFTokenizer, byte_level_alphabet

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's llama-vocab.cpp is the authority).
GPT2_PRE = {"gpt-2", "default", "mpt", "olmo", "jais", "trillion"}
DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"}

def read_gguf_metadata(path: Path, prefixes: Sequence[str] = ("tokenizer.", "general.architecture")) -> dict[str, Any]:
    """The header key/values of a GGUF file whose keys start with one of ``prefixes`` (tensors are not read)."""
    prefixes = tuple(prefixes)
    try:
        return read_gguf_file(path, lambda key: key.startswith(prefixes), tensors=False).metadata
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except GGUFFormatError as exc:
        raise TokenizerError(f"{path}: {exc}") from None


def _merge_pairs(merges: Sequence[str], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"{path}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    return pairs


def merges_from_scores(tokens: Sequence[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a scored vocabulary: every split of a normal token into two
    vocabulary tokens, best-scoring result first (SentencePiece merges the highest-scoring pair)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    # Only cuts whose two sides have lengths of vocabulary tokens can be merges: one very long (e.g. damaged)
    # token then costs a few slices, not a quadratic scan over all its cut points.
    lengths = sorted({len(t) for t in vocab})
    ranked = []
    for token, i in vocab.items():
        for k in lengths:
            if k >= len(token):
                break
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _pre_tokenizer(pre: str, path: Path) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a byte-level vocabulary whose ``tokenizer.ggml.pre`` is ``pre``."""
    if pre in DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    for names, pattern, ignore_merges in ((LLAMA3_PRE, LLAMA3_PATTERN, True), (QWEN2_PRE, QWEN2_PATTERN, False)):
        if pre in names:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]), ignore_merges
    if pre not in GPT2_PRE:
        warnings.warn(
            f"{path}: unknown tokenizer.ggml.pre {pre!r}; splitting text with GPT-2's pattern, which may not "
            "match how this model was trained", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _add_vocab_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], types: np.ndarray,
                      keys: Sequence[str]) -> None:
    """Control tokens -> special added tokens, user-defined -> plain added tokens (matched whole in text).
    Empty strings are left out: text cannot contain them, and an empty pattern would match everywhere."""
    control = [AddedToken(tokens[i], normalized=False, special=True) for i in np.flatnonzero(types == CONTROL)
               if keys[i] == tokens[i] and tokens[i]]
    user = [AddedToken(tokens[i], normalized=False, special=False) for i in np.flatnonzero(types == USER_DEFINED)
            if keys[i] == tokens[i] and tokens[i]]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _bpe(path: Path, keys: Sequence[str], merges: list[tuple[str, str]], **options: Any) -> models.BPE:
    """The ``tokenizers`` BPE model; its bare Exception (a merge naming a string that is not in the vocabulary:
    a damaged token or merge) becomes a TokenizerError."""
    try:
        return models.BPE(vocab={k: i for i, k in enumerate(keys)}, merges=merges, dropout=None, **options)
    except Exception as exc:  # the Rust constructor raises plain Exception
        raise TokenizerError(f"{path}: tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({exc})") from None


def build_gguf_tokenizer(path: Path) -> HFTokenizer:
    """An ``HFTokenizer`` equivalent to the tokenizer described by the GGUF file at ``path``."""
    meta = read_gguf_metadata(path)
    try:
        return _build(meta, path)
    except GGUFFormatError as exc:  # a header value of the wrong type or range
        raise TokenizerError(f"{path}: {exc}") from None


def _build(meta: dict[str, Any], path: Path) -> HFTokenizer:
    kind = get_str(meta, "tokenizer.ggml.model")
    tokens = get_strings(meta, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    if not tokens:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens is empty")
    n = len(tokens)
    types = get_numbers(meta, "tokenizer.ggml.token_type", n, integers=True)
    types = np.full(n, NORMAL, dtype=np.int32) if types is None else types.astype(np.int32)

    def special(key: str) -> int | None:
        """A special token's id: a non-integer is an error, an id outside the vocabulary is ignored."""
        value = get_int(meta, f"tokenizer.ggml.{key}", lo=None)
        return value if value is not None and 0 <= value < n else None

    if kind == "gpt2":
        alphabet = byte_level_alphabet()
        allowed = set(alphabet.values())
        # Tokens are stored in the byte-level spelling; the few that are not (added text) are respelled.
        keys = [t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
        merges = _merge_pairs(get_strings(meta, "tokenizer.ggml.merges") or [], path)
        pre_tok, ignore_merges = _pre_tokenizer(get_str(meta, "tokenizer.ggml.pre", "default"), path)
        model = _bpe(path, keys, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                     ignore_merges=ignore_merges)
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = pre_tok
        backend.decoder = decoders.ByteLevel()
        add_bos_default, byte_decoding, name = False, "byte_level", "gguf-gpt2"
    elif kind == "llama":
        keys = list(tokens)
        listed = get_strings(meta, "tokenizer.ggml.merges")
        if listed is not None:
            merges = _merge_pairs(listed, path)
        else:
            scores = get_numbers(meta, "tokenizer.ggml.scores", n, integers=False)
            if scores is None:
                raise TokenizerError(f"{path}: SentencePiece vocabulary has neither merges nor scores")
            merges = merges_from_scores(tokens, scores, types)
        unk = special("unknown_token_id")
        model = _bpe(path, keys, merges, unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                     byte_fallback=True)
        backend = tokenizers.Tokenizer(model)
        prefix = get_bool(meta, "tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos_default, byte_decoding, name = True, "sentencepiece", "gguf-llama"
    else:
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    _add_vocab_tokens(backend, tokens, types, keys)
    bos_id, eos_id, pad_id, unk_id = special("bos_token_id"), special("eos_token_id"), special("padding_token_id"), special("unknown_token_id")
    if eos_id is None:
        eos_id = next((i for i, t in enumerate(tokens) if t in END_OF_TURN_TEXTS and types[i] == CONTROL), None)
        if eos_id is None:
            raise TokenizerError(f"{path}: GGUF file names no EOS token (tokenizer.ggml.eos_token_id)")
    eot_id = special("eot_token_id")
    special_ids = {int(i) for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN))}
    special_ids |= {i for i in (bos_id, eos_id, unk_id) if i is not None}
    template_vars = {name: tokens[i] for name, i in
                     (("bos_token", bos_id), ("eos_token", eos_id), ("unk_token", unk_id), ("pad_token", pad_id))
                     if i is not None}
    add_bos = get_bool(meta, "tokenizer.ggml.add_bos_token", add_bos_default)
    return HFTokenizer(
        backend,
        name=name,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id if pad_id is not None else -1,
        add_bos=add_bos,
        stop_ids=[eot_id] if eot_id is not None else [],
        special_ids=special_ids,
        chat_template=get_str(meta, "tokenizer.chat_template"),
        template_vars=template_vars,
        byte_decoding=byte_decoding,
        n_words=n,
        sentencepiece_prefix=kind == "llama",
    )
