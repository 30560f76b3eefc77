"""The Llama 3 transformer in pure PyTorch: no file I/O, no device choice, one forward for every use.

Canonical weight layout is Meta's: parameter names ``tok_embeddings``, ``layers.N.attention.wq`` ...,
and q/k rows in the *interleaved* rotary layout (pairs ``(2i, 2i+1)`` of each head rotate together).
Loaders convert every other format into this layout, so the model has exactly one RoPE code path.

Shapes in comments: B batch, T new tokens, S cache length, H query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair inverse frequencies ``theta^(-2i/D)`` (float64 for exact tables), with Llama 3.1 scaling."""
    # Always on the CPU, even under a meta-device context: the table is tiny, and meta ops here would import
    # torch._dynamo (seconds of cold start).
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")[: head_dim // 2] / head_dim))
    if scaling is None:
        return freqs
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between is interpolated.
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, interpolated)
    return torch.where(wavelen < high_wavelen, freqs, scaled)


def rope_table(config: ModelConfig, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin for positions ``0..length-1``: float32 tensor of shape (length, D/2, 2)."""
    # Meta computes the tables in float32; doing the same keeps logits bit-comparable.
    freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    if config.rope_freq_factors is not None:
        freqs = freqs / torch.tensor(config.rope_freq_factors, dtype=torch.float64, device="cpu")
    freqs = freqs.float()
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), freqs)
    # Then to the requested device, or the default one (a `with torch.device(...)` context) like any buffer.
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(device if device is not None else torch.get_default_device())


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, heads, D) by the per-position table (B or 1, T, D/2, 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, h, D/2, 2)
    cos, sin = table[..., 0].unsqueeze(2), table[..., 1].unsqueeze(2)  # (B, T, 1, D/2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as Meta does, then scale in x's dtype.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache(nn.Module):
    """Static key/value buffers allocated once, so decode steps have fixed shapes (torch.compile-friendly)."""

    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, K, D) at per-row positions (B, T) into cache rows ``rows`` (B,), default 0..B-1.

        Returns the keys/values those rows can attend to, (B, K, S, D).
        """
        bsz = k.shape[0]
        index = rows if rows is not None else torch.arange(bsz, device=k.device)
        # Advanced indices around a slice index the (B, T) grid and leave (K, D) in place.
        self.k[index.unsqueeze(1), :, positions] = k.to(self.k.dtype)
        self.v[index.unsqueeze(1), :, positions] = v.to(self.v.dtype)
        if rows is None:
            return self.k[:bsz], self.v[:bsz]  # a view: no copy on the hot decode path
        return self.k[rows], self.v[rows]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        kv_len: int | None,
        cache_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = apply_rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), rope)
        k = apply_rope(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), rope)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.cache is not None:
            keys, values = self.cache.update(positions, k, v, cache_rows)  # (B, K, S, D)
            if kv_len is not None:
                keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)  # (B, H, T, D)
        # Grouped-query attention: kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1. SDPA's enable_gqa
        # broadcasts the kv heads instead of materialising repeated copies of the cache every step.
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rope, positions, mask, kv_len, cache_rows=None):
        h = x + self.attention(self.attention_norm(x), rope, positions, mask, kv_len, cache_rows)
        return h + self.feed_forward(self.ffn_norm(h))


class DecodeKernel(Protocol):
    """A backend's single-token step through every layer (e.g. ``llama3.quant.fused``): the same arithmetic as
    the layers, writing the same KV-cache entries, in one call instead of dozens of ops per layer."""

    def usable(self, model: Transformer, h: torch.Tensor) -> bool: ...

    def __call__(
        self, model: Transformer, h: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor | None
    ) -> torch.Tensor: ...


class Transformer(nn.Module):
    """Llama 3 decoder. ``forward(tokens, start_pos)`` returns float32 logits for every position, as Meta's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Passing the weight skips nn.Embedding's normal_() init: on the meta device (how loaders build the
        # model) that call goes through torch._refs and imports torch._dynamo, 1.5 s of every cold start.
        weight = torch.empty(config.vocab_size, config.dim)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=weight)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Grown on demand (setup_cache / forward); a 128k-context table up front would waste memory.
        self.register_buffer("rope", rope_table(config, min(config.max_seq_len, 2048)), persistent=False)
        self.cache_batch = 0
        self.cache_len = 0
        # Installed by loaders whose weights have one (quantized CPU models); None runs the layers as written.
        self.decode_kernel: DecodeKernel | None = None
        # Recompute each layer's activations in the backward pass instead of keeping them (fine-tuning memory).
        self.gradient_checkpointing = False
        # The decoding front end whose sequences the KV cache holds (a scheduler's prefix cache trusts it only
        # while it stays the owner); reset whenever the cache is reallocated.
        self.kv_owner: object | None = None

    @property
    def device(self) -> torch.device:
        # The norms are always plain parameters; embeddings and linears may be quantized modules.
        return self.norm.weight.device

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the static KV cache once for ``max_batch_size`` rows of ``max_seq_len`` positions."""
        device = self.device
        dtype = dtype or self.norm.weight.dtype
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype, device)
        self.kv_owner = None
        if max_seq_len > self.rope.shape[0]:
            self.rope = rope_table(self.config, max_seq_len, device)
        self.cache_batch, self.cache_len = max_batch_size, max_seq_len

    def clear_cache(self) -> None:
        """Free the KV cache; forward then runs cache-less (full causal attention over the input)."""
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_batch = self.cache_len = 0
        self.kv_owner = None

    @contextmanager
    def cache_detached(self) -> Iterator[None]:
        """Run forwards cache-less (full causal attention over their input) while the KV cache and its
        contents stay as they are: one-off passes (embeddings) between decoding steps."""
        caches = [layer.attention.cache for layer in self.layers]
        shape = (self.cache_batch, self.cache_len)
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_batch = self.cache_len = 0
        try:
            yield
        finally:
            for layer, cache in zip(self.layers, caches):
                layer.attention.cache = cache
            self.cache_batch, self.cache_len = shape

    def copy_cache(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy KV-cache row ``src``'s positions ``start..end-1`` into row ``dst`` (every layer): a prefix
        prefilled in one slot, reused by another."""
        for layer in self.layers:
            cache = layer.attention.cache
            cache.k[dst, :, start:end] = cache.k[src, :, start:end]
            cache.v[dst, :, start:end] = cache.v[src, :, start:end]

    @contextmanager
    def branches(self, row: int, length: int, count: int, extra: int) -> Iterator[None]:
        """Run forwards over ``count`` branches that each continue KV-cache row ``row``'s first ``length``
        positions by up to ``extra`` tokens (batch rows 0..count-1 at positions ``length``..): a scratch cache
        holds a copy of that prefix per branch, so branches never see each other and the KV cache itself is
        left exactly as it was (scoring several continuations of one prefilled prompt in one batched pass)."""
        caches = [layer.attention.cache for layer in self.layers]
        if any(c is None for c in caches) or not 0 <= row < self.cache_batch or length + extra > self.cache_len:
            raise ValueError(f"branches of cache row {row} over {length}+{extra} positions need a KV cache of at "
                             f"least {row + 1} x {length + extra} ({self.cache_batch} x {self.cache_len} allocated)")
        # Every scratch cache exists before any is swapped in: running out of memory here leaves the model as it was.
        scratches = []
        for cache in caches:
            scratch = KVCache(count, cache.k.shape[1], length + extra, cache.k.shape[3], cache.k.dtype, cache.k.device)
            scratch.k[:, :, :length] = cache.k[row, :, :length]
            scratch.v[:, :, :length] = cache.v[row, :, :length]
            scratches.append(scratch)
        shape, kernel = (self.cache_batch, self.cache_len), self.decode_kernel
        try:
            for layer, scratch in zip(self.layers, scratches):
                layer.attention.cache = scratch
            self.cache_batch, self.cache_len = count, length + extra
            # Branches run the layers as written: a compiled decode kernel would recompile for every prompt length.
            self.decode_kernel = None
            yield
        finally:
            for layer, cache in zip(self.layers, caches):
                layer.attention.cache = cache
            self.cache_batch, self.cache_len = shape
            self.decode_kernel = kernel

    def _attention_inputs(
        self, start_pos: int | torch.Tensor, positions: torch.Tensor, kv_len: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """The layers' RoPE rows, attention mask (None: every visible key) and cache extent (None: no cache)."""
        seqlen, device, cached = positions.shape[1], positions.device, self.cache_len > 0
        if isinstance(start_pos, int):
            end = start_pos + seqlen
            rope = self.rope[start_pos:end].unsqueeze(0)
            kv_len = (kv_len or end) if cached else None
            if seqlen == 1:  # one query needs no mask: every cached key up to it is visible
                return rope, None, kv_len
            key_pos = torch.arange(kv_len if cached else seqlen, device=device)
            return rope, (key_pos[None, :] <= positions[0][:, None])[None, None], kv_len
        rope = self.rope[positions]
        kv_len = kv_len or self.cache_len
        key_pos = torch.arange(kv_len, device=device)
        return rope, (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1), kv_len  # (B, 1, T, S)

    def run_layers(
        self,
        h: torch.Tensor,
        start_pos: int | torch.Tensor,
        positions: torch.Tensor,
        kv_len: int | None,
        cache_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Every layer as written, on embeddings ``h`` (B, T, dim) at ``positions`` (B, T); ``forward``'s rules."""
        rope, mask, kv_len = self._attention_inputs(start_pos, positions, kv_len)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, rope, positions, mask, kv_len, cache_rows, use_reentrant=False)
            else:
                h = layer(h, rope, positions, mask, kv_len, cache_rows)
        return h

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        *,
        last_only: bool = False,
        kv_len: int | None = None,
        cache_rows: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) in float32 for ``tokens`` (B, T) placed at ``start_pos``.

        ``start_pos`` is an int (every row at the same position, Meta's case) or a LongTensor (B,) of per-row
        positions (continuous batching). With a KV cache, keys are attended up to ``kv_len`` cache slots
        (default: what the positions need when ``start_pos`` is an int, the whole cache otherwise).
        ``last_only`` computes logits for the final position only, which is all decoding needs.
        ``cache_rows`` (B,) maps batch rows to KV-cache rows (continuous batching: a new request is prefilled
        into a free slot while others are mid-generation); default: batch row i uses cache row i.
        ``hidden`` returns the final normalised hidden states (B, T, dim) instead, for callers that need logits
        at a few positions only (fine-tuning losses: ``self.output(h[selected])``).
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        steps = torch.arange(seqlen, device=device)
        cached = self.cache_len > 0
        # The decode kernel attends each row's positions 0..p; so do the layers, except when a caller asks an
        # int-positioned step to see more cache slots than that (kv_len beyond the step).
        kernel = self.decode_kernel if seqlen == 1 and cached else None
        if kernel is not None and isinstance(start_pos, int) and kv_len is not None and kv_len > start_pos + 1:
            kernel = None
        if isinstance(start_pos, int):
            end = start_pos + seqlen
            if start_pos and not cached:
                raise ValueError("start_pos > 0 needs a KV cache: call setup_cache() first")
            if cached and (end > self.cache_len or (cache_rows is None and bsz > self.cache_batch)):
                raise ValueError(
                    f"batch {bsz} x positions {start_pos}..{end - 1} exceed the KV cache "
                    f"({self.cache_batch} x {self.cache_len})"
                )
            if end > self.rope.shape[0]:
                self.rope = rope_table(self.config, end, self.rope.device)
            positions = (start_pos + steps).expand(bsz, seqlen)
        else:
            if not cached:
                raise ValueError("per-row start positions need a KV cache: call setup_cache() first")
            positions = start_pos.to(device).unsqueeze(1) + steps  # (B, T)

        h = self.tok_embeddings(tokens)
        if kernel is not None and kernel.usable(self, h):
            h = kernel(self, h, positions[:, 0], cache_rows)
        else:
            h = self.run_layers(h, start_pos, positions, kv_len, cache_rows)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return h if hidden else self.output(h).float()
