"""The front of a GGUF file: its key/value header and tensor directory, read without decoding what is not asked for.

Both the checkpoint loader and the GGUF tokenizer read GGUF headers. ``gguf.GGUFReader`` decodes every
field into numpy views, including the ~100k vocabulary strings, which takes seconds; loading a model needs
a few dozen scalars, and the tokenizer only ``tokenizer.*``. Here arrays of keys the caller does not keep are
skipped (their length is still recorded), and tensors are described by offset and shape, then viewed as
numpy arrays over one read-only memory map, in the layout ``GGUFReader`` gives them (float16/float32 arrays,
otherwise raw bytes of shape (..., bytes per row)).

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", version (uint32),
tensor count and key/value count (uint64); key/values; per tensor a name, ndims, dims (ggml order: fastest
first), type and offset; then the tensor data, aligned to ``general.alignment`` (default 32).

Like llama.cpp's gguf.cpp, the tensor directory must tile the data section: each tensor's offset, in directory
order, is the sum of the previous tensors' sizes, each padded to the alignment. Together with a check that the
file ends where the last tensor does (give or take its padding), this refuses overlapping tensors and tensors
whose type no longer matches their size, which would otherwise load as garbage.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_LIMIT = 1 << 34  # sanity bound on lengths read from the header: a corrupt file must not allocate terabytes
_MAX_NESTING = 8  # arrays of arrays nest this deep at most (a corrupt file must not exhaust the stack)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MIN_ENTRY_BYTES = 8 + 4 + 8 + 4 + 8  # a tensor directory entry: name length, ndims, one dim, type, offset


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF file (bad magic, unsupported version, truncated or corrupt), or a header
    value has the wrong type or range."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory; ``shape`` in torch order (slowest dimension first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # the kept keys, decoded
    array_lengths: dict[str, int] = field(default_factory=dict)  # every array key, kept or not
    tensors: list[TensorInfo] = field(default_factory=list)

    def tensor_data(self, info: TensorInfo) -> np.ndarray:
        """A read-only numpy view of ``info``'s bytes in the memory-mapped file (the layout GGUFReader gives)."""
        if not hasattr(self, "_map"):
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[info.offset : info.offset + info.n_bytes]
        if info.ggml_type == 0:  # F32
            return raw.view(np.float32).reshape(info.shape)
        if info.ggml_type == 1:  # F16
            return raw.view(np.float16).reshape(info.shape)
        return raw.reshape(*info.shape[:-1], -1)  # quantized blocks (and BF16): bytes per row


class _Reader:
    """Sequential reader over a buffer, raising GGUFFormatError past its end; ``where`` (the key or directory
    entry being read) ends every error message."""

    def __init__(self, buf: bytes | memoryview | mmap.mmap, endian: str) -> None:
        self.buf, self.e, self.pos = buf, endian, 0
        self.where = "at the start of the file"

    def fail(self, problem: str) -> GGUFFormatError:
        return GGUFFormatError(f"{problem}, {self.where}")

    def take(self, fmt: str) -> Any:
        st = struct.Struct(self.e + fmt)
        try:
            (value,) = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise self.fail("the header is truncated") from None
        self.pos += st.size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > _LIMIT or self.pos + n > len(self.buf):
            raise self.fail(f"the header is corrupt or truncated: a string of {n} bytes")
        text = str(self.buf[self.pos : self.pos + n], "utf-8", "replace")
        self.pos += n
        return text

    def strings(self, count: int, keep: bool) -> list[str] | None:
        """``count`` strings (a vocabulary, merges): decoded if ``keep``, else skipped. One tight loop, as a
        vocabulary has 10^5 of them and this is on every model load's path."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        length_at = struct.Struct(self.e + "Q").unpack_from
        out: list[str] | None = [] if keep else None
        for _ in range(count):
            try:
                (n,) = length_at(buf, pos)
            except struct.error:
                self.pos = pos
                raise self.fail("the header is truncated") from None
            pos += 8
            if n > _LIMIT or pos + n > size:
                self.pos = pos
                raise self.fail(f"the header is corrupt or truncated: a string of {n} bytes")
            if out is not None:
                out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, keep: bool, depth: int = 0) -> tuple[Any, int | None]:
        """(the value, or None if not kept; the array length for arrays)."""
        if vtype == _STRING:
            return self.string(), None
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype]), None
        if vtype != _ARRAY:
            raise self.fail(f"the header is corrupt: value type {vtype}")
        etype, count = self.take("I"), self.take("Q")
        # Every item takes some bytes (a string its length field, an array its type and count): a count that
        # cannot fit in the rest of the file is refused before any loop over it.
        item_bytes = 8 if etype == _STRING else 12 if etype == _ARRAY else struct.calcsize(_SCALARS.get(etype, "B"))
        if count * item_bytes > len(self.buf) - self.pos:
            raise self.fail(f"the header is corrupt or truncated: an array of {count} items")
        if etype == _STRING:
            return self.strings(count, keep), count
        if etype in _SCALARS:
            dtype = np.dtype(self.e + _SCALARS[etype].replace("?", "b"))
            end = self.pos + dtype.itemsize * count
            if end > len(self.buf):
                raise self.fail("the header is truncated")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy() if keep else None
            self.pos = end
            return arr, count
        if depth >= _MAX_NESTING:
            raise self.fail("the header is corrupt: arrays nested too deep")
        return [self.value(etype, keep, depth + 1)[0] for _ in range(count)], count


def read_gguf_file(path: str | Path, keep: Callable[[str], bool] = lambda key: True, *, tensors: bool = True) -> GGUFFile:
    """Parse ``path``'s header: the key/values for which ``keep(key)`` holds, and (``tensors``) the tensor directory.

    Raises OSError when the file cannot be read and GGUFFormatError when it is not a valid GGUF file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GGUFFormatError("not a GGUF file (bad magic)")
        size = fh.seek(0, 2)
        if size < 24:  # magic, version, tensor count, key/value count
            raise GGUFFormatError(f"the header is truncated ({size} bytes)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        (version,) = struct.unpack_from("<I", mm, 4)
        big_endian = version >= 0x10000  # a big-endian file's version reads byte-swapped
        reader = _Reader(mm, ">" if big_endian else "<")
        reader.pos = 4
        version = reader.take("I")
        if version < 2:
            raise GGUFFormatError(f"GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = reader.take("Q"), reader.take("Q")
        if n_tensors > _LIMIT or n_kv > _LIMIT:
            raise GGUFFormatError("the header is corrupt (impossible counts)")
        out = GGUFFile(path, version)
        alignment = 32
        seen: set[str] = set()
        for index in range(n_kv):
            reader.where = f"in key/value {index}"
            key = reader.string()
            reader.where = f"in key {key!r}"
            if key in seen:
                raise GGUFFormatError(f"the header is corrupt (key {key!r} appears twice)")
            seen.add(key)
            kept = keep(key) or key == "general.alignment"
            value, length = reader.value(reader.take("I"), kept)
            if length is not None:
                out.array_lengths[key] = length
            if key == "general.alignment":
                # The spec: a uint32 multiple of 8.
                if not isinstance(value, int) or value < 8 or value % 8:
                    raise GGUFFormatError(f"the header is corrupt (general.alignment {value!r})")
                alignment = value
            if kept:
                out.metadata[key] = value
        if not tensors:
            return out
        if big_endian:
            # Tensor data would need byte-swapping (quantized blocks field by field); llama.cpp writes
            # little-endian files, and big-endian ones are rare enough to refuse rather than misread.
            raise GGUFFormatError("big-endian GGUF files are not supported")
        if n_tensors * _MIN_ENTRY_BYTES > size - reader.pos:
            raise GGUFFormatError(f"the header is corrupt or truncated ({n_tensors} tensors cannot fit)")
        directory = []
        names: set[str] = set()
        for index in range(n_tensors):
            reader.where = f"in tensor directory entry {index}"
            name = reader.string()
            if name in names:
                raise GGUFFormatError(f"the header is corrupt (tensor name {name!r} appears twice)")
            names.add(name)
            reader.where = f"in the directory entry of tensor {name!r}"
            n_dims = reader.take("I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFFormatError(f"the header is corrupt (tensor {name!r} with {n_dims} dimensions)")
            dims = [reader.take("Q") for _ in range(n_dims)]
            directory.append((name, dims, reader.take("I"), reader.take("Q")))
        start = -(-reader.pos // alignment) * alignment
        expected = 0  # where the next tensor must start: the previous ones tile the data section
        for name, dims, ggml_type, offset in directory:
            n_bytes = _tensor_bytes(name, dims, ggml_type)
            if offset != expected:
                after = f" after tensor {out.tensors[-1].name!r}" if out.tensors else ""
                raise GGUFFormatError(
                    f"tensor {name!r} has offset {offset}, expected {expected}{after} "
                    "(overlapping or mis-sized tensors: the file is corrupt)"
                )
            if start + offset + n_bytes > size:
                raise GGUFFormatError(f"tensor {name!r} runs past the end of the file (truncated)")
            shape = tuple(int(d) for d in reversed(dims))
            out.tensors.append(TensorInfo(name, ggml_type, shape, start + offset, n_bytes))
            expected = offset + -(-n_bytes // alignment) * alignment
        if directory and size > start + expected:
            # Writers pad the last tensor or not; more than its padding means its size (type or shape) is wrong.
            last = out.tensors[-1]
            end = last.offset + last.n_bytes
            raise GGUFFormatError(
                f"the file has {size - end} bytes after its last tensor {last.name!r}, at most "
                f"{start + expected - end} expected (a mis-sized tensor: the file is corrupt)"
            )
        return out
    finally:
        try:
            mm.close()
        except BufferError:  # a numpy view of it is still alive; the map closes when that is collected
            pass


def _tensor_bytes(name: str, dims: list[int], ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    if min(dims) < 1:
        raise GGUFFormatError(f"tensor {name!r} has a dimension of 0 (shape {dims})")
    count = math.prod(dims)  # Python ints: a corrupt header cannot wrap the count around
    if count > _LIMIT or any(d > _LIMIT for d in dims):
        raise GGUFFormatError(f"tensor {name!r} has an impossible shape {dims}")
    if dims[0] % block:
        raise GGUFFormatError(f"tensor {name!r} of shape {dims} does not fill whole {block}-value blocks")
    return count // block * type_size


# --- typed access to header values -----------------------------------------------------------------
# A damaged file can hold any GGUF type under any key. Readers take every value through these getters, so no
# NaN, bool, string or array reaches int()/float() or the model's arithmetic, and the error names the key.


def describe(value: Any) -> str:
    """``value`` as error messages show it: its type, then the value ("float inf", "an array of 3 items")."""
    if isinstance(value, np.ndarray):
        return f"an array of {len(value)} {value.dtype} values"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def get_int(
    metadata: Mapping[str, Any], key: str, default: int | None = None, *, lo: int | None = 0, hi: int | None = None
) -> int | None:
    """``metadata[key]``, an integer in [lo, hi] (a GGUF integer type: not a bool nor a float; None: unbounded),
    or ``default``."""
    value = metadata.get(key)
    if value is None:
        return default
    if type(value) is not int or (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            bounds = "" if lo is None else f" >= {lo}"
        else:
            bounds = f" <= {hi}" if lo is None else f" in [{lo}, {hi}]"
        raise GGUFFormatError(f"{key} must be an integer{bounds}, got {describe(value)}")
    return value


def get_float(metadata: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    """``metadata[key]``, a finite number > 0 (the float fields models have: epsilons, frequencies), or ``default``."""
    value = metadata.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
        raise GGUFFormatError(f"{key} must be a finite number > 0, got {describe(value)}")
    return float(value)


def get_str(metadata: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    """``metadata[key]``, a string, or ``default``."""
    value = metadata.get(key)
    if value is None:
        return default
    if type(value) is not str:
        raise GGUFFormatError(f"{key} must be a string, got {describe(value)}")
    return value


def get_bool(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    """``metadata[key]``, a bool, or ``default``."""
    value = metadata.get(key)
    if value is None:
        return default
    if type(value) is not bool:
        raise GGUFFormatError(f"{key} must be a bool, got {describe(value)}")
    return value


def get_strings(metadata: Mapping[str, Any], key: str) -> list[str] | None:
    """``metadata[key]``, an array of strings, or None."""
    value = metadata.get(key)
    if value is not None and not (type(value) is list and all(type(v) is str for v in value)):
        raise GGUFFormatError(f"{key} must be an array of strings, got {describe(value)}")
    return value


def get_numbers(metadata: Mapping[str, Any], key: str, length: int, *, integers: bool) -> np.ndarray | None:
    """``metadata[key]``, an array of ``length`` numbers (``integers``: of an integer type), or None."""
    value = metadata.get(key)
    if value is None:
        return None
    kinds = "iu" if integers else "iuf"
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds or len(value) != length:
        what = "integers" if integers else "numbers"
        raise GGUFFormatError(f"{key} must be an array of {length} {what}, got {describe(value)}")
    return value
