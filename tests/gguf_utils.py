"""Writing tiny llama GGUF files for tests, the way llama.cpp's converter lays them out.

Weights come from a transformers ``LlamaForCausalLM``; q/k rows are permuted from Hugging Face's half-split
layout to the interleaved one (as convert_hf_to_gguf.py does), shapes are written in ggml order, and the
tokenizer metadata is a minimal byte-level vocabulary so transformers can load the file as an oracle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split (HF) rotary rows -> interleaved (Meta/GGUF) rows, per head."""
    out, inp = w.shape
    head_dim = out // n_heads
    return w.view(n_heads, 2, head_dim // 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_tensors(hf_model) -> dict[str, torch.Tensor]:
    """GGUF names -> float32 tensors (torch order) for a transformers Llama model."""
    cfg = hf_model.config
    tensors = {}
    for name, value in hf_model.state_dict().items():
        value = value.detach().float()
        if name in HF_TO_GGUF:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            tensors[HF_TO_GGUF[name]] = value
            continue
        parts = name.split(".")  # model.layers.N.<module path>.weight
        layer, module = parts[2], ".".join(parts[3:-1])
        if module == "self_attn.q_proj":
            value = interleave_rows(value, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            value = interleave_rows(value, cfg.num_key_value_heads)
        tensors[f"blk.{layer}.{LAYER[module]}.weight"] = value
    return tensors


# Byte offsets of the float16 scale fields inside one K-quant block (ggml's block_q4_K / q5_K / q6_K).
K_SCALE_FIELDS = {
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


def random_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, seed: int = 0) -> np.ndarray:
    """Valid random blocks for types the gguf package cannot quantize into (the K-quants): random bytes,
    with each block's float16 scales set to small finite values."""
    block_values, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
    for offset in K_SCALE_FIELDS[qtype]:
        scales = rng.uniform(5e-6, 2e-5, size=data.shape[:2]).astype(np.float16)  # keeps weights ~0.01-0.1
        data[..., offset : offset + 2] = scales.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(rows, -1)


def write_gguf(
    path: Path,
    hf_model,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    *,
    arch: str = "llama",
    metadata_overrides: dict[str, int] | None = None,
    drop: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray | tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> Path:
    """Write ``hf_model`` as a GGUF file; 2-D weights in ``qtype``, norms in F32.

    ``extra_tensors`` are written as given (an array, or raw blocks with their type)."""
    cfg = hf_model.config
    meta = {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "head_count": cfg.num_attention_heads,
        "head_count_kv": cfg.num_key_value_heads,
    }
    meta.update(metadata_overrides or {})
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(meta["block_count"])
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(meta["head_count"])
    writer.add_head_count_kv(meta["head_count_kv"])
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    # A byte-level vocabulary: enough for transformers to build a tokenizer while loading the file.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    for name, value in gguf_tensors(hf_model).items():
        if name in drop:
            continue
        array = value.numpy()
        if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif qtype in K_SCALE_FIELDS:
            writer.add_tensor(name, random_blocks(*array.shape, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        if isinstance(array, tuple):
            writer.add_tensor(name, array[0], raw_dtype=array[1])
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE vocabulary: the 256 byte symbols, a few merges
    and ChatML's two control tokens (ids 256 + len(merges) and one more)."""
    alphabet = [chr(c) for c in sorted(ord(ch) for ch in _byte_symbols())]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġa n"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return tokens, types, merges


def _byte_symbols() -> list[str]:
    from llama3.tokenizer.hf import byte_level_alphabet

    return list(byte_level_alphabet().values())


def write_tiny_gguf(
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    *,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden_dim: int = 128,
    seed: int = 0,
) -> Path:
    """A random llama GGUF written without transformers (fast): tied embeddings, 2-D weights in ``qtype``,
    norms in F32, and a complete byte-level BPE tokenizer (merges, ChatML control tokens and template)."""
    tokens, types, merges = tiny_vocabulary()
    rng = np.random.default_rng(seed)
    head_dim = dim // n_heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(CHATML_TEMPLATE)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = rng.normal(0.0, 0.05, size=(rows, cols)).astype(np.float32)
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quants.quantize(values, qtype), raw_dtype=qtype)

    matrix("token_embd.weight", len(tokens), dim)
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, np.float32))
        matrix(f"blk.{i}.attn_q.weight", n_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_k.weight", n_kv_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_v.weight", n_kv_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_output.weight", dim, n_heads * head_dim)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", hidden_dim, dim)
        matrix(f"blk.{i}.ffn_up.weight", hidden_dim, dim)
        matrix(f"blk.{i}.ffn_down.weight", dim, hidden_dim)
    writer.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- taking a GGUF apart and putting it back, to damage one field at a time ----------------------------
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor directory entry; ``dims`` in ggml order, ``offset`` relative to the data section."""

    name: bytes
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFParts:
    """A little-endian GGUF file as its pieces: key/values (key, raw value type + value), directory, data."""

    kvs: tuple[tuple[bytes, bytes], ...]
    tensors: tuple[TensorEntry, ...]
    data: bytes

    def with_key(self, key: str, vtype: int | None = None, value: Any = None) -> GGUFParts:
        """These parts with ``key`` set to ``value`` of GGUF type ``vtype`` (appended if new); removed if no vtype."""
        kvs = dict(self.kvs)  # (a replaced key keeps its place)
        if vtype is None:
            kvs.pop(key.encode(), None)
        else:
            kvs[key.encode()] = typed_value(vtype, value)
        return replace(self, kvs=tuple(kvs.items()))

    def with_tensor(self, name: str, **changes: Any) -> GGUFParts:
        """These parts with the directory entry of tensor ``name`` changed (dims, ggml_type, offset, name)."""
        entries = [replace(e, **changes) if e.name == name.encode() else e for e in self.tensors]
        return replace(self, tensors=tuple(entries))

    def entry(self, name: str) -> TensorEntry:
        return next(e for e in self.tensors if e.name == name.encode())


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _raw_value(vtype: int, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        return gguf_string(value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass"))
    if vtype == GGUFValueType.ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_raw_value(etype, item) for item in items)
    return struct.pack("<" + _SCALAR_FORMATS[GGUFValueType(vtype)], value)


def typed_value(vtype: int, value: Any) -> bytes:
    """A key's value as stored: its type, then the value (arrays: ``value`` is (element type, items))."""
    return struct.pack("<I", vtype) + _raw_value(vtype, value)


def compose(parts: GGUFParts, alignment: int = 32) -> bytes:
    """The GGUF v3 file of ``parts``, the data section aligned to ``alignment``."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(parts.tensors), len(parts.kvs))]
    for key, value in parts.kvs:
        out += [gguf_string(key), value]
    for e in parts.tensors:
        out += [gguf_string(e.name), struct.pack(f"<I{len(e.dims)}QIQ", len(e.dims), *e.dims, e.ggml_type, e.offset)]
    header = b"".join(out)
    return header + bytes(-len(header) % alignment) + parts.data


def take_apart(path: Path) -> GGUFParts:
    """The parts of the GGUF file at ``path`` (written with the default alignment); ``compose`` gives it back."""
    reader = GGUFReader(path)
    kvs = []
    for f in reader.fields.values():
        if not f.name.startswith("GGUF."):  # the reader's pseudo-fields for the version and counts
            raw = b"".join(bytes(p) for p in f.parts)
            kvs.append((f.name.encode(), raw[8 + len(f.name.encode()) :]))
    entries = [TensorEntry(bytes(p[1]), tuple(int(d) for d in p[3]), int(p[4][0]), int(p[5][0]))
               for p in (t.field.parts for t in reader.tensors)]  # fmt: skip
    parts = GGUFParts(tuple(kvs), tuple(entries), path.read_bytes()[reader.data_offset :])
    assert compose(parts) == path.read_bytes()
    return parts
