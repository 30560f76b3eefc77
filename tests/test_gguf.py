"""GGUF reading: every supported encoding against transformers' own GGUF loader, the real SmolLM2 file,
and each kind of damaged or unsupported file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_utils import write_gguf
from transformers import LlamaConfig, LlamaForCausalLM

import llama3
from llama3.assets import default_model_path
from llama3.errors import CheckpointError

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
