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
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_LIMIT = 1 << 34  # sanity bound on lengths read from the header: a corrupt file must not allocate terabytes
_MAX_NESTING = 8  # arrays of arrays nest this deep at most (a corrupt file must not exhaust the stack)


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF file (bad magic, unsupported version, truncated or corrupt)."""


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
    """Sequential reader over a buffer, raising GGUFFormatError past its end."""

    def __init__(self, buf: bytes | memoryview | mmap.mmap, endian: str) -> None:
        self.buf, self.e, self.pos = buf, endian, 0

    def take(self, fmt: str) -> Any:
        st = struct.Struct(self.e + fmt)
        try:
            (value,) = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError("the header is truncated") from None
        self.pos += st.size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > _LIMIT or self.pos + n > len(self.buf):
            raise GGUFFormatError(f"the header is corrupt or truncated (a string of {n} bytes)")
        text = str(self.buf[self.pos : self.pos + n], "utf-8", "replace")
        self.pos += n
        return text

    def value(self, vtype: int, keep: bool, depth: int = 0) -> tuple[Any, int | None]:
        """(the value, or None if not kept; the array length for arrays)."""
        if vtype == _STRING:
            return self.string(), None
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype]), None
        if vtype != _ARRAY:
            raise GGUFFormatError(f"the header is corrupt (value type {vtype})")
        etype, count = self.take("I"), self.take("Q")
        if count > _LIMIT:
            raise GGUFFormatError(f"the header is corrupt (an array of {count} items)")
        if etype == _STRING:
            if keep:
                return [self.string() for _ in range(count)], count
            for _ in range(count):  # skip without decoding
                length = self.take("Q")
                if length > _LIMIT or self.pos + length > len(self.buf):
                    raise GGUFFormatError(f"the header is corrupt or truncated (a string of {length} bytes)")
                self.pos += length
            return None, count
        if etype in _SCALARS:
            dtype = np.dtype(self.e + _SCALARS[etype].replace("?", "b"))
            end = self.pos + dtype.itemsize * count
            if end > len(self.buf):
                raise GGUFFormatError("the header is truncated")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy() if keep else None
            self.pos = end
            return arr, count
        if depth >= _MAX_NESTING:
            raise GGUFFormatError("the header is corrupt (arrays nested too deep)")
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
        for _ in range(n_kv):
            key = reader.string()
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
        directory = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.take("I")
            if n_dims > 8:
                raise GGUFFormatError(f"the header is corrupt (tensor {name!r} with {n_dims} dimensions)")
            dims = [reader.take("Q") for _ in range(n_dims)]
            directory.append((name, dims, reader.take("I"), reader.take("Q")))
        if len({entry[0] for entry in directory}) != len(directory):
            raise GGUFFormatError("the header is corrupt (a tensor name appears twice)")
        start = -(-reader.pos // alignment) * alignment
        for name, dims, ggml_type, offset in directory:
            if offset % alignment:
                raise GGUFFormatError(f"tensor {name!r} is not aligned to {alignment} bytes")
            n_bytes = _tensor_bytes(name, dims, ggml_type)
            if start + offset + n_bytes > size:
                raise GGUFFormatError(f"tensor {name!r} runs past the end of the file (truncated)")
            shape = tuple(int(d) for d in reversed(dims))
            out.tensors.append(TensorInfo(name, ggml_type, shape, start + offset, n_bytes))
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
    count = math.prod(dims)  # Python ints: a corrupt header cannot wrap the count around
    if count > _LIMIT or any(d > _LIMIT for d in dims):
        raise GGUFFormatError(f"tensor {name!r} has an impossible shape {dims}")
    if not dims or dims[0] % block:
        raise GGUFFormatError(f"tensor {name!r} of shape {dims} does not fill whole {block}-value blocks")
    return count // block * type_size
