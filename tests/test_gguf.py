"""GGUF reading: every supported encoding against transformers' own GGUF loader, the real SmolLM2 file,
and each kind of damaged or unsupported file (header values of the wrong type or range, a tensor directory
that does not tile the data section, damaged vocabulary strings); tests/test_gguf_fuzz.py damages at random."""

from __future__ import annotations

import math
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf_utils import GGUFParts, compose, gguf_string, take_apart, tiny_vocabulary, write_gguf, write_tiny_gguf
from transformers import LlamaConfig, LlamaForCausalLM

import llama3
from llama3.assets import default_model_path
from llama3.errors import CheckpointError, TokenizerError
from llama3.gguf_file import read_gguf_file
from llama3.tokenizer import load_tokenizer

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module")
def tiny_hf() -> LlamaForCausalLM:
    # Rows of 256 values: the K-quants' super-block size.
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def transformers_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    ref = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(tokens).logits


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_encoding_matches_transformers(tiny_hf, tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", tiny_hf, qtype)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = llama3.load_model(path, device="cpu", dtype=torch.float32, quantize=None)(tokens)
    ref = transformers_logits(path, tokens)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, scale)


def test_float_gguf_equals_original_weights(tiny_hf, tmp_path):
    # F32 GGUF written from the HF model: our interleaved layout must reproduce HF's own logits.
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf, Q.F32)
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_hf(tokens).logits
    assert (llama3.load_model(path, device="cpu", dtype=torch.float32)(tokens) - ref).abs().max() < 1e-4


@pytest.fixture(scope="module")
def smollm2_pair():
    path = default_model_path()
    ours = llama3.load_model(path, device="cpu", dtype=torch.float32, quantize=None)
    ref = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return ours, ref


SMOLLM2_PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 2],  # ChatML-ish ids
    [504, 3458, 282, 1029, 314, 253, 1345, 28, 216, 25, 216, 29, 216, 30],
    list(range(1000, 1120)),  # a long, odd sequence: positions up to 120
]


@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS, ids=["chat", "arith", "long"])
def test_smollm2_matches_transformers(smollm2_pair, prompt):
    ours, ref = smollm2_pair
    tokens = torch.tensor([prompt])
    mine = ours(tokens)
    with torch.no_grad():
        theirs = ref(tokens).logits
    assert (mine - theirs).abs().max().item() < 1e-3
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


def test_smollm2_config():
    config = llama3.load_model(default_model_path(), device="cpu").config
    assert (config.n_layers, config.dim, config.n_heads, config.kv_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_embeddings and config.ffn_hidden_dim == 1536 and config.rope_theta == 100000.0


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        llama3.load_model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        llama3.load_model(bad)


def test_truncated(tiny_hf, tmp_path):
    path = write_gguf(tmp_path / "full.gguf", tiny_hf, Q.Q8_0)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            llama3.load_model(short)


def _gguf_bytes(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    """A hand-built GGUF v3 header (little-endian), to damage in ways a writer never would."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GGUF\x03\x00", "truncated"),
        # A vocabulary string claiming 2^62 bytes, in an array the loader skips without decoding.
        (_gguf_bytes(_s("tokenizer.ggml.tokens") + struct.pack("<IIQQ", 9, 8, 1, 2**62), n_kv=1), "corrupt or truncated"),
        # Arrays of arrays nested 50 deep.
        (_gguf_bytes(_s("general.x") + struct.pack("<IIQ", 9, 9, 1) * 50 + struct.pack("<IQ", 4, 0), n_kv=1), "nested"),
        (_gguf_bytes(_s("general.alignment") + struct.pack("<I", 8) + _s("32"), n_kv=1), "general.alignment"),
        (_gguf_bytes((_s("general.name") + struct.pack("<I", 8) + _s("a")) * 2, n_kv=2), "appears twice"),
        # A tensor whose element count overflows 64 bits (32 * 2^62 * 4).
        (_gguf_bytes(tensors=_s("x") + struct.pack("<I3QIQ", 3, 32, 2**62, 4, 0, 0), n_tensors=1), "impossible shape"),
    ],
    ids=["short", "huge-string", "nested", "alignment", "duplicate-key", "overflowing-shape"],
)
def test_damaged_headers(tmp_path, data, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        llama3.load_model(bad)


def test_big_endian_is_refused_not_misread(tiny_hf, tmp_path):
    from gguf import GGUFEndian, GGUFWriter

    path = tmp_path / "big.gguf"
    writer = GGUFWriter(str(path), "llama", endianess=GGUFEndian.BIG)
    writer.add_block_count(2)
    writer.add_tensor("output_norm.weight", np.arange(4, dtype=np.float32))  # the writer swaps the bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="big-endian GGUF files are not supported"):
        llama3.load_model(path)


def test_unsupported_architecture(tiny_hf, tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_hf, arch="gpt2")
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        llama3.load_model(path)


def test_unsupported_quant_type(tiny_hf, tmp_path):
    # IQ4_NL: 32 values in 18 bytes. Random bytes will do: the reader must refuse before decoding anything.
    blocks = np.random.default_rng(0).integers(0, 256, size=(256, 256 // 32 * 18), dtype=np.uint8)
    path = write_gguf(
        tmp_path / "iq.gguf", tiny_hf, drop=("blk.0.attn_q.weight",),
        extra_tensors={"blk.0.attn_q.weight": (blocks, Q.IQ4_NL)},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="blk.0.attn_q.weight uses unsupported quantization type IQ4_NL"):
        llama3.load_model(path)


def test_shape_mismatch(tiny_hf, tmp_path):
    path = write_gguf(tmp_path / "ffn.gguf", tiny_hf, metadata_overrides={"feed_forward_length": 640})
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight has shape \[512, 256\], config expects \[640, 256\]"):
        llama3.load_model(path)


def test_missing_tensor(tiny_hf, tmp_path):
    path = write_gguf(tmp_path / "missing.gguf", tiny_hf, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors: layers.1.feed_forward.w3.weight"):
        llama3.load_model(path)


def test_unexpected_tensor(tiny_hf, tmp_path):
    path = write_gguf(tmp_path / "extra.gguf", tiny_hf, extra_tensors={"blk.0.attn_q.bias": np.zeros(256, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk.0.attn_q.bias'"):
        llama3.load_model(path)


def test_directory_with_one_gguf(tiny_hf, tmp_path):
    write_gguf(tmp_path / "only.gguf", tiny_hf)
    assert llama3.load_model(tmp_path, device="cpu").config.dim == 256


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no recognised checkpoint"):
        llama3.load_model(tmp_path)


# --- damaged header values, tensor directories and vocabularies: errors naming the file and the field -----
@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory) -> GGUFParts:
    """A small Q8_0 llama GGUF with a real BPE tokenizer (2 layers, 4 heads, 2 KV heads, dim 64), in pieces."""
    return take_apart(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


def _write(tmp_path: Path, parts: GGUFParts | bytes) -> Path:
    path = tmp_path / "damaged.gguf"
    path.write_bytes(parts if isinstance(parts, bytes) else compose(parts))
    return path


def _fails(error: type[Exception], load, path: Path, message: str) -> None:
    with pytest.raises(error, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load(path)


def test_tiny_file_loads(tiny_parts, tmp_path):
    path = _write(tmp_path, tiny_parts)
    assert llama3.load_model(path, device="cpu").config.n_layers == 2
    assert load_tokenizer(path).encode("the", bos=False, eos=False)


@pytest.mark.parametrize(
    "key, vtype, value, message",
    [
        ("llama.attention.head_count", V.UINT32, 0, "must be an integer in [1, 1048576], got int 0"),
        ("llama.embedding_length", V.FLOAT32, math.nan, "must be an integer in [1, 1048576], got float nan"),
        ("llama.block_count", V.FLOAT32, math.inf, "must be an integer in [1, 4294967295], got float inf"),
        ("llama.block_count", V.BOOL, True, "must be an integer in [1, 4294967295], got bool True"),
        ("llama.context_length", V.INT32, -1, "must be an integer in [1, 16777216], got int -1"),
        ("llama.context_length", V.UINT64, 2**63, "must be an integer in [1, 16777216], got int 9223372036854775808"),
        ("llama.vocab_size", V.STRING, "268", "must be an integer in [1, 2147483647], got str '268'"),
        ("llama.attention.head_count_kv", V.UINT32, 3, "(3) must divide llama.attention.head_count (4)"),
        ("llama.attention.head_count_kv", V.UINT32, 8, "must be an integer in [1, 4], got int 8"),
        ("llama.attention.key_length", V.UINT32, 7, "must be even (rotary embeddings rotate pairs), got 7"),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 0.0, "must be a finite number > 0, got float 0.0"),
        ("llama.rope.freq_base", V.FLOAT64, -math.inf, "must be a finite number > 0, got float -inf"),
        ("llama.rope.freq_base", V.ARRAY, (V.FLOAT32, [1.0]), "must be a finite number > 0, got an array of 1 float32 values"),
        ("general.architecture", V.ARRAY, (V.STRING, ["llama"]), "must be a string, got an array of 1 items"),
    ],
    ids=["heads-0", "dim-nan", "layers-inf", "layers-bool", "context-neg", "context-huge", "vocab-str", "kv-divides",
         "kv-more", "head-dim-odd", "eps-0", "theta-inf", "theta-array", "arch-array"],
)  # fmt: skip
def test_bad_header_value(tiny_parts, tmp_path, key, vtype, value, message):
    path = _write(tmp_path, tiny_parts.with_key(key, vtype, value))
    _fails(CheckpointError, llama3.load_model, path, f"{key} {message}")


@pytest.mark.parametrize("count", [3, 100_000, 2**32 - 1])
def test_layer_count_is_checked_before_building(tiny_parts, tmp_path, count):
    # Once took minutes and gigabytes: the strict check built a meta-device model with that many layers.
    path = _write(tmp_path, tiny_parts.with_key("llama.block_count", V.UINT32, count))
    start = time.monotonic()
    message = f"the config has {count} layers, the checkpoint tensors for 2 (layers 0-1)"
    _fails(CheckpointError, llama3.load_model, path, message)
    assert time.monotonic() - start < 5


def test_fewer_layers_than_tensors(tiny_parts, tmp_path):
    path = _write(tmp_path, tiny_parts.with_key("llama.block_count", V.UINT32, 1))
    _fails(CheckpointError, llama3.load_model, path,
           "the config has 1 layers, the checkpoint tensors for 2 (layers 0-1); unexpected tensors: layers.1.")  # fmt: skip


@pytest.mark.parametrize(
    "key, vtype, value, message",
    [
        ("tokenizer.ggml.bos_token_id", V.FLOAT32, math.nan, "must be an integer, got float nan"),
        ("tokenizer.ggml.eos_token_id", V.STRING, "1", "must be an integer, got str '1'"),
        ("tokenizer.ggml.tokens", V.INT64, 5, "must be an array of strings, got int 5"),
        ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, []), "is empty"),
        ("tokenizer.ggml.merges", V.ARRAY, (V.INT32, [1, 2]), "must be an array of strings, got an array of 2 int32 values"),
        ("tokenizer.ggml.token_type", V.ARRAY, (V.FLOAT32, [1.0] * 268),
         "must be an array of 268 integers, got an array of 268 float32 values"),
        ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [1] * 5),
         "must be an array of 268 integers, got an array of 5 int32 values"),
        ("tokenizer.ggml.add_bos_token", V.UINT8, 1, "must be a bool, got int 1"),
        ("tokenizer.ggml.pre", V.BOOL, False, "must be a string, got bool False"),
        ("tokenizer.chat_template", V.FLOAT32, 1.0, "must be a string, got float 1.0"),
    ],
    ids=["bos-nan", "eos-str", "tokens-int", "no-tokens", "merges-ints", "types-float", "types-short", "add-bos-int",
         "pre-bool", "template-float"],
)  # fmt: skip
def test_bad_tokenizer_value(tiny_parts, tmp_path, key, vtype, value, message):
    path = _write(tmp_path, tiny_parts.with_key(key, vtype, value))
    _fails(TokenizerError, load_tokenizer, path, f"{key} {message}")


def test_out_of_range_special_id_is_ignored(tiny_parts, tmp_path):
    # As before: an id outside the vocabulary is not an error, the token is just not known.
    path = _write(tmp_path, tiny_parts.with_key("tokenizer.ggml.bos_token_id", V.INT32, -1))
    assert load_tokenizer(path).bos_id is None


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize(
    "old, new",
    [(gguf_string(b"he"), gguf_string(b"h\xe5")), (gguf_string(b"h e"), gguf_string(b"h \xe5"))],
    ids=["token", "merge"],
)
def test_flipped_vocabulary_byte(tiny_parts, tmp_path, old, new):
    # The merge "h e" makes "he": with either string damaged, tokenizers' BPE raised a bare Exception.
    path = _write(tmp_path, _replace_once(compose(tiny_parts), old, new))
    _fails(TokenizerError, load_tokenizer, path, "tokenizer.ggml.merges does not fit tokenizer.ggml.tokens")


def test_duplicate_vocabulary_string(tiny_parts, tmp_path):
    # "z" flipped to "y": the string is in the vocabulary twice. Like llama.cpp's token map, the last id wins.
    path = _write(tmp_path, _replace_once(compose(tiny_parts), gguf_string(b"z"), gguf_string(b"y")))
    tok = load_tokenizer(path)
    tokens = tiny_vocabulary()[0]
    assert tok.encode("y", bos=False, eos=False) == [tokens.index("z")]
    assert tok.decode(list(range(tok.n_words))).startswith("!")  # every id still decodes


def test_zero_dimension(tiny_parts, tmp_path):
    path = _write(tmp_path, tiny_parts.with_tensor("blk.0.attn_norm.weight", dims=(0,)))
    _fails(CheckpointError, llama3.load_model, path, "tensor 'blk.0.attn_norm.weight' has a dimension of 0 (shape [0])")


def test_overlapping_tensors(tiny_parts, tmp_path):
    q = tiny_parts.entry("blk.0.attn_q.weight")
    k = tiny_parts.entry("blk.0.attn_k.weight")
    path = _write(tmp_path, tiny_parts.with_tensor("blk.0.attn_k.weight", offset=q.offset))
    _fails(CheckpointError, llama3.load_model, path,
           f"tensor 'blk.0.attn_k.weight' has offset {q.offset}, expected {k.offset} after tensor "
           "'blk.0.attn_q.weight' (overlapping or mis-sized tensors: the file is corrupt)")  # fmt: skip


def test_type_no_longer_matching_size(tiny_parts, tmp_path):
    # Q8_0 -> Q4_0: the same shape in fewer bytes, so the next tensor no longer starts where this one ends.
    k = tiny_parts.entry("blk.0.attn_k.weight")
    path = _write(tmp_path, tiny_parts.with_tensor("blk.0.attn_q.weight", ggml_type=Q.Q4_0))
    _fails(CheckpointError, llama3.load_model, path, f"tensor 'blk.0.attn_k.weight' has offset {k.offset}, expected")


@pytest.mark.parametrize(
    "qtype, message",
    [(Q.F16, "bytes after its last tensor 'output_norm.weight'"),
     (Q.F64, "tensor 'output_norm.weight' runs past the end of the file (truncated)")],
    ids=["smaller", "larger"],
)  # fmt: skip
def test_last_tensor_type_flip(tiny_parts, tmp_path, qtype, message):
    assert tiny_parts.tensors[-1].name == b"output_norm.weight"
    path = _write(tmp_path, tiny_parts.with_tensor("output_norm.weight", ggml_type=qtype))
    _fails(CheckpointError, llama3.load_model, path, message)


def test_real_files_tile_their_data_section(tmp_path):
    # The tiling and end-of-data checks accept what llama.cpp and gguf's writer produce, padded last tensor or not.
    from gguf import GGUFWriter

    odd = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(odd), "llama")
    for i, n in enumerate((5, 7, 3)):  # sizes that need padding, the last one too
        writer.add_tensor(f"t{i}", np.ones(n, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path in (default_model_path(), odd):
        info = read_gguf_file(path, tensors=True)
        assert info.tensors and info.tensors[-1].offset + info.tensors[-1].n_bytes <= path.stat().st_size
    unpadded = tmp_path / "unpadded.gguf"  # the same file without the last tensor's padding
    unpadded.write_bytes(odd.read_bytes()[: read_gguf_file(odd).tensors[-1].offset + 12])
    assert [t.shape for t in read_gguf_file(unpadded).tensors] == [(5,), (7,), (3,)]


@pytest.mark.parametrize(
    "rope_freqs, message",
    [((np.zeros((1, 34), np.uint8), Q.Q8_0), "tensor rope_freqs.weight has type Q8_0, expected F32 or F16"),
     (np.array([1.0] * 31 + [0.0], np.float32), "rope_freqs holds divisors that are not finite numbers > 0")],
    ids=["quantized", "zero"],
)  # fmt: skip
def test_bad_rope_freqs(tiny_hf, tmp_path, rope_freqs, message):
    path = write_gguf(tmp_path / "rope.gguf", tiny_hf, extra_tensors={"rope_freqs.weight": rope_freqs})
    _fails(CheckpointError, llama3.load_model, path, message)
