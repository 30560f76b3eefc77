"""Fuzzing the GGUF readers: a tiny valid GGUF, damaged anywhere, must either load (model and tokenizer, and
then work) or fail with ``CheckpointError`` / ``TokenizerError``, never anything else, and never take long.

The base file (tests/gguf_utils.py ``write_tiny_gguf``: Q4_1 matrices, tied embeddings, a byte-level BPE
tokenizer with merges, control tokens and a chat template) is taken apart once: its key/values as raw bytes,
its tensor directory as fields, its data section. Hypothesis then draws one to four mutations: structured
ones that keep the file well framed (a key set to an adversarial value of any GGUF type, a vocabulary or merge
string replaced, a token's type changed, the vocabulary made SentencePiece, a tensor's dims/type/offset/name
changed, a key or tensor dropped) and raw ones (bytes
flipped in the key/values, the tensor directory or the data; the file truncated). Each damaged file goes
through ``load_model(quantize=None)``, ``load_model()`` (quantized kernels) and ``load_tokenizer``, each
followed by a little use (a one-token forward with and without the KV cache; encode, decode, a chat prompt).

Seeded (``derandomize=True``) and bounded: each call gets LIMIT_S seconds (a SIGALRM, so a hang inside native
code would still hang) and the run 4 GiB more address space. ``LLAMA3_FUZZ_EXAMPLES=N`` sets the number of
mutations of the default test; ``-s`` shows the tally line. The slow variant runs 2000. A failure lists the
mutation: ``mutate(take_apart(write_tiny_gguf(path, GGMLQuantizationType.Q4_1)), mutation)`` rebuilds the file.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf_utils import GGUFParts, compose, take_apart, tiny_vocabulary, write_tiny_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3.checkpoint import load_model
from llama3.errors import CheckpointError, TokenizerError
from llama3.tokenizer import load_tokenizer

DEFAULT_EXAMPLES = 200
SLOW_EXAMPLES = 2000
LIMIT_S = 10.0  # a load (and its use) taking longer than this counts as a failure
ALIGNMENT = 32

V = GGUFValueType
_INT_RANGES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1), V.UINT16: (0, 2**16 - 1),
               V.INT16: (-(2**15), 2**15 - 1), V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
               V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1)}  # fmt: skip


# --- mutations ---------------------------------------------------------------------------------------
# Structured ones edit the parts (``vocab`` holds the current tokens and merges, as bytes, and token types); raw
# ones damage the composed file.
Vocab = dict[str, list[Any]]


@dataclass(frozen=True)
class SetKey:
    key: str
    vtype: int
    value: Any

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        return parts.with_key(self.key, self.vtype, self.value)


@dataclass(frozen=True)
class DropKey:
    index: int

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        return parts.with_key(parts.kvs[self.index % len(parts.kvs)][0].decode())


@dataclass(frozen=True)
class SetString:
    """Replace one vocabulary (``tokens``) or merge (``merges``) string, e.g. by itself with a byte flipped."""

    array: str
    index: int
    text: bytes | None  # None: the current string with byte ``flip_at`` xor ``mask``
    flip_at: int = 0
    mask: int = 1

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        items = vocab[self.array]
        i = self.index % len(items)
        if self.text is None and items[i]:
            flipped = bytearray(items[i])
            flipped[self.flip_at % len(flipped)] ^= self.mask
            items[i] = bytes(flipped)
        elif self.text is not None:
            items[i] = self.text
        return parts.with_key(f"tokenizer.ggml.{self.array}", V.ARRAY, (V.STRING, items))


@dataclass(frozen=True)
class SetTokenType:
    """Give one token another type (control, user-defined, byte... or no known type): whatever its text."""

    index: int
    value: int

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        types = vocab["types"]
        types[self.index % len(types)] = self.value
        return parts.with_key("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, types))


@dataclass(frozen=True)
class AsSentencePiece:
    """Make the vocabulary a SentencePiece one ("llama"), its merges derived from ``scores`` (cycled over the tokens;
    ``length`` of them) or, with ``keep_merges``, still listed."""

    scores: tuple[float, ...]
    length: int
    keep_merges: bool

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        parts = parts.with_key("tokenizer.ggml.model", V.STRING, "llama")
        if self.keep_merges:
            return parts
        scores = [self.scores[i % len(self.scores)] for i in range(self.length)]
        return parts.with_key("tokenizer.ggml.merges").with_key("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, scores))


@dataclass(frozen=True)
class SetTensor:
    """Change one directory entry: ``what`` is "dim" (``dim`` picks which), "type", "offset", "name", "ndims"."""

    index: int
    what: str
    value: Any
    dim: int = 0

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        tensors = list(parts.tensors)
        i = self.index % len(tensors)
        e = tensors[i]
        if self.what == "dim":
            dims = list(e.dims)
            dims[self.dim % len(dims)] = self.value
            e = replace(e, dims=tuple(dims))
        elif self.what == "ndims":
            e = replace(e, dims=(e.dims + (1, 1, 1, 1, 1))[: self.value])
        elif self.what == "offset":  # a negative value: another tensor's offset
            e = replace(e, offset=self.value if self.value >= 0 else tensors[-self.value % len(tensors)].offset)
        elif self.what == "name":  # an int: another tensor's name
            name = self.value if isinstance(self.value, bytes) else tensors[self.value % len(tensors)].name
            e = replace(e, name=name)
        else:
            e = replace(e, ggml_type=self.value)
        tensors[i] = e
        return replace(parts, tensors=tuple(tensors))


@dataclass(frozen=True)
class DropTensor:
    index: int

    def apply(self, parts: GGUFParts, vocab: Vocab) -> GGUFParts:
        tensors = list(parts.tensors)
        del tensors[self.index % len(tensors)]
        return replace(parts, tensors=tuple(tensors))


def regions(parts: GGUFParts) -> dict[str, tuple[int, int]]:
    """Byte ranges of the composed file: key/values, tensor directory, the whole header, the data section."""
    kv_end = 24 + sum(8 + len(k) + len(v) for k, v in parts.kvs)
    dir_end = kv_end + sum(8 + len(e.name) + 4 + 8 * len(e.dims) + 12 for e in parts.tensors)
    data_start = dir_end + -dir_end % ALIGNMENT
    return {"kv": (24, kv_end), "directory": (kv_end, dir_end), "header": (0, data_start),
            "data": (data_start, data_start + len(parts.data))}  # fmt: skip


@dataclass(frozen=True)
class Flip:
    """XOR ``mask`` into the byte at ``position`` (modulo the region's size) of the composed file's ``region``."""

    region: str
    position: int
    mask: int

    def apply_bytes(self, data: bytearray, spans: dict[str, tuple[int, int]]) -> None:
        start, end = spans[self.region]
        end = min(end, len(data))  # after a truncation
        if end > start:
            data[start + self.position % (end - start)] ^= self.mask


@dataclass(frozen=True)
class Truncate:
    keep: int  # bytes kept, modulo the file size

    def apply_bytes(self, data: bytearray, spans: dict[str, tuple[int, int]]) -> None:
        if data:
            del data[self.keep % len(data) :]


def _int_values(vtype: int) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES[V(vtype)]
    edges = [v for v in (0, 1, 2, 3, 4, 8, 64, 100_000, 2**31, 2**32 - 1, 2**63, -1, lo, hi) if lo <= v <= hi]
    return st.sampled_from(edges) | st.integers(lo, hi)


_FLOAT_EDGES = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-30, -1.0, 1e30])
_TEXTS = st.sampled_from(["", "llama", "gpt2", "bert", "smollm", "llama-bpe", "qwen2", "<|im_end|>", "Ġt", "a b",
                          "{{ raise_exception('x') }}", "{% for %}", "\ud800"]) | st.text(max_size=8)  # fmt: skip


def scalar_values(vtype: int) -> st.SearchStrategy[Any]:
    if vtype in _INT_RANGES:
        return _int_values(vtype)
    if vtype == V.FLOAT32:
        return _FLOAT_EDGES | st.floats(width=32)
    if vtype == V.FLOAT64:
        return _FLOAT_EDGES | st.floats()
    if vtype == V.BOOL:
        return st.booleans()
    return _TEXTS


_SCALAR_TYPES = [*_INT_RANGES, V.FLOAT32, V.FLOAT64, V.BOOL, V.STRING]


def gguf_values() -> st.SearchStrategy[tuple[int, Any]]:
    """(value type, value) of any GGUF type: scalars, strings, arrays (of scalars, strings or arrays)."""
    scalar = st.sampled_from(_SCALAR_TYPES).flatmap(lambda t: scalar_values(t).map(lambda v: (t, v)))
    array = st.sampled_from(_SCALAR_TYPES).flatmap(
        lambda t: st.lists(scalar_values(t), max_size=5).map(lambda items: (V.ARRAY, (t, items)))
    )
    nested = st.lists(st.lists(st.integers(0, 9), max_size=3), max_size=3).map(
        lambda rows: (V.ARRAY, (V.ARRAY, [(V.INT32, row) for row in rows]))
    )
    return st.one_of(scalar, scalar, array, nested)


KEYS = [
    "general.architecture", "general.alignment", "general.name", "llama.block_count", "llama.context_length",
    "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
    "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
    "llama.vocab_size", "llama.rope.dimension_count", "llama.attention.key_length", "tokenizer.ggml.model",
    "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
]  # fmt: skip
_DIM_EDGES = [0, 1, 2, 16, 31, 32, 33, 64, 65, 128, 268, 2**32 - 1, 2**63, 2**64 - 1]
_DIMS = st.sampled_from(_DIM_EDGES) | st.integers(0, 2**64 - 1)
_TYPES = st.sampled_from([int(t) for t in GGMLQuantizationType] + [4, 5, 999]) | st.integers(0, 2**32 - 1)
_OFFSETS = (
    st.integers(-40, -1)  # another tensor's offset
    | st.sampled_from([0, 1, 31, 32, 33, 1024, 2**63, 2**64 - 1])
    | st.integers(0, 70_000)
)
_NAMES = st.integers(0, 40) | st.sampled_from([b"", b"blk.99999.attn_q.weight", b"blk.4294967295.ffn_up.weight",
                                              b"blk.2.attn_q.weight", b"rope_freqs.weight", b"output.weight",
                                              b"blk.0.attn_q.bias", b"blk.00.attn_q.weight", b"\xff\xfe"])  # fmt: skip

structured = st.one_of(
    st.tuples(st.sampled_from(KEYS), gguf_values()).map(lambda kv: SetKey(kv[0], *kv[1])),
    st.builds(DropKey, st.integers(0, 40)),
    st.builds(SetString, st.sampled_from(["tokens", "merges"]), st.integers(0, 300),
              st.none() | st.sampled_from([b"", b"<|im_end|>", b"t", b"he", b"\xff", b"a b"]) | st.binary(max_size=4),
              st.integers(0, 16), st.integers(1, 255)),  # fmt: skip
    st.builds(SetTokenType, st.integers(0, 300), st.sampled_from([0, 2, 3, 4, 5, 6, 7, -1, 2**31 - 1])),
    st.builds(AsSentencePiece, st.lists(_FLOAT_EDGES | st.floats(width=32), min_size=1, max_size=4).map(tuple),
              st.sampled_from([len(tiny_vocabulary()[0]), 0, 1]), st.booleans()),  # fmt: skip
    st.builds(SetTensor, st.integers(0, 40), st.just("dim"), _DIMS, st.integers(0, 3)),
    st.builds(SetTensor, st.integers(0, 40), st.just("type"), _TYPES),
    st.builds(SetTensor, st.integers(0, 40), st.just("offset"), _OFFSETS),
    st.builds(SetTensor, st.integers(0, 40), st.just("name"), _NAMES),
    st.builds(SetTensor, st.integers(0, 40), st.just("ndims"), st.integers(0, 9)),
    st.builds(DropTensor, st.integers(0, 40)),
)
raw = st.one_of(
    st.builds(Flip, st.sampled_from(["kv", "directory", "header", "data"]), st.integers(0, 2**32), st.integers(1, 255)),
    st.builds(Truncate, st.integers(0, 2**32)),
)
mutations = st.tuples(st.lists(structured, max_size=2), st.lists(raw, max_size=2)).filter(lambda m: m[0] or m[1])


def mutate(parts: GGUFParts, mutation: tuple[list[Any], list[Any]]) -> bytes:
    changes, damage = mutation
    tokens, types, merges = tiny_vocabulary()
    vocab = {"tokens": [t.encode() for t in tokens], "merges": [m.encode() for m in merges], "types": types}
    for change in changes:
        parts = change.apply(parts, vocab)
    data = bytearray(compose(parts))
    spans = regions(parts)
    for d in damage:
        d.apply_bytes(data, spans)
    return bytes(data)


# --- running the loaders -----------------------------------------------------------------------------
class Overtime(BaseException):
    """Raised by the alarm in a call that ran past LIMIT_S (a BaseException: no ``except Exception`` eats it)."""


@contextmanager
def memory_limit(extra_bytes: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes``: a runaway allocation then
    raises MemoryError (a failure) instead of drawing the machine into the OOM killer."""
    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + extra_bytes if soft == resource.RLIM_INFINITY else min(current + extra_bytes, soft)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Overtime

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def use_model(path: Path, quantize: str | None) -> None:
    model = load_model(path, device="cpu", dtype=torch.float32, quantize=quantize)
    token = torch.tensor([[min(3, model.config.vocab_size - 1)]])
    with torch.no_grad():
        model(token)
        model.setup_cache(1, 2)  # a cached single-token step: the fused decode kernel, when installed
        model(token, 0)


def use_tokenizer(path: Path) -> None:
    tok = load_tokenizer(path)
    text = "the 12 cats <|im_end|>"
    tok.decode(tok.encode(text, bos=True, eos=True) + tok.encode(text, bos=False, eos=False, allowed_special="all"))
    every_id = range(min(tok.n_words, 1024))  # ids a damaged vocabulary may have lost (duplicates) included
    tok.decode(every_id)
    for i in every_id:
        tok.token_bytes(i)
    tok.encode_dialog_prompt([{"role": "user", "content": "hi there"}])


CALLS: dict[str, Callable[[Path], None]] = {
    "float": lambda path: use_model(path, None),
    "quantized": lambda path: use_model(path, "auto"),
    "tokenizer": use_tokenizer,
}


def outcome(call: Callable[[Path], None], path: Path) -> tuple[str, str]:
    """("clean error" | "loaded" | "anything else", detail)."""
    start = time.monotonic()
    try:
        with warnings.catch_warnings(), time_limit(LIMIT_S):
            warnings.simplefilter("ignore")  # e.g. an unknown tokenizer.ggml.pre: a warning, not a failure
            call(path)
    except (CheckpointError, TokenizerError) as exc:
        kind, detail = "clean error", str(exc)
    except Overtime:
        kind, detail = "anything else", f"took over {LIMIT_S} s"
    except Exception as exc:
        kind, detail = "anything else", f"{type(exc).__name__}: {exc}"
    else:
        kind, detail = "loaded", ""
    if kind != "anything else" and time.monotonic() - start > LIMIT_S:
        kind, detail = "anything else", f"took {time.monotonic() - start:.1f} s"
    return kind, detail


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> GGUFParts:
    path = write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", GGMLQuantizationType.Q4_1)
    for call in CALLS.values():  # the undamaged file works everywhere (untimed: the first call loads the kernels)
        call(path)
    return take_apart(path)


def fuzz(base: GGUFParts, directory: Path, n_examples: int) -> None:
    """Run every call on ``n_examples`` damaged copies of ``base``; print the tally, fail on "anything else"."""
    tally: Counter[str] = Counter()
    failures: list[str] = []
    counter = itertools.count()

    @settings(max_examples=n_examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(mutations)
    def run(mutation: tuple[list[Any], list[Any]]) -> None:
        path = directory / f"m{next(counter)}.gguf"
        path.write_bytes(mutate(base, mutation))
        try:
            for name, call in CALLS.items():
                kind, detail = outcome(call, path)
                tally[kind] += 1
                if kind == "anything else":
                    failures.append(f"{name}: {detail}\n    mutation: {mutation!r}")
        finally:
            path.unlink()

    with memory_limit(4 << 30):
        run()
    n = next(counter)
    print(f"\ngguf fuzz: {n} mutations ({n * len(CALLS)} loads): clean error {tally['clean error']}, "
          f"loaded {tally['loaded']}, anything else {tally['anything else']}")  # fmt: skip
    assert not failures, f"{len(failures)} loads failed badly:\n" + "\n".join(failures[:20])


def test_damaged_gguf_files_fail_cleanly(base, tmp_path):
    fuzz(base, tmp_path, int(os.environ.get("LLAMA3_FUZZ_EXAMPLES", DEFAULT_EXAMPLES)))


@pytest.mark.slow
def test_damaged_gguf_files_fail_cleanly_long(base, tmp_path):
    fuzz(base, tmp_path, SLOW_EXAMPLES)
