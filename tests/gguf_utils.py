"""Writing tiny llama GGUF files for tests, the way llama.cpp's converter lays them out.

Weights come from a transformers ``LlamaForCausalLM``; q/k rows are permuted from Hugging Face's half-split
layout to the interleaved one (as convert_hf_to_gguf.py does), shapes are written in ggml order, and the
tokenizer metadata is a minimal byte-level vocabulary so transformers can load the file as an oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

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
