"""CPU levels (``llama3.quant.cpu``): chosen by feature, forced by LLAMA3_CPU_LEVEL, and accurate on every
level this machine can run.

Oracles: closed-form bounds of bfloat16 rounding against float64 products of gguf's own dequantized weights,
and the float32 (avx2) path's greedy tokens and top-2 gaps on the benchmark workloads (issue 15's guard).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from gguf_utils import K_SCALE_FIELDS, random_blocks
from llama3.errors import Llama3Error
from llama3.quant import cpu, native
from llama3.quant.modules import QuantLinear

AVX2 = frozenset({"avx2", "fma", "f16c"})
U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, round to nearest)


@pytest.mark.parametrize("feats, level", [
    (frozenset(), "portable"),
    (frozenset({"avx2", "fma"}), "portable"),
    (AVX2, "avx2"),
    (AVX2 | {"avx512_vnni"}, "avx2"),
    (AVX2 | {"avx512"}, "avx512"),
    (AVX2 | {"avx512", "avx512_vnni"}, "avx512"),
    (AVX2 | {"avx512", "avx512_vnni", "avx512_bf16"}, "avx512_bf16"),
    (AVX2 | {"avx512", "avx512_vnni", "avx512_bf16", "amx"}, "amx"),
])  # fmt: skip
def test_detected_level(feats, level):
    assert cpu.detected_level(feats) == level
    assert cpu.resolve(None, feats).level == level and not cpu.resolve("auto", feats).forced


def test_forcing_a_level():
    assert cpu.resolve("AVX2", AVX2 | {"avx512"}).level == "avx2"
    assert cpu.resolve("portable", AVX2).native_kernels is False
    # bf16 levels are plain torch: they run anywhere (slowly), so tests cover them on every machine.
    assert cpu.resolve("amx", AVX2).prefill_dtype == torch.bfloat16
    with pytest.raises(Llama3Error, match="offers up to avx2"):
        cpu.resolve("avx512", AVX2)
    with pytest.raises(Llama3Error, match="not a level"):
        cpu.resolve("sse9", AVX2)
    with pytest.raises(Llama3Error, match="need AVX2"):
        cpu.resolve("avx2", frozenset())


def test_the_machine_reports_its_level(monkeypatch):
    monkeypatch.delenv(cpu.ENV, raising=False)
    path = cpu.current()
    assert path.level == cpu.detected_level(cpu.features()) and path.level in path.describe()
    monkeypatch.setenv(cpu.ENV, "portable")
    assert native.available() is False and "forced" in cpu.current().describe()


def runnable_levels() -> list[str]:
    best = cpu.detected_level(cpu.features())
    return [lv for lv in cpu.LEVELS if cpu.LEVELS.index(lv) <= cpu.LEVELS.index(best) or lv in ("avx512_bf16", "amx")]


needs_native = pytest.mark.skipif(not native.available(), reason="the AVX2 block kernels are not available here")


@needs_native
@pytest.mark.parametrize("level", [lv for lv in runnable_levels() if lv != "portable"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_prefill_product_within_its_rounding_bound(monkeypatch, level, qtype):
    monkeypatch.setenv(cpu.ENV, level)
    qt = GGMLQuantizationType[qtype]
    rows, cols = 80, 512
    if qt in K_SCALE_FIELDS:
        blocks = random_blocks(rows, cols, qt, seed=3)
    else:
        blocks = quantize(np.random.default_rng(3).normal(0, 0.05, (rows, cols)).astype(np.float32), qt)
    layer = QuantLinear(torch.from_numpy(blocks.view(np.uint8).reshape(rows, -1)), int(qt), cols, rows)
    x = torch.randn(2, 40, cols, generator=torch.Generator().manual_seed(1))  # 80 rows: the many-rows path
    w = torch.from_numpy(dequantize(blocks, qt).reshape(rows, cols)).double()
    exact = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T  # sum of |x_j w_j| per output
    got = layer(x).double()
    if cpu.current().prefill_dtype == torch.bfloat16:
        # x and w rounded to bfloat16 (2u + u^2 per product), float32 sums, the result rounded once more.
        bound = (2 * U + U * U + cols * 2.0**-24) * magnitude * (1 + U) + U * exact.abs()
    else:
        bound = cols * 2.0**-23 * magnitude + 1e-30  # float32 sums in any order
    assert ((got - exact).abs() <= bound).all(), (got - exact).abs().max()


@pytest.fixture(scope="module")
def workloads():
    from llama3.assets import default_model_path
    from llama3.bench import make_workloads
    from llama3.tokenizer import load_tokenizer

    return make_workloads(load_tokenizer(default_model_path()), batch=2)


def greedy(level: str, workloads, monkeypatch):
    from llama3.assets import default_model_path
    from llama3.generation import Llama
    from llama3.sampling import SamplingParams
    from llama3.sequence import GenerationSpec

    monkeypatch.setenv(cpu.ENV, level)
    llm = Llama.build(default_model_path(), max_seq_len=512, max_batch_size=3)
    bias = {t: -100.0 for t in workloads.forbidden}  # every engine in the benchmark forbids the stop tokens
    prompts = [workloads.prompt, *workloads.batch_prompts]
    specs = [GenerationSpec(p, 32, SamplingParams(temperature=0.0, logit_bias=bias), logprobs=True, top_logprobs=2)
             for p in prompts]
    seqs = llm.run(specs)
    with torch.inference_mode():
        llm.model.clear_cache()
        logits = llm.model(torch.tensor([workloads.prompt]), 0)[0]
    return seqs, logits


# Largest |logit - float32 logit| over the decode prompt's prefill, per path: bfloat16 measured 0.43 on SmolLM2.
LOGIT_BOUND = {"portable": 1e-3, "avx2": 0.0, "avx512": 1e-3, "avx512_bf16": 1.0, "amx": 1.0}


@needs_native
@pytest.mark.parametrize("level", [lv for lv in runnable_levels() if lv not in ("avx2", "amx")])
def test_greedy_tokens_match_the_float_path(monkeypatch, workloads, level):
    reference, ref_logits = greedy("avx2", workloads, monkeypatch)
    seqs, logits = greedy(level, workloads, monkeypatch)
    for ref, seq in zip(reference, seqs, strict=True):
        for k, (a, b) in enumerate(zip(ref.generated, seq.generated, strict=True)):
            if a != b:
                (_, first), (_, second) = ref.entries[k].top
                assert first - second < 0.05, f"token {k} differs with a top-2 gap of {first - second:.4f}"
                break  # after a near-tie the continuations may part
    assert (logits - ref_logits).abs().max().item() <= LOGIT_BOUND[level]
