"""LoRA adapters (llama3/lora.py) against PEFT on transformers, over float and quantized bases.

The oracle is PEFT itself: an adapter written here is loaded by ``PeftModel.from_pretrained`` into the same
transformers checkpoint and must give the same logits, and an adapter PEFT made (random A and B) loads here with
the same result. The quantized path is checked against the float path of the same GGUF, and its gradients
(dequantize-and-multiply) against autograd through the float weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_reference_model, save_hf_checkpoint, tiny_hf_config
from gguf import GGMLQuantizationType as Q
from gguf_utils import write_gguf

import llama3
from llama3 import lora
from llama3.lora import LoraConfig, LoraError
from llama3.quant import native

peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[1, 5, 9, 100, 200, 7, 3, 44, 17, 250], [8, 1, 2, 3, 4, 5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def reference():
    return make_reference_model(tiny_hf_config(), seed=3)


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory):
    return save_hf_checkpoint(reference, tmp_path_factory.mktemp("lora_base"))


def randomize(model, name: str, seed: int = 0) -> None:
    """Give adapter ``name`` a non-zero B (a fresh adapter is a no-op by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in lora.lora_modules(model, name):
            module.lora_B[name].copy_(torch.randn(module.lora_B[name].shape, generator=g) * 0.05)


def logits(model, tokens=TOKENS, adapter: str | None = None) -> torch.Tensor:
    with torch.no_grad(), lora.adapters(model).using(adapter):
        return model(tokens)


def peft_logits(reference, adapter_dir) -> torch.Tensor:
    import copy

    model = peft.PeftModel.from_pretrained(copy.deepcopy(reference), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


@pytest.mark.parametrize("config", [
    LoraConfig(rank=4, alpha=8.0),
    LoraConfig(rank=2, alpha=5.0, targets=("wq", "wv", "w2"), rslora=True, layers=(1,)),
], ids=["all-targets", "subset-rslora-layer1"])
def test_adapter_written_here_matches_peft(reference, hf_dir, tmp_path, config):
    model = llama3.load_model(hf_dir, device="cpu", dtype=torch.float32)
    lora.add_adapter(model, "mine", config, seed=1)
    randomize(model, "mine")
    lora.save_adapter(model, "mine", tmp_path / "adapter")
    ours, base = logits(model, adapter="mine"), logits(model)
    theirs = peft_logits(reference, tmp_path / "adapter")
    assert (ours - base).abs().max() > 0.1  # the adapter changes the answer ...
    assert (ours - theirs).abs().max() < 1e-4  # ... exactly as PEFT applies it


def test_adapter_made_by_peft_loads_here(reference, hf_dir, tmp_path):
    import copy

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                             "up_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    made = peft.get_peft_model(copy.deepcopy(reference), config).eval()
    made.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = made(input_ids=TOKENS).logits.float()
    model = llama3.load_model(hf_dir, device="cpu", dtype=torch.float32)
    loaded = lora.load_adapter(model, tmp_path / "peft", "peft")
    assert (loaded.rank, loaded.alpha, loaded.targets) == (8, 16.0, tuple(lora.TARGETS))
    assert (logits(model, adapter="peft") - theirs).abs().max() < 1e-4
    assert (logits(model) - theirs).abs().max() > 0.1


def test_rows_choose_their_own_adapter(hf_dir):
    model = llama3.load_model(hf_dir, device="cpu", dtype=torch.float32)
    lora.add_adapter(model, "a", LoraConfig(rank=4), seed=1)
    lora.add_adapter(model, "b", LoraConfig(rank=2, targets=("wo", "w1")), seed=2)
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    batch = TOKENS[[0, 1, 0]]
    router = lora.adapters(model)
    router.use_rows(["a", None, "b"])
    with torch.no_grad():
        mixed = model(batch)
    router.use_rows(None)
    assert torch.allclose(mixed[0], logits(model, TOKENS[:1], "a")[0], atol=1e-5)
    assert torch.allclose(mixed[1], logits(model, TOKENS[1:2])[0], atol=1e-5)
    assert torch.allclose(mixed[2], logits(model, TOKENS[:1], "b")[0], atol=1e-5)
    with pytest.raises(LoraError, match="no adapter named 'c'"):
        router.use_rows(["a", "c"])


@pytest.fixture(scope="module")
def q8_gguf(reference, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("lora_q8") / "tiny-q8.gguf", reference, Q.Q8_0)


@pytest.mark.skipif(not native.available(), reason="native CPU kernels unavailable")
def test_quantized_base_keeps_its_blocks_and_applies_the_adapter(q8_gguf, tmp_path):
    """The adapter over QuantLinear gives the float path's logits (to the kernels' rounding) and its gradients."""
    quant = llama3.load_model(q8_gguf, device="cpu", dtype=torch.float32)
    dense = llama3.load_model(q8_gguf, device="cpu", dtype=torch.float32, quantize=None)
    for model in (quant, dense):
        lora.add_adapter(model, "a", LoraConfig(rank=4), seed=1)
        randomize(model, "a")
    assert isinstance(quant.layers[0].attention.wq.base, llama3.quant.QuantLinear)
    scale = logits(dense, adapter="a").abs().max()
    assert (logits(quant, adapter="a") - logits(dense, adapter="a")).abs().max() < 2e-3 * scale

    grads = []
    for model in (quant, dense):
        params = lora.trainable_parameters(model, "a")
        with lora.adapters(model).using("a"):
            out = model(TOKENS)
        (out.log_softmax(-1)[..., 0].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 1e-2, rel


@pytest.mark.skipif(not native.available(), reason="native CPU kernels unavailable")
def test_fused_decode_steps_aside_while_an_adapter_is_engaged(q8_gguf):
    model = llama3.load_model(q8_gguf, device="cpu", dtype=torch.float32)
    assert model.decode_kernel is not None
    calls = []
    kernel = model.decode_kernel
    original = kernel.__class__.__call__

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    lora.add_adapter(model, "a", LoraConfig(rank=4, targets=("w2",)), seed=1)  # one matrix is enough to matter
    randomize(model, "a")
    full = logits(model, TOKENS[:1], "a")[0]
    model.setup_cache(1, 32)
    try:
        kernel.__class__.__call__ = counting
        for adapter, expect_kernel in (("a", False), (None, True)):
            steps = []
            with torch.no_grad(), lora.adapters(model).using(adapter):
                for pos in range(TOKENS.shape[1]):
                    steps.append(model(TOKENS[:1, pos : pos + 1], pos)[0, -1])
            assert bool(calls) == expect_kernel
            reference = full if adapter else logits(model, TOKENS[:1])[0]
            assert (torch.stack(steps) - reference).abs().max() < 2e-3 * reference.abs().max()
    finally:
        kernel.__class__.__call__ = original


def test_merged_export_equals_adapter_logits(reference, hf_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from llama3.checkpoint.export import save_hf
    from llama3.tokenizer import load_tokenizer
    from llama3.assets import llama3_tokenizer_json
    import shutil

    shutil.copy(llama3_tokenizer_json(), tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    model = llama3.load_model(hf_dir, device="cpu", dtype=torch.float32)
    lora.add_adapter(model, "a", LoraConfig(rank=4), seed=1)
    randomize(model, "a")
    out = save_hf(tmp_path / "merged", model.config, lora.merged_state(model, "a"), tokenizer)
    expected = logits(model, adapter="a")
    merged_ours = llama3.load_model(out, device="cpu", dtype=torch.float32)
    assert (logits(merged_ours) - expected).abs().max() < 1e-4
    merged_hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged_hf(input_ids=TOKENS).logits - expected).abs().max() < 1e-4


def test_bad_adapters_are_named(hf_dir, tmp_path):
    model = llama3.load_model(hf_dir, device="cpu", dtype=torch.float32)
    with pytest.raises(LoraError, match="adapter directory not found"):
        lora.load_adapter(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="no adapter_config.json"):
        lora.load_adapter(model, tmp_path / "empty")
    lora.add_adapter(model, "a", LoraConfig(rank=4), seed=1)
    good = lora.save_adapter(model, "a", tmp_path / "good")
    cfg = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoraError, match="use_dora"):
        lora.load_adapter(model, good, "b")
    (good / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(LoraError, match=r"layer 0 \S+ has A \[4, 64\] and B \[\d+, 4\]; this model with r=8"):
        lora.load_adapter(model, good, "b")
    (good / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraError, match="already loaded"):
        lora.load_adapter(model, good, "a")
    with pytest.raises(LoraError, match="name"):
        lora.add_adapter(model, "bad.name", LoraConfig())
    with pytest.raises(LoraError, match="targets"):
        LoraConfig(targets=("wx",))
    (good / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="cannot read"):
        lora.load_adapter(model, good, "b")
