"""llama3.quant against gguf-py's reference dequantizer (an independent implementation of the formats).

Tolerances, each a proven bound rather than a fitted number:
* Weights are decoded bit-identically to gguf (checked exactly below), so F.linear-style paths differ from
  the float64 product only by float32 summation. For Q4 blocks the kernels sum d * sum(q x) + c * sum(x)
  instead of sum((d q + c) x), so rounding errors scale with |d q| and |c|, each at most 3 * max|w| of the
  block (Q4_1: d q <= max - min, |m| <= max|w|; Q4_0: |d q| + |8 d| <= 23/8 max|w|). The standard bound
  for a K-term float32 sum then gives  |y - y_exact| <= K * 2^-24 * S,  S = sum_k 3 blockmax|w|_k |x_k|.
* The few-rows kernel codes x as int16 per block of 32 (x ~= sx * xq, sx = max|x_b| / 32767, rounding to
  nearest: |x - sx xq| <= 0.51 sx including the float32 error of forming sx), and sums q * xq exactly in
  integers; that adds at most  sum_k |d q_k| * 0.51 sx_b(k) <= sum_k 2 blockmax|w|_k * 0.51 sx_b(k).
* Q4_K / Q5_K (w = d q - c per group of 32): c can exceed the group's max|w| when no weight has the code 0,
  so there |d q| + |c| <= max|w| + 2 max|c| replaces 3 max|w| (and max|w| + max|c| replaces 2 max|w|), with
  c decoded by gguf from the same blocks with their codes zeroed. Q6_K has no offset: |d q| = |w|.
* bfloat16 inputs are compared with the reference on the same (bf16) values; the output is rounded to
  bfloat16 once, which adds at most 2^-9 |y| (we allow 2^-8 |y|).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from llama3.checkpoint.state import GGMLTensor
from llama3.quant import (
    QuantEmbedding,
    QuantLinear,
    native,
    quantized_embedding,
    quantized_linear,
    tied_output,
)
from llama3.quant.blocks import FORMATS, dequantize_rows

LINEAR_TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# f16 fields (byte offset) that random K-quant blocks must hold finite values in.
_HALF_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def width(qtype: int, cols: int) -> int:
    """``cols`` rounded up to whole blocks of ``qtype`` (the K-quants' rows are multiples of 256)."""
    block = FORMATS[qtype][0]
    return -(-cols // block) * block


def make_tensor(qtype: int, rows: int, cols: int, seed: int = 0, name: str = "w") -> GGMLTensor:
    """A GGMLTensor of real blocks: gguf's own quantizer where it has one, else random bytes with finite scales."""
    rng = np.random.default_rng(seed)
    block_size, block_bytes, _ = FORMATS[qtype]
    try:
        weights = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        weights[0, :block_size] = 0.0  # an all-zero block (d = 0) must decode to zeros too
        raw = quants.quantize(weights, T(qtype))
    except NotImplementedError:  # gguf-py cannot quantize K-types: any bytes are a valid encoding
        raw = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)
        for off in _HALF_FIELDS[qtype]:
            halves = (rng.standard_normal((rows, cols // block_size)) * 0.01).astype(np.float16)
            raw[..., off : off + 2] = halves[..., None].view(np.uint8)
        raw = raw.reshape(rows, -1)
    return GGMLTensor(name=name, ggml_type=int(qtype), shape=(rows, cols), data=raw)


# Byte ranges of a K-quant block holding its codes (Q5_K: qh and the nibbles).
_CODE_BYTES = {T.Q4_K: (16, 144), T.Q5_K: (16, 176)}


def group_max(values: torch.Tensor) -> torch.Tensor:
    """Each weight's group-of-32 maximum of ``values`` (rows, cols), broadcast back to (rows, cols)."""
    return values.unflatten(-1, (-1, 32)).amax(-1, keepdim=True).expand(-1, -1, 32).flatten(-2)


def offsets(t: GGMLTensor) -> torch.Tensor | None:
    """|c| of w = d q - c for Q4_K / Q5_K: gguf's decoding of the same blocks with every code set to 0."""
    if t.ggml_type not in _CODE_BYTES:
        return None
    lo, hi = _CODE_BYTES[T(t.ggml_type)]
    raw = t.data.reshape(t.shape[0], -1, FORMATS[t.ggml_type][1]).copy()
    raw[..., lo:hi] = 0
    zeroed = GGMLTensor(name="c", ggml_type=t.ggml_type, shape=t.shape, data=raw.reshape(t.shape[0], -1))
    return zeroed.dequantize().double().abs()


def reference(x: torch.Tensor, t: GGMLTensor, coded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W^T in float64, the error bound of the module docstring) with W from gguf's dequantizer."""
    w = t.dequantize().double()
    xd = x.double()
    blockmax = group_max(w.abs())
    # |d q| + |c| per weight: <= 3 max|w| for the 32-blocks (docstring); for Q4_K/Q5_K, whose offset is not
    # bounded by the group's weights (a group may lack the code 0), <= max|w| + 2 max|c| since d q = w + c.
    c = offsets(t)
    cmax = group_max(c) if c is not None else torch.zeros_like(blockmax)
    summed, coded_term = torch.maximum(3 * blockmax, blockmax + 2 * cmax), torch.maximum(2 * blockmax, blockmax + cmax)
    bound = t.shape[1] * 2.0**-24 * (xd.abs() @ summed.T)
    if coded:
        sx = xd.abs().unflatten(-1, (-1, 32)).amax(-1, keepdim=True).expand(*xd.shape[:-1], -1, 32).flatten(-2)
        bound = bound + (0.51 * sx / 32767) @ coded_term.T
    return xd @ w.T, bound


def assert_linear_close(y: torch.Tensor, x: torch.Tensor, t: GGMLTensor, coded: bool | None = None) -> None:
    """y ~= x @ W^T within the bound; ``coded`` (default: whether the fused kernel ran) adds the int16 term."""
    rows = x.numel() // x.shape[-1]
    coded = rows <= native.FUSED_MAX_ROWS if coded is None else coded
    ref, bound = reference(x.float(), t, coded)
    tol = bound + (2.0**-8 * ref.abs() if y.dtype == torch.bfloat16 else 0.0)
    err = (y.double() - ref).abs()
    assert y.shape == (*x.shape[:-1], t.shape[0])
    assert bool((err <= tol).all()), f"max error {err.max():.3g}, worst ratio {(err / tol).max():.3g}"
    # The bound must not be vacuous: wrong codes or scales err by O(|y|), far above it.
    assert float(tol.max()) < 0.05 * float(ref.abs().max())


needs_native = pytest.mark.skipif(not native.available(), reason="AVX2 kernels unavailable (no compiler/AVX2)")


@needs_native
@pytest.mark.parametrize("qtype", LINEAR_TYPES, ids=lambda q: T(q).name)
@pytest.mark.parametrize(
    "lead", [(1,), (1, 1), (3,), (2, 7), (native.FUSED_MAX_ROWS,), (native.FUSED_MAX_ROWS + 1,), (2, 40)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_linear_matches_gguf(qtype, lead, dtype):
    cols = width(qtype, 320)
    t = make_tensor(qtype, rows=72, cols=cols, seed=int(qtype))
    module = quantized_linear(t, dtype=dtype, device="cpu")
    assert isinstance(module, QuantLinear) and module.native and module.is_quantized
    assert (module.in_features, module.out_features) == (cols, 72)
    x = torch.randn(*lead, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = module(x)
    assert y.dtype == dtype
    assert_linear_close(y, x, t)


@needs_native
@pytest.mark.parametrize("qtype", LINEAR_TYPES, ids=lambda q: T(q).name)
@pytest.mark.parametrize("fused_max_rows", [0, 64], ids=["gemm", "fused"])
def test_both_native_strategies_and_slabs(qtype, fused_max_rows):
    # slab_bytes of 16 rows forces the GEMM path through 3 slabs, the last one partial (40 = 16 + 16 + 8).
    cols = width(qtype, 96)
    t = make_tensor(qtype, rows=40, cols=cols, seed=3)
    blocks = torch.from_numpy(t.data)
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(2))
    y = torch.ops.llama3_quant.qmatmul(x, blocks, int(qtype), cols, fused_max_rows, 16 * cols * 4)
    assert_linear_close(y, x, t, coded=fused_max_rows > 0)


@needs_native
@pytest.mark.parametrize("qtype", LINEAR_TYPES, ids=lambda q: T(q).name)
def test_native_dequantize_is_bit_exact(qtype):
    t = make_tensor(qtype, rows=33, cols=256, seed=5)
    got = native.dequantize(torch.from_numpy(t.data), int(qtype), 256)
    assert torch.equal(got, t.dequantize())


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: T(q).name)
def test_torch_decoders_are_bit_exact(qtype):
    t = make_tensor(qtype, rows=5, cols=512, seed=7)
    assert torch.equal(dequantize_rows(torch.from_numpy(t.data), qtype), t.dequantize())


@pytest.mark.parametrize("qtype", LINEAR_TYPES, ids=lambda q: T(q).name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_portable_linear_matches_gguf(qtype, dtype, monkeypatch):
    # The CUDA / non-AVX2 path, run on CPU; a tiny slab budget makes it assemble the output from pieces.
    cols = width(qtype, 128)
    monkeypatch.setattr("llama3.quant.modules._PORTABLE_SLAB_BYTES", 16 * cols * 4)
    t = make_tensor(qtype, rows=40, cols=cols, seed=11)
    module = QuantLinear(torch.from_numpy(t.data), int(qtype), cols, 40)
    module.native = False
    for lead in [(1,), (2, 6)]:
        x = torch.randn(*lead, cols, generator=torch.Generator().manual_seed(4)).to(dtype)
        y = module(x)
        assert y.dtype == dtype
        assert_linear_close(y, x, t, coded=False)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: T(q).name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_embedding_rows_equal_gguf_rows(qtype, dtype):
    t = make_tensor(qtype, rows=50, cols=512, seed=13)
    emb = quantized_embedding(t, dtype=dtype, device="cpu")
    assert isinstance(emb, QuantEmbedding) and emb.is_quantized
    tokens = torch.tensor([[0, 49, 7, 7], [3, 0, 12, 48]])
    out = emb(tokens)
    assert out.shape == (2, 4, 512) and out.dtype == dtype
    assert torch.equal(out, t.dequantize()[tokens].to(dtype))
    assert torch.equal(emb.to(torch.float16)(tokens), t.dequantize()[tokens].half())  # follows module.to(dtype)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1], ids=lambda q: T(q).name)
def test_types_without_linear_kernel_return_none(qtype):
    assert quantized_linear(make_tensor(qtype, rows=8, cols=256), torch.float32, "cpu") is None


def test_non_block_types_return_none():
    halves = np.zeros((4, 64), dtype=np.float16)
    for kind in (T.F16, T.BF16, T.F32):
        t = GGMLTensor(name="w", ggml_type=int(kind), shape=(4, 64), data=halves.view(np.uint8))
        assert quantized_linear(t, torch.float32, "cpu") is None
        assert quantized_embedding(t, torch.float32, "cpu") is None
    # A 1-D tensor is no matrix, whatever its encoding.
    vec = make_tensor(T.Q8_0, rows=1, cols=64)
    vec = GGMLTensor(name="v", ggml_type=vec.ggml_type, shape=(64,), data=vec.data.reshape(-1))
    assert quantized_linear(vec, torch.float32, "cpu") is None


@needs_native
def test_blocks_are_zero_copy_and_tied_head_shares_them():
    t = make_tensor(T.Q8_0, rows=64, cols=128, seed=17)
    t.data.setflags(write=False)  # as from the read-only memory map
    emb = quantized_embedding(t, torch.float32, "cpu")
    head = tied_output(emb)
    lin = quantized_linear(t, torch.float32, "cpu")
    assert np.shares_memory(emb.blocks.numpy(), t.data) and np.shares_memory(lin.blocks.numpy(), t.data)
    assert head.blocks.data_ptr() == emb.blocks.data_ptr()
    assert (head.in_features, head.out_features) == (128, 64)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    assert_linear_close(head(x), x, t)
    # Nothing in a state dict: the model's canonical float layout is unchanged by the swap.
    assert dict(head.state_dict()) == {} and dict(emb.state_dict()) == {}


def test_no_native_kernels_means_float_fallback(monkeypatch):
    # Without the AVX2 kernels a CPU linear layer is better expanded by the loader (None); embeddings
    # need no kernel and stay quantized.
    monkeypatch.setattr(native, "_loaded", False)
    t = make_tensor(T.Q8_0, rows=16, cols=64)
    assert quantized_linear(t, torch.float32, "cpu") is None
    emb = quantized_embedding(t, torch.float32, "cpu")
    assert emb is not None and tied_output(emb) is None


@needs_native
def test_module_to_dtype_keeps_blocks():
    t = make_tensor(T.Q4_0, rows=24, cols=64, seed=23)
    module = quantized_linear(t, torch.float32, "cpu").to(torch.bfloat16)
    assert module.blocks.dtype == torch.uint8 and module.native
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(8)).bfloat16()
    assert_linear_close(module(x), x, t)


def test_tied_output_none_without_kernel():
    emb = quantized_embedding(make_tensor(T.Q5_1, rows=8, cols=64), torch.float32, "cpu")
    assert tied_output(emb) is None


@needs_native
def test_traceable_by_torch_compile():
    t = make_tensor(T.Q4_1, rows=48, cols=64, seed=19)
    e = make_tensor(T.Q8_0, rows=10, cols=64, seed=20)
    lin, emb = quantized_linear(t, torch.float32, "cpu"), quantized_embedding(e, torch.float32, "cpu")

    def step(tokens):
        return lin(emb(tokens))

    tokens = torch.tensor([[1, 2, 9]])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(tokens), step(tokens))


def test_real_smollm2_tensors():
    """The default model's own Q4_1 layer and Q8_0 embedding/head, against gguf's expansion."""
    from llama3.assets import default_model_path
    from llama3.checkpoint.gguf import read_gguf

    _, state = read_gguf(default_model_path())
    layer, table = state["layers.0.feed_forward.w2.weight"], state["tok_embeddings.weight"]
    assert (layer.type_name, table.type_name) == ("Q4_1", "Q8_0")
    emb = quantized_embedding(table, torch.float32, "cpu")
    tokens = torch.tensor([[0, 1, 2, 49151, 1000]])
    rows = table.dequantize()[tokens]
    assert torch.equal(emb(tokens), rows)
    if native.available():
        x = torch.randn(2, 3, 1536, generator=torch.Generator().manual_seed(6))
        assert_linear_close(quantized_linear(layer, torch.float32, "cpu")(x), x, layer)
        h = rows[0, :2]  # any 576-vectors do: use two embedding rows as hidden states
        assert_linear_close(tied_output(emb)(h), h, table)
