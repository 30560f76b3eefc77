"""The tensor-parallel plan: which slice of every canonical tensor a rank holds (Megatron / fairscale rules).

* column-parallel, split on dim 0 (output rows): ``wq wk wv w1 w3``; each rank computes its heads / FFN
  columns without communicating.
* row-parallel, split on dim 1 (input columns): ``wo w2``; each rank's partial product is summed by one
  all-reduce.
* vocabulary-parallel, split on dim 0: ``tok_embeddings`` and ``output``; lookups are masked and summed,
  logits gathered.
* replicated: the RMSNorm weights.

Query heads are split evenly. Key/value heads are split too when there are at least as many as ranks;
with fewer (grouped-query attention on many ranks), each rank keeps the one kv head its query heads read,
so the KV cache is replicated across the ranks that share it. Meta's ``consolidated.NN.pth`` shards are the
same rules with ranks = shards, which is why one plan serves both merging Meta shards and resharding them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ModelConfig
from ..errors import CheckpointError, ParallelError

COLUMN_PARALLEL = (
    "attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output", "tok_embeddings"
)
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def split_dim(name: str) -> int | None:
    """The dim tensor-parallel ranks split ``name`` along (fairscale's rule), or None for replicated tensors."""
    module = name.removesuffix(".weight")
    if module.endswith(COLUMN_PARALLEL):
        return 0
    if module.endswith(ROW_PARALLEL):
        return 1
    return None


@dataclass(frozen=True)
class Region:
    """Indices ``start:stop`` of one tensor along ``dim``."""

    dim: int
    start: int
    stop: int


class ShardPlan:
    """Rank ``rank`` of ``size``'s share of a model with ``config``: regions of the full tensors and the
    ``local_config`` whose ``Transformer`` has exactly those shapes."""

    def __init__(self, config: ModelConfig, rank: int, size: int) -> None:
        if not 0 <= rank < size:
            raise ParallelError(f"rank {rank} is outside a job of {size} processes")
        heads, kv, ffn = config.n_heads, config.kv_heads, config.ffn_hidden_dim
        problems = []
        if heads % size:
            problems.append(f"{heads} attention heads")
        if kv % size and size % kv:
            problems.append(f"{kv} key/value heads (nor do they divide it)")
        if ffn % size:
            problems.append(f"FFN width {ffn}")
        if problems:
            raise ParallelError(
                f"cannot split the model over {size} ranks: {size} does not divide its {', '.join(problems)}; "
                f"use a process count that divides {heads} (heads), {ffn} (FFN width) and {kv} or a multiple of it"
            )
        self.config, self.rank, self.size = config, rank, size
        self.local_heads = heads // size
        self.head_dim = config.head_dim
        # With fewer kv heads than ranks, ranks rank*kv//size share kv head rank*kv//size (replicated cache).
        self.local_kv_heads = kv // size if kv >= size else 1
        self.first_kv_head = rank * self.local_kv_heads if kv >= size else rank * kv // size
        self.local_ffn = ffn // size
        # Vocabulary rows: equal chunks (the last rank may hold fewer), so gathered logits line up.
        vocab = config.vocab_size
        self.vocab_chunk = -(-vocab // size)
        if self.vocab_chunk * (size - 1) >= vocab:
            raise ParallelError(f"a vocabulary of {vocab} tokens is too small to split over {size} ranks")
        self.vocab_start = min(vocab, rank * self.vocab_chunk)
        self.vocab_stop = min(vocab, (rank + 1) * self.vocab_chunk)

    @property
    def local_config(self) -> ModelConfig:
        """The architecture of this rank's share: the pure model built from it has the local shapes."""
        return replace(
            self.config, n_heads=self.local_heads, n_kv_heads=self.local_kv_heads, hidden_dim=self.local_ffn,
            vocab_size=self.vocab_stop - self.vocab_start, head_dim_override=self.head_dim,
        )

    def region(self, name: str) -> Region | None:
        """This rank's slice of canonical tensor ``name``, or None when every rank holds all of it."""
        module = name.removesuffix(".weight")
        d, h = self.head_dim, self.local_heads
        if module.endswith("attention.wq"):
            return Region(0, self.rank * h * d, (self.rank + 1) * h * d)
        if module.endswith(("attention.wk", "attention.wv")):
            return Region(0, self.first_kv_head * d, (self.first_kv_head + self.local_kv_heads) * d)
        if module.endswith("attention.wo"):
            return Region(1, self.rank * h * d, (self.rank + 1) * h * d)
        if module.endswith(("feed_forward.w1", "feed_forward.w3")):
            return Region(0, self.rank * self.local_ffn, (self.rank + 1) * self.local_ffn)
        if module.endswith("feed_forward.w2"):
            return Region(1, self.rank * self.local_ffn, (self.rank + 1) * self.local_ffn)
        if module.endswith(("tok_embeddings", "output")):
            return Region(0, self.vocab_start, self.vocab_stop)
        return None

    def check_shape(self, name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]], source: str) -> None:
        """Refuse a tensor whose full shape is not the config's before slicing it (slices would hide it)."""
        want = expected.get(name)
        if want is not None and tuple(shape) != want:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, config expects {list(want)}")
